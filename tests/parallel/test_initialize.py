import pytest

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.parallel.initialize import distributed_env, first_host


def test_torchrun_env():
    env = distributed_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "n1", 1234, "torchrun")


def test_slurm_env_uses_first_host():
    env = distributed_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu[007-009,011],cpu1"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (
        5, 16, 1, "gpu007", "slurm")


@pytest.mark.parametrize("nodelist,host", [("node1", "node1"), ("a[3-4]", "a3"),
                                           ("x[10,2-3],y", "x10"), ("h1,h2", "h1"),
                                           ("node[1-4]-ib", "node1-ib"),
                                           ("rack[1-2]-n[01-04]", "rack1-n01"),
                                           ("gpu[007-009]-ib,login", "gpu007-ib")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_single_process_default():
    env = distributed_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


def _model(**kw):
    return ModelConfig(**{"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, **kw})


@pytest.mark.parametrize("world,parallel,model,match", [
    (2, dict(tensor_model_parallel_size=3), _model(), "world size 2 is not divisible"),
    (3, dict(tensor_model_parallel_size=3), _model(), "--num-attention-heads 4 is not divisible"),
    (2, dict(tensor_model_parallel_size=2), _model(num_query_groups=1),
     "--num-query-groups 1 is not divisible"),
    (3, dict(pipeline_model_parallel_size=3), _model(), "--num-layers 4 is not divisible"),
    (2, dict(sequence_parallel=True), _model(), "--sequence-parallel needs"),
])
def test_impossible_layouts(world, parallel, model, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**parallel).validate(world, model)


def test_context_parallel_needs_sequence_divisible_by_2cp():
    with pytest.raises(ValueError, match=r"divisible by 2\*--context-parallel-size = 4.*use e.g. "
                                         r"1020 or 1024"):
        ParallelConfig(context_parallel_size=2).validate(2, _model(), seq_length=1022)


def test_global_batch_divisible_by_micro_times_dp():
    cfg = RunConfig()
    cfg.data.data_path = ["stdlib"]
    cfg.training.global_batch_size, cfg.training.micro_batch_size = 6, 2
    cfg.training.train_iters = 10
    with pytest.raises(ValueError, match="multiple of 4"):
        cfg.validate(world_size=2)
    cfg.validate(world_size=3)

"""CUDA_DEVICE_MAX_CONNECTIONS=1 for CUDA runs with TP or CP > 1 (Megatron-LM asserts it),
set before CUDA starts, a user's value kept; nothing on CPU or without TP/CP."""

import logging

from megatron_longctx.config import ParallelConfig
from megatron_longctx.parallel.initialize import set_cuda_device_max_connections

NAME = "CUDA_DEVICE_MAX_CONNECTIONS"


def test_set_for_tensor_or_context_parallel_on_cuda():
    for layout in (ParallelConfig(tensor_model_parallel_size=2),
                   ParallelConfig(context_parallel_size=2)):
        env = {}
        assert set_cuda_device_max_connections([layout], env, cuda=True) == "1"
        assert env == {NAME: "1"}
    env = {}  # a staged run: any stage with TP/CP
    set_cuda_device_max_connections([ParallelConfig(), ParallelConfig(
        tensor_model_parallel_size=4, sequence_parallel=True)], env, cuda=True)
    assert env == {NAME: "1"}


def test_left_alone_elsewhere(caplog):
    tp2 = ParallelConfig(tensor_model_parallel_size=2)
    for layouts, cuda in (([tp2], False), ([ParallelConfig()], True)):
        env = {}
        assert set_cuda_device_max_connections(layouts, env, cuda=cuda) is None
        assert env == {}
    env = {NAME: "8"}  # the user's choice stays, with a warning
    with caplog.at_level(logging.WARNING):
        assert set_cuda_device_max_connections([tp2], env, cuda=True) == "8"
    assert env == {NAME: "8"} and "expects 1" in caplog.text

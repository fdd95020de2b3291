"""A checkpoint moves between the local and the Transformer Engine layer spec: the model built
with TE asks for ``_extra_state`` objects (its final ``TENorm``'s FP8 metadata) that a
local-spec checkpoint lacks, and holds per-module extra state that dist checkpoints never
store (TE attention's). Emulated on CPU by giving the final norm extra state, as TE's has."""

import pytest
import torch
from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from megatron_longctx.config import ModelConfig, ParallelConfig, RunConfig
from megatron_longctx.model import build_model, load_model
from megatron_longctx.model.norm import RMSNorm
from megatron_longctx.training.checkpoint import save_weights
from megatron_longctx.training.checkpoint_schema import (
    drop_absent_extra_state,
    load_model_state,
)

CFG = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                  num_query_groups=2, vocab_size=260, transformer_impl="local")
EXTRA_KEY = "decoder.final_layernorm._extra_state"


class NormWithExtraState(RMSNorm):
    """RMSNorm holding extra state the way TE's modules do (``get/set_extra_state``)."""

    def get_extra_state(self):
        return torch.tensor([7.0])

    def set_extra_state(self, state):
        self.loaded_extra_state = state


def te_like_model(seed: int):
    torch.manual_seed(seed)
    model = build_model(CFG, ParallelConfig())
    model.decoder.final_layernorm.__class__ = NormWithExtraState
    return model


def weights(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_local_checkpoint_loads_into_a_model_with_more_extra_state(model_parallel, tmp_path):
    torch.manual_seed(0)
    local = build_model(CFG, ParallelConfig())
    path = save_weights(local, RunConfig(model=CFG), str(tmp_path / "local"), step=1)
    te = te_like_model(seed=1)
    assert weights(te).keys() == weights(local).keys()
    assert any(not torch.equal(a, b) for a, b in zip(weights(te).values(),
                                                     weights(local).values()))
    request = te.sharded_state_dict()
    assert EXTRA_KEY in {getattr(v, "key", None) for v in request.values()}
    with pytest.raises(CheckpointException, match="_extra_state"):  # the loader on its own
        dist_checkpointing.load({"model": te.sharded_state_dict()}, path)
    kept = drop_absent_extra_state(request, path)
    assert EXTRA_KEY not in {getattr(v, "key", None) for v in kept.values()}
    assert len(kept) == len(request) - 1  # only what the checkpoint lacks is dropped
    state = dist_checkpointing.load({"model": kept}, path)
    load_model_state(te, state["model"])
    for name, value in weights(local).items():
        assert torch.equal(weights(te)[name], value), name
    assert not hasattr(te.decoder.final_layernorm, "loaded_extra_state")  # started afresh

    del state["model"]["decoder.final_layernorm.weight"]  # a real tensor missing still fails
    with pytest.raises(RuntimeError, match="final_layernorm.weight"):
        load_model_state(te, state["model"])


def test_te_like_checkpoint_loads_into_the_local_spec(model_parallel, tmp_path):
    te = te_like_model(seed=2)
    path = save_weights(te, RunConfig(model=CFG), str(tmp_path / "te"), step=1)
    # its extra state is in the checkpoint: nothing dropped, and it is restored
    again = te_like_model(seed=3)
    request = again.sharded_state_dict()
    assert drop_absent_extra_state(request, path) == request
    load_model_state(again, dist_checkpointing.load({"model": request}, path)["model"])
    assert torch.equal(again.decoder.final_layernorm.loaded_extra_state, torch.tensor([7.0]))
    loaded = load_model(str(tmp_path / "te")).gpt  # the local spec: the extra object unused
    for name, value in weights(te).items():
        assert torch.equal(weights(loaded)[name], value), name

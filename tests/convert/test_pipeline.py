"""The links between conversion and training, as users run them: a random HF Llama ->
``hf_to_mcore`` -> ``tools/pretrain.py --pretrained-checkpoint`` (2 iterations on the built-in
byte corpus, RoPE switched from default to YaRN factor 2) -> ``mcore_to_hf``; transformers loads
the export strictly with the YaRN parameters, and its logits equal ``load_model``'s."""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile

import torch

from megatron_longctx.convert import hf_to_mcore, mcore_to_hf
from megatron_longctx.model import load_model

from convert.hf_models import HF_ROPES, hf_logits, make_hf_model
from convert.test_convert_hf import strict_load
from distributed import ROOT

TOL = 1e-4
BYTE_VOCAB = 258  # ByteTokenizer (256 bytes, bos, eos), the corpus tools/pretrain.py uses
ORIG = 64


def pretrain(*args: str, timeout: int = 300) -> str:
    """tools/pretrain.py in its own session (killed afterwards, helpers included); its log."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "pretrain.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        text = log.read()
    assert returncode == 0, f"pretrain failed ({returncode}):\n{text[-6000:]}"
    return text


def test_hf_pretrain_hf(single_process_group, tmp_path):
    src, ckpt, save, out = (str(tmp_path / d) for d in ("hf", "ckpt", "save", "out"))
    make_hf_model(src, "llama", HF_ROPES["default"], vocab_size=BYTE_VOCAB,
                  max_position_embeddings=4 * ORIG)
    hf_to_mcore(src, ckpt)

    log = pretrain("--pretrained-checkpoint", ckpt, "--use-checkpoint-args", "--save", save,
                   "--load", save, "--train-iters", "2", "--seq-length", "64",
                   "--micro-batch-size", "2", "--global-batch-size", "4",
                   "--lr-warmup-iters", "1", "--log-interval", "1", "--data-path", "stdlib",
                   "--rope-type", "yarn", "--rope-factor", "2",
                   "--original-max-position-embeddings", str(ORIG))
    assert "rope: checkpoint default" in log, log[-3000:]

    mcore_to_hf(save, out)
    hf = strict_load(out)
    rope = hf.config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 2.0, rope
    assert rope["original_max_position_embeddings"] == ORIG, rope

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, BYTE_VOCAB, (2, 3 * ORIG // 2), generator=g)  # past ORIG
    positions = torch.arange(tokens.shape[1])[None].repeat(2, 1)
    expected = hf_logits(hf, tokens, positions)
    with torch.no_grad():
        ours = load_model(save)(tokens, positions)
    assert ours.shape == expected.shape == (2, tokens.shape[1], BYTE_VOCAB)
    assert (ours - expected).abs().max().item() <= TOL
    # the trained weights, not the source ones, were exported
    with torch.no_grad():
        before = load_model(ckpt)(tokens, positions)
    assert (before - ours).abs().max().item() > 100 * TOL

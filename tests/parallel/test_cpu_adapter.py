"""The CPU adaptation: nothing when CUDA is present; the documented changes when it is not.

Each case runs in a fresh interpreter because the adaptation changes process-wide state.
"""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout


def test_nothing_applied_when_cuda_reported_available():
    out = _run("""
        from unittest import mock
        import torch
        originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type,
                     torch.Tensor.cuda, torch.cuda.get_rng_state)
        with mock.patch("torch.cuda.is_available", return_value=True):
            from megatron_longctx.parallel.cpu_adapter import adapt_megatron_core_for_cpu
            applied = adapt_megatron_core_for_cpu()
        from megatron.core.pipeline_parallel import schedules
        from megatron.core.optimizer import optimizer
        assert applied == [], applied
        now = (torch.cuda.current_device, torch.cuda.synchronize, torch.Tensor.type,
               torch.Tensor.cuda, torch.cuda.get_rng_state)
        assert all(a is b for a, b in zip(originals, now))
        assert schedules.torch is torch and optimizer.torch is torch
        print("untouched")
    """)
    assert "untouched" in out


def test_cpu_adaptation_applied_without_cuda():
    out = _run("""
        import torch
        assert not torch.cuda.is_available()
        from megatron_longctx.parallel.cpu_adapter import adapt_megatron_core_for_cpu
        applied = adapt_megatron_core_for_cpu()
        assert adapt_megatron_core_for_cpu() is applied  # idempotent
        from megatron.core.pipeline_parallel import schedules
        t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
        assert t.device.type == "cpu"
        assert torch.cuda.current_device() == torch.device("cpu")
        x = torch.ones(2)
        assert x.cuda() is x and x.type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64  # conversions still convert
        print(len(applied))
    """)
    assert int(out.strip()) >= 6

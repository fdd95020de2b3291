"""MetricsLogger: the same values in metrics.jsonl, TensorBoard and an offline wandb run; resume
truncation of metrics.jsonl; Megatron-LM's console line; a disabled logger writes nothing."""

import json
import os
import struct
import subprocess
import sys
from datetime import datetime

import pytest

from megatron_longctx.training.metrics import MetricsLogger, console_line

LOSSES = {1: 4.25, 2: 3.5, 3: 2.75}
CONFIG = {"model": {"num_layers": 2}, "training": {"lr": 3e-4}}

# Runs in a subprocess: wandb.init starts a wandb-core service process and patches
# sys.stdout/stderr, none of which may leak into the other tests of this pytest process.
WRITER = """
import json, sys
from megatron_longctx.training.metrics import MetricsLogger
root, losses, config = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
logger = MetricsLogger(save_dir=root + "/save", tensorboard_dir=root + "/tb",
                       wandb_project="metrics-test", wandb_exp_name="offline-run",
                       wandb_save_dir=root + "/wandb", config=config, resume_iteration=0,
                       enabled=True)
for it, loss in losses.items():
    logger.log(int(it), {"lm_loss": loss, "lr": 1e-4 * int(it), "elapsed_ms_per_iteration": 250.0,
                         "lm_loss_pos_0_4k": loss + 1.0})
logger.close()
logger.close()  # idempotent
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    home = str(root / "wandb-home")  # keeps wandb's settings and caches out of ~
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "WANDB_CONFIG_DIR": home, "WANDB_CACHE_DIR": home, "WANDB_DATA_DIR": home,
           "WANDB_DISABLE_GIT": "true",
           "WANDB__DISABLE_STATS": "true", "WANDB__DISABLE_META": "true", "WANDB_CONSOLE": "off"}
    env.pop("WANDB_RUN_ID", None)
    argv = [sys.executable, "-c", WRITER, str(root), json.dumps(LOSSES), json.dumps(CONFIG)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return root


def _wandb_records(path: str):
    """The records of a .wandb transaction log.

    wandb 0.31 writes it from its Go core and no longer ships a Python reader
    (wandb.sdk.internal.datastore.DataStore is gone), so this reads the format directly: a
    7-byte file header (b":W&B", magic 0xBEE1, version 0), then LevelDB-log framing in 32 KiB
    blocks -- each chunk a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle,
    4 last) -- whose reassembled payloads are wandb_internal_pb2.Record protobufs.
    """
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    pos, payload, block = 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def _items(items) -> dict:
    return {item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_sinks_agree(run_dir):
    # metrics.jsonl
    with open(run_dir / "save" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [(r["iteration"], r["lm_loss"]) for r in rows] == list(LOSSES.items())
    assert rows[1]["lm_loss_pos_0_4k"] == LOSSES[2] + 1.0

    # TensorBoard: Megatron-LM's tag names, step = iteration, iteration time in seconds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("lm loss")] == list(LOSSES.items())
    assert [e.value for e in events.Scalars("iteration-time")] == pytest.approx([0.25] * 3)
    assert events.Scalars("learning-rate")[2].value == pytest.approx(3e-4)
    assert [e.value for e in events.Scalars("lm_loss_pos_0_4k")] == [v + 1 for v in LOSSES.values()]
    (config_text,) = events.Tensors("config/text_summary")
    assert '"num_layers": 2' in config_text.tensor_proto.string_val[0].decode()

    # wandb (offline): the run's transaction log holds config, history rows and summary. wandb
    # 0.31 writes files/wandb-summary.json only when syncing to a server, so the summary is
    # read from the log's summary records instead.
    (run_path,) = (run_dir / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary, config = [], {}, {}
    for record in _wandb_records(str(run_path)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(_items(record.history.item))
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "run":
            config = _items(record.run.config.update)
            assert record.run.display_name == "offline-run"
            assert record.run.project == "metrics-test"
    assert [(h["_step"], h["lm_loss"]) for h in history] == list(LOSSES.items())
    assert summary["lm_loss"] == LOSSES[3] and summary["_step"] == 3
    assert config["model"] == CONFIG["model"] and config["training"] == CONFIG["training"]


def _open(save_dir, resume_iteration: int) -> MetricsLogger:
    return MetricsLogger(save_dir=str(save_dir), tensorboard_dir=str(save_dir / "tb"),
                         wandb_project=None, wandb_exp_name=None, wandb_save_dir=None, config={},
                         resume_iteration=resume_iteration, enabled=True)


def test_resume_drops_rows_past_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = _open(tmp_path, 0)
    for it in range(1, 7):
        logger.log(it, {"lm_loss": float(it)})
    del logger  # "killed": no close()
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"iteration": 7, "lm_lo')  # a write cut by kill -9
    logger = _open(tmp_path, 4)
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    for it in (5, 6):
        logger.log(it, {"lm_loss": 10.0 * it})
    logger.close()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    expected = [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0)]
    assert [(r["iteration"], r["lm_loss"]) for r in rows] == expected
    # TensorBoard keeps both runs' event files; purge_step hides the killed run's 5 and 6.
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("lm loss")] == expected


def test_console_line_megatron_format():
    metrics = {"consumed_samples": 80, "elapsed_ms_per_iteration": 123.44, "tflops_per_gpu": 1.23,
               "lr": 3e-4, "global_batch_size": 8, "lm_loss": 4.123456, "grad_norm": 0.4561,
               "skipped_iterations": 0, "nan_iterations": 1, "tokens_per_s": 5321.06,
               "peak_memory_gib": 12.345, "mfu": 0.4215, "eta_s": 3723.4,
               "validation_lm_loss": 3.9, "validation_ppl": 49.402, "lm_loss_pos_0_4k": 4.5}
    line = console_line(10, 100, metrics)
    stamp = datetime.strptime(line[2:21], "%Y-%m-%d %H:%M:%S")
    assert abs((datetime.now() - stamp).total_seconds()) < 60
    assert line.startswith(" [") and line[21:].startswith(
        "] iteration       10/     100 | consumed samples:           80 |"
        " elapsed time per iteration (ms): 123.4 | throughput per GPU (TFLOP/s/GPU): 1.2 |"
        " learning rate: 3.000000E-04 | global batch size:     8 | lm loss: 4.123456E+00 |"
        " lm_loss_pos_0_4k: 4.500000E+00 | loss scale: 1.0 | grad norm: 0.456 |"
        " number of skipped iterations:   0 | number of nan iterations:   1 |")
    assert line.endswith(
        " tokens/s: 5321.1 | peak memory (GiB): 12.35 | MFU (%): 42.15 | ETA: 1:02:03 |"
        " validation lm loss: 3.900000E+00 | validation lm loss PPL: 4.940200E+01 |")
    # a CPU's throughput keeps its digits (not "0.0" beside an MFU of 35%)
    assert " (TFLOP/s/GPU): 0.0183 |" in console_line(1, 2, {"tflops_per_gpu": 0.018312})
    # Missing keys are left out; loss scale is always printed, as Megatron-LM does.
    assert console_line(3, 5, {"lm_loss": 2.0}).endswith(
        " iteration        3/       5 | lm loss: 2.000000E+00 | loss scale: 1.0 |")


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(save_dir=str(tmp_path / "save"), tensorboard_dir=str(tmp_path / "tb"),
                           wandb_project="p", wandb_exp_name="e", wandb_save_dir=str(tmp_path),
                           config={"a": 1}, resume_iteration=0, enabled=False)
    logger.log(1, {"lm_loss": 1.0})
    logger.close()
    logger.close()
    assert list(tmp_path.iterdir()) == []


def test_missing_wandb_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'megatron_longctx\[wandb\]'"):
        MetricsLogger(save_dir=str(tmp_path), tensorboard_dir=None, wandb_project="p",
                      wandb_exp_name=None, wandb_save_dir=None, config={}, resume_iteration=0,
                      enabled=True)
    assert list(tmp_path.iterdir()) == []  # fails before creating anything

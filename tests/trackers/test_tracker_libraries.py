"""TensorBoard, Weights & Biases (offline) and MLflow (local file store) trackers: each run's
files read back by the tracker's own library."""

from __future__ import annotations

import pytest
import twinkle
from twinkle.tracker import read_metrics

# three optimizer steps of a training loop, an eval and an RL report
EMISSIONS = [
    ("train", 1, {"loss": 2.0, "lr": 1e-4, "grad_norm": 0.5, "tokens_per_s": 1000.0, "optimizer_step": 1}),
    ("train", 2, {"loss": 1.5, "lr": 9e-5, "grad_norm": 0.4, "tokens_per_s": 1100.0, "optimizer_step": 2}),
    ("eval", 2, {"loss": 1.7}),
    ("rl", 3, {"reward": 0.75, "kl": 0.02, "logprob_abs_diff_max": 0.003, "note": "text is skipped"}),
]


def run(run_dir, trackers):
    with twinkle.initialize(run_dir=run_dir, trackers=trackers) as runtime:
        for source, step, metrics in EMISSIONS:
            runtime.emit_metrics(source, metrics, step=step)


def test_tensorboard_events_read_by_event_accumulator(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, ["jsonl", "tensorboard"])
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "rl/reward", "rl/kl"}
    assert expected <= tags
    assert "rl/note" not in tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.0), (2, 1.5)]
    assert acc.Scalars("rl/reward")[0].step == 3
    assert acc.Scalars("train/lr")[1].value == pytest.approx(9e-5, rel=1e-7)  # float32 storage
    assert len(read_metrics(tmp_path)) == len(EMISSIONS)  # JSONL beside it


def test_mlflow_file_store_read_by_mlflow_client(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    run(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").resolve().as_uri())
    experiment = client.get_experiment_by_name("twinkle")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == tmp_path.name and found.info.status == "FINISHED"
    history = client.get_metric_history(found.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 2.0), (2, 1.5)]
    assert found.data.metrics["rl/reward"] == 0.75
    assert found.data.metrics["eval/loss"] == 1.7
    assert "rl/note" not in found.data.metrics
    assert not (tmp_path / "metrics.jsonl").exists()  # the list is exact: no jsonl asked for


def _wandb_records(path):
    """The protobuf records of a ``.wandb`` transaction log, parsed with W&B's own ``Record`` type.

    The file is W&B's LevelDB-style log (what ``wandb sync`` uploads): a 7-byte ``:W&B`` header,
    then 32 KiB blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full,
    2 first, 3 middle, 4 last). wandb 0.2x dropped its Python reader, so the framing is read here.
    """
    import struct
    import zlib

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # block trailer too short for a header
            offset += block - offset % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind == 0 and length == 0:
            continue
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def _wandb_history(run_dir):
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    rows = []
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): item.value_json for item in record.history.item})
    return rows


def test_wandb_offline_run_read_back(tmp_path, monkeypatch):
    import json

    for name in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run(tmp_path, ["wandb"])
    rows = _wandb_history(tmp_path)
    steps = {int(row["_step"]): row for row in rows}
    assert sorted(steps) == [1, 2, 3]
    assert json.loads(steps[1]["train/loss"]) == 2.0
    assert json.loads(steps[2]["train/loss"]) == 1.5 and json.loads(steps[2]["eval/loss"]) == 1.7
    assert json.loads(steps[3]["rl/kl"]) == 0.02 and "rl/note" not in steps[3]

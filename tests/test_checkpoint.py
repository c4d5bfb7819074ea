"""Checkpoints and resume (in-process runtime; the Ray runtime's are in test_reliability.py)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import decoupled
from decoupled import checkpoint
from decoupled.cli import main


def config(tmp_path, method: dict, **extra) -> dict:
    cfg = {
        "name": "ckpt",
        "runtime": "inprocess",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [32, 32]},
        "split": {"stages": 3},
        "method": method,
        "optimizer": {"lr": 0.05},
        "checkpoint": {"every_steps": 10, "keep": 100},
        "train": {"epochs": 2, "batch_size": 64, "threads": 1, "progress": False},
        "output": {"dir": str(tmp_path / "runs")},
    }
    cfg.update(extra)
    return cfg


def cut_after(run_dir: Path, steps_done: int, into: Path) -> Path:
    """A copy of ``run_dir`` as if it had crashed right after the checkpoint at ``steps_done``."""
    shutil.copytree(run_dir, into)
    for d in checkpoint.root(into).iterdir():
        if int(d.name.split("-")[1]) > steps_done:
            shutil.rmtree(d)
    (into / "summary.json").unlink()
    return into


@pytest.mark.parametrize("method", [{"name": "backprop"}, {"name": "dgl"}, {"name": "dni", "conditioned": True},
                                    {"name": "fa"}, {"name": "dfa"}], ids=lambda m: m["name"])
def test_resume_mid_epoch_gives_exactly_the_uninterrupted_run(tmp_path, method):
    # 1437 training digits / 64 = 22 steps per epoch: step 30 is in the middle of epoch 2
    whole = decoupled.train(config(tmp_path, method))
    run = Path(whole["run_dir"])
    saved = sorted(int(d.name.split("-")[1]) for d in checkpoint.root(run).iterdir())
    assert saved == [10, 20, 22, 30, 40, 44]  # every 10 steps and each epoch's end
    resumed = decoupled.resume(cut_after(run, 30, tmp_path / "cut"))
    assert resumed["resumed_from_step"] == 30 and resumed["steps"] == whole["steps"] == 44
    assert resumed["final_loss"] == whole["final_loss"]
    assert resumed["test_accuracy_per_epoch"] == whole["test_accuracy_per_epoch"]


def test_resume_continues_the_tensorboard_curves(tmp_path):
    whole = decoupled.train(config(tmp_path, {"name": "dgl"}, train={"epochs": 2, "batch_size": 64, "threads": 1,
                                                                      "progress": False, "log_every": 5}))
    cut = cut_after(Path(whole["run_dir"]), 20, tmp_path / "cut")
    decoupled.resume(cut)
    events = EventAccumulator(str(cut))
    events.Reload()
    steps = [e.step for e in events.Scalars("stage0/loss")]
    assert steps == sorted(set(steps))  # each step once: what the cut run logged after step 20 is purged
    assert steps[-1] == 44


def test_only_a_checkpoint_with_its_manifest_counts(tmp_path):
    run = tmp_path / "run"
    checkpoint.save_worker(checkpoint.step_dir(run, 10), 0, {"x": torch.ones(2)})
    checkpoint.write_manifest(run, 10, 1, runtime="inprocess", evals=[])
    # a crash while writing the next one: its worker file is there, its manifest is not
    checkpoint.save_worker(checkpoint.step_dir(run, 20), 0, {"x": torch.zeros(2)})
    (checkpoint.step_dir(run, 20) / ".worker-1.pt.123.tmp").write_bytes(b"half")
    directory, manifest = checkpoint.latest(run)
    assert manifest["steps_done"] == 10 and directory == checkpoint.step_dir(run, 10)
    with pytest.raises(checkpoint.CheckpointError, match="worker"):
        checkpoint.write_manifest(run, 30, 2)  # files missing: never a manifest
    checkpoint.save_worker(checkpoint.step_dir(run, 30), 0, {"x": torch.zeros(2)})
    checkpoint.write_manifest(run, 30, 1, evals=[])
    checkpoint.prune(run, keep=1)
    assert [d.name for d in checkpoint.root(run).iterdir()] == ["step-00000030"]


def test_a_checkpoint_file_is_loaded_without_unpickling_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    directory = tmp_path / "step-00000010"
    directory.mkdir()
    torch.save({"payload": Evil()}, checkpoint.worker_file(directory, 0))
    with pytest.raises(checkpoint.CheckpointError, match="worker-0.pt: cannot load"):
        checkpoint.load_worker(directory, 0)
    checkpoint.worker_file(directory, 1).write_bytes(b"\x80\x02truncated")
    with pytest.raises(checkpoint.CheckpointError, match="worker-1.pt"):
        checkpoint.load_worker(directory, 1)


def test_resume_refuses_what_it_cannot_continue(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "no config.yaml" in capsys.readouterr().err
    whole = decoupled.train(config(tmp_path, {"name": "dgl"}, checkpoint={"enabled": False}))
    assert main(["train", "--resume", whole["run_dir"]]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err
    assert main(["train", "--resume", whole["run_dir"], "train.epochs=3"]) == 2
    assert "--resume" in capsys.readouterr().err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_with_a_checkpoint_and_resume_finishes(tmp_path, sig):
    """Ctrl-C (or a scheduler's SIGTERM) on `decoupled train`: exit 130 within seconds, a checkpoint
    at the step it stopped, and `--resume` runs the remaining steps to the same end."""
    cfg = config(tmp_path, {"name": "dgl"}, checkpoint={"every_steps": 1000},
                 train={"epochs": 30, "batch_size": 64, "threads": 1, "progress": False})
    config_file = tmp_path / "cfg.json"  # JSON is YAML
    config_file.write_text(json.dumps(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "decoupled.cli", "train", "--config", str(config_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = tmp_path / "runs" / "ckpt"
    deadline = time.time() + 60
    while not checkpoint.latest(run) and time.time() < deadline:  # the first epoch's end
        time.sleep(0.05)
    assert checkpoint.latest(run), "no checkpoint within 60 s"
    proc.send_signal(sig)
    sent = time.time()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert time.time() - sent < 10
    assert f"decoupled train --resume {run}" in err
    _, manifest = checkpoint.latest(run)
    stopped_at = manifest["steps_done"]
    assert 22 <= stopped_at < 30 * 22
    assert main(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == stopped_at and summary["steps"] == 30 * 22
    assert len(summary["test_accuracy_per_epoch"]) == 30

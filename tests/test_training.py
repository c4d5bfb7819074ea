"""Whole runs on the offline digits set: every rule learns; runs leave what users read."""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import decoupled
from decoupled.config import build_config

RULES = ["backprop", "dgl", "dni", "fa", "sign_symmetric", "dfa"]


def digits_config(tmp_path, **overrides) -> dict:
    cfg = {
        "name": "digits",
        "runtime": "inprocess",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [64, 64]},
        "split": {"stages": 3},
        "optimizer": {"lr": 0.05},
        "train": {"epochs": 3, "batch_size": 32, "threads": 1, "progress": False,
                  "device": os.environ.get("DECOUPLED_TEST_DEVICE", "cpu")},
        "output": {"dir": str(tmp_path / "runs")},
    }
    cfg.update(overrides)
    return cfg


@pytest.mark.parametrize("rule", RULES)
def test_every_rule_trains_digits_above_chance(tmp_path, rule):
    method = {"name": rule, **({"conditioned": True} if rule == "dni" else {})}
    summary = decoupled.train(digits_config(tmp_path, method=method))
    assert summary["test_accuracy"] > 0.6, summary  # chance is 0.1
    assert summary["method"] == rule and summary["stages"] == 3


def test_summary_config_and_tensorboard_are_written(tmp_path):
    summary = decoupled.train(digits_config(tmp_path, method={"name": "dgl"}))
    run = tmp_path / "runs" / "digits"
    assert summary["run_dir"] == str(run)
    on_disk = json.loads((run / "summary.json").read_text())
    for key in ("method", "schedule", "runtime", "stages", "epochs", "steps", "samples_per_sec", "test_accuracy",
                "wall_seconds", "stage_info"):
        assert key in on_disk, key
    assert on_disk["runtime"] == "inprocess" and on_disk["schedule"] is None
    assert [s["index"] for s in on_disk["stage_info"]] == [0, 1, 2]
    assert all({"pid", "node", "device"} <= set(s) for s in on_disk["stage_info"])
    assert on_disk["steps"] == 3 * (1437 // 32) and on_disk["samples_per_sec"] > 0
    # dgl: every stage but the last has its own classifier, evaluated on the test set
    assert len(on_disk["aux_accuracy"]) == 2 and all(a > 0.5 for a in on_disk["aux_accuracy"])
    # the effective config reloads to the same config
    saved = build_config(__import__("yaml").safe_load((run / "config.yaml").read_text()))
    assert saved.method.name == "dgl" and saved.split.stages == 3
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"stage0/loss", "stage1/loss", "stage2/loss", "test/accuracy", "throughput/samples_per_sec",
            "test/aux_accuracy_stage0"} <= tags
    losses = [e.value for e in events.Scalars("stage2/loss")]
    assert losses[-1] < losses[0]  # the loss goes down


def test_a_second_run_of_the_same_name_gets_its_own_directory(tmp_path):
    cfg = digits_config(tmp_path, train={"epochs": 1, "max_steps": 2, "progress": False})
    first, second = decoupled.train(cfg), decoupled.train(cfg)
    assert first["run_dir"] != second["run_dir"] and second["run_dir"].endswith("digits-2")
    assert first["steps"] == 2


def test_compare_runs_each_method_and_reports_ratios(tmp_path):
    cfg = digits_config(
        tmp_path,
        train={"epochs": 2, "batch_size": 32, "progress": False},
        compare={"methods": [{"name": "backprop"}, {"name": "dgl"}, {"name": "dni", "conditioned": True, "label": "cdni"}]},
    )
    result = decoupled.compare(cfg)
    parent = tmp_path / "runs" / "digits"
    data = json.loads((parent / "comparison.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["backprop", "dgl", "cdni"]
    for r in data["runs"]:
        assert (parent / r["label"] / "summary.json").is_file()
        assert r["speed_ratio"]["backprop"] == pytest.approx(r["samples_per_sec"] / data["runs"][0]["samples_per_sec"])
    table = (parent / "comparison.md").read_text()
    assert "| cdni | dni | 3 |" in table and "× backprop" in table
    assert result["table"] == data["table"]
    from PIL import Image

    for name in ("comparison.png", "learning_curves.png"):  # learning curves: the runs have two epochs
        with Image.open(parent / name) as image:
            assert image.format == "PNG" and image.size[0] > 600
    assert data["plots"] == [str(parent / "comparison.png"), str(parent / "learning_curves.png")]


def test_compare_repeats_interleave_rounds_and_report_medians(tmp_path):
    cfg = digits_config(
        tmp_path,
        train={"epochs": 1, "batch_size": 32, "progress": False},
        compare={"methods": [{"name": "backprop"}, {"name": "dgl"}], "repeats": 3},
    )
    result = decoupled.compare(cfg)
    backprop, dgl = result["runs"]
    assert result["repeats"] == 3
    for r in (backprop, dgl):
        assert len(r["samples_per_sec_runs"]) == 3 and r["samples_per_sec"] == statistics.median(r["samples_per_sec_runs"])
        assert [Path(d).name for d in r["run_dirs"]] == ["rep-0", "rep-1", "rep-2"]
        assert all((Path(d) / "summary.json").is_file() for d in r["run_dirs"])
        assert r["test_accuracy"] == statistics.median(r["test_accuracy_runs"])
    # each ratio is taken within a round, then the median over the rounds
    rounds = [json.loads((Path(d) / "summary.json").read_text())["samples_per_sec"]
              for d in backprop["run_dirs"] + dgl["run_dirs"]]
    per_round = [rounds[3 + k] / rounds[k] for k in range(3)]
    assert dgl["speed_ratio"]["backprop"] == pytest.approx(statistics.median(per_round))
    assert backprop["speed_ratio"]["backprop"] == pytest.approx(1.0)
    spread = f"({min(dgl['samples_per_sec_runs']):.0f}–{max(dgl['samples_per_sec_runs']):.0f})"
    assert spread in result["table"]


def test_quickstart_config_reaches_its_accuracy_targets(tmp_path):
    """The Quickstart's main job (K=4 on digits): backprop >= 0.95, dgl >= 0.93 test accuracy."""
    cfg = decoupled.load_config(
        Path(__file__).parents[1] / "configs" / "quickstart.yaml",
        [f"output.dir={tmp_path}", "train.progress=false", "compare.methods=[{name: backprop}, {name: dgl}]"],
    )
    runs = {r["label"]: r for r in decoupled.compare(cfg)["runs"]}
    assert runs["backprop"]["stages"] == 4
    assert runs["backprop"]["test_accuracy"] >= 0.95
    assert runs["dgl"]["test_accuracy"] >= 0.93

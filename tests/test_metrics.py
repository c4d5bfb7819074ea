"""Throughput accounting and atomic summary files."""

from __future__ import annotations

import json

import pytest
import torch

from decoupled import metrics
from decoupled.metrics import Throughput, write_json_atomic


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_throughput_leaves_out_warmup_steps(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    timer = Throughput(warmup=2, device=torch.device("cpu"))
    timer.begin_epoch()
    for seconds in (10.0, 10.0, 1.0, 1.0):  # two slow start-up steps, then two steady ones
        clock.now += seconds
        timer.step(100)
    assert timer.end_epoch() == pytest.approx(200 / 2.0)
    timer.begin_epoch()
    clock.now += 4.0
    timer.step(100)
    assert timer.end_epoch() == pytest.approx(25.0)
    assert timer.samples_per_sec == pytest.approx(300 / 6.0)


def test_throughput_without_warmup_times_every_step(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(metrics.time, "perf_counter", clock)
    timer = Throughput(warmup=0, device=torch.device("cpu"))
    timer.begin_epoch()
    clock.now += 2.0
    timer.step(10)
    assert timer.end_epoch() == pytest.approx(5.0)


def test_write_json_atomic_replaces_whole_files_and_leaves_no_temp(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"a": 1})
    write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object.__new__(type("Unserialisable", (), {"__str__": None}))})
    assert json.loads(path.read_text()) == {"a": 2}  # the old file survives a failed write
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]

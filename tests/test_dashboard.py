"""`decoupled dashboard`: the layout and mirrored charts it writes, and the TensorBoard it serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2, metadata

import decoupled
from decoupled import (BackpropMethod, ClusterConfig, CompareConfig, Config, DGLMethod, DigitsData, MLPModel,
                       SplitConfig, TrainConfig)
from decoupled.cli import main
from decoupled.dashboard import DashboardWriter, find_runs


@pytest.fixture(scope="module")
def comparison(ray_cluster, tmp_path_factory) -> Path:
    """A small comparison on Ray (whose workers log idle and wait times): E2EBP and DGL, built in code
    as a notebook would."""
    out = tmp_path_factory.mktemp("dash")
    cfg = Config(
        name="dash", runtime="ray", data=DigitsData(name="digits"), model=MLPModel(name="mlp", hidden=[32, 32]),
        split=SplitConfig(stages=2), cluster=ClusterConfig(cpus_per_worker=1),
        train=TrainConfig(epochs=2, batch_size=64, threads=1, progress=False, metrics_every_s=0.2),
        compare=CompareConfig(methods=[BackpropMethod(name="backprop", schedule="naive"), DGLMethod(name="dgl")]),
    ).override(f"output.dir={out}")
    result = decoupled.compare(cfg)
    assert [r["label"] for r in result["runs"]] == ["backprop", "dgl"]
    assert all(r["test_accuracy"] > 0.5 for r in result["runs"])  # the config built in code trains
    return Path(result["parent"])


def read_layout(directory: Path) -> layout_pb2.Layout:
    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    (tag,) = [t for t in events.Tags()["tensors"] if t == metadata.CONFIG_SUMMARY_TAG]
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors(tag)[0].tensor_proto.string_val[0])
    return layout


def scalars(directory: Path) -> dict[str, list]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


def test_the_layout_puts_each_decoupled_method_beside_the_baselines(comparison):
    board = DashboardWriter(comparison)
    assert board.update() > 0
    assert board.update() == 0  # nothing new: points are mirrored once
    board.close()
    layout = read_layout(comparison / "dashboard")
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    assert {cat.title for cat in layout.category} == {"Throughput: decoupled vs E2EBP", "Accuracy: decoupled vs E2EBP",
                                                      "Stages: idle and waiting", "Learning signals"}
    mirrored = {name: scalars(comparison / "dashboard" / name) for name in ("backprop", "dgl")}
    # the decoupled method's chart selects its own line and the baseline's, in their own runs (colours)
    (regex,) = charts["samples/s: dgl (dgl) vs E2EBP"]
    tags = {tag for run in mirrored.values() for tag in run}
    assert {t for t in tags if re.fullmatch(regex, t)} == {"samples_per_sec/dgl", "samples_per_sec/backprop"}
    (regex,) = charts["test accuracy: dgl (dgl) vs E2EBP"]
    assert {t for t in tags if re.fullmatch(regex, t)} == {"test_accuracy/dgl", "test_accuracy/backprop"}
    assert not any(title.startswith("samples/s: backprop") for title in charts)  # baselines get no chart of their own
    # mirrored points are the runs' own, step for step
    for name in ("backprop", "dgl"):
        original = scalars(comparison / name)
        for source, prefix in (("throughput/samples_per_sec", "samples_per_sec"), ("test/accuracy", "test_accuracy")):
            assert [(e.step, e.value) for e in mirrored[name][f"{prefix}/{name}"]] == \
                [(e.step, e.value) for e in original[source]]
        # every per-stage chart draws something the runs logged: idle/wait fractions for each stage
        for title in ("compute fraction (1 - idle)", "waiting for input", "test accuracy (every run)",
                      "loss per stage"):
            (regex,) = charts[title]
            assert any(re.fullmatch(regex, t) for t in original), (name, title)
    assert len(mirrored["dgl"]["test_accuracy/dgl"]) == 2  # one point per epoch
    # a second dashboard on the same directory starts over instead of doubling the points
    board = DashboardWriter(comparison)
    board.update()
    board.close()
    assert len(scalars(comparison / "dashboard" / "dgl")["test_accuracy/dgl"]) == 2
    assert len(list((comparison / "dashboard").glob("events.out.tfevents.*"))) == 1


def test_dashboard_serves_the_comparison_on_loopback(comparison):
    proc = subprocess.Popen([sys.executable, "-m", "decoupled", "dashboard", str(comparison), "--port", "0",
                             "--refresh-s", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "decoupled dashboard exited before serving"
            found = re.search(r"TensorBoard at (http://127\.0\.0\.1:\d+/)", line)
            url = found.group(1) if found else None
        assert url, "no TensorBoard address printed within 120 s"

        def get(path: str):
            with urllib.request.urlopen(url + path, timeout=30) as reply:
                return json.loads(reply.read())

        runs: list = []
        while time.monotonic() < deadline and not {"backprop", "dgl", "dashboard/dgl"} <= set(runs):
            runs = get("data/runs")  # TensorBoard loads the runs in the background
            time.sleep(0.5)
        assert {"backprop", "dgl", "dashboard", "dashboard/backprop", "dashboard/dgl"} <= set(runs)
        served = get("data/plugin/custom_scalars/layout")
        titles = [chart["title"] for cat in served["category"] for chart in cat["chart"]]
        assert "samples/s: dgl (dgl) vs E2EBP" in titles and "waiting for input" in titles
    finally:
        proc.terminate()  # the CLI's own process; TensorBoard runs in its threads (load_fast off)
        proc.wait(timeout=30)


def test_dashboard_names_a_bad_run_dir(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "missing")]) == 2
    assert "RUN_DIR" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path), "--write-only"]) == 2
    assert "holds no runs" in capsys.readouterr().err
    assert main(["dashboard", str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def test_find_runs_reads_each_runs_method(comparison):
    runs = {r.name: r for r in find_runs(comparison)}
    assert set(runs) == {"backprop", "dgl"}
    assert runs["backprop"].e2ebp and not runs["dgl"].e2ebp


def test_config_objects_built_in_code_match_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: {name: digits}\nmodel: {name: mlp, hidden: [32]}\nsplit: {stages: 2}\n"
                    "method: {name: dni, conditioned: true}\n")
    from_yaml = Config.from_yaml(path, ["train.epochs=3"])
    in_code = Config(data=DigitsData(name="digits"), model=MLPModel(name="mlp", hidden=[32]),
                     split=SplitConfig(stages=2), method=decoupled.DNIMethod(name="dni", conditioned=True),
                     train=TrainConfig(epochs=3))
    assert from_yaml == in_code
    with pytest.raises(decoupled.ConfigError, match="train.epochs"):
        in_code.override("train.epochs=0")

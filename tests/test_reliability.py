"""The Ray runtime under failure: killed stage processes, a lost node, a stuck peer, Ctrl-C, NaNs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import decoupled
from decoupled import checkpoint
from decoupled.runtime.links import LinkClosed
from decoupled.runtime.ray_runtime import WorkerFailure, _RayRun
from decoupled.stage import NonFiniteError
from decoupled.stopping import RunFailed, RunStopped

from conftest import _alive, _cmdline

EVERY = 20  # checkpoint interval, in steps (digits, batch 32: 44 steps per epoch)


def digits(tmp_path, method: dict, **extra) -> dict:
    cfg = {
        "name": "rel",
        "runtime": "ray",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [64, 64, 64]},
        "split": {"stages": 2},
        "optimizer": {"lr": 0.05},
        "method": method,
        "cluster": {"cpus_per_worker": 1},
        "links": {"timeout_s": 30},
        "checkpoint": {"every_steps": EVERY, "keep": 10},
        "train": {"epochs": 6, "batch_size": 32, "threads": 1, "progress": False, "metrics_every_s": 0.5},
        "output": {"dir": str(tmp_path)},
    }
    cfg.update(extra)
    return cfg


def when_checkpointed(run: Path, steps: int, action) -> threading.Thread:
    """Run ``action(run)`` once ``run`` has a complete checkpoint at or after ``steps``."""
    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            found = checkpoint.latest(run) if run.exists() else None
            if found and found[1]["steps_done"] >= steps:
                action(run)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def stage_pid(run: Path, stage: int) -> int:
    return json.loads((run / "workers.json").read_text())["stages"][stage]["pid"]


@pytest.mark.parametrize("method,victim", [({"name": "dgl"}, 1),
                                           ({"name": "backprop", "schedule": "gpipe", "microbatches": 4}, 0)],
                         ids=["dgl-stage1", "gpipe-stage0"])
def test_a_killed_stage_process_comes_back_from_its_checkpoint(ray_cluster, tmp_path, method, victim):
    killed: dict = {}

    def kill(run):
        killed["pid"] = stage_pid(run, victim)
        os.kill(killed["pid"], signal.SIGKILL)

    watcher = when_checkpointed(tmp_path / "hit" / "rel", 100, kill)
    hit = decoupled.train(digits(tmp_path / "hit", method))
    watcher.join(1)
    assert killed, "the stage was never killed"
    assert hit["restarts"] == [int(k == victim) for k in range(2)]
    (failure,) = hit["failures"]
    assert failure["stage"] == victim and "died" in failure["cause"]
    # dgl: the survivor keeps its in-memory state; gpipe: everyone rolls back to the checkpoint
    assert failure["kept_in_memory"] == ([0] if method["name"] == "dgl" else [])
    assert failure["steps_done"] - failure["checkpoint_step"] <= EVERY  # at most one interval trained again
    assert hit["steps"] == 6 * 44 and len(hit["test_accuracy_per_epoch"]) == 6
    assert killed["pid"] not in {s["pid"] for s in hit["stage_info"]}  # a new process took over
    calm = decoupled.train(digits(tmp_path / "calm", method))
    assert calm["restarts"] == [0, 0]
    assert abs(hit["test_accuracy"] - calm["test_accuracy"]) <= 0.02, (hit["test_accuracy"], calm["test_accuracy"])


@pytest.mark.parametrize("cut", [44, 60], ids=["epoch-end", "mid-epoch"])
def test_a_resumed_ray_run_ends_where_the_uninterrupted_one_does(ray_cluster, tmp_path, cut):
    """GPipe is deterministic, so a resume on Ray must give the uninterrupted run's numbers: the same
    weights, the same data order after the checkpoint, the same evaluations."""
    method = {"name": "backprop", "schedule": "gpipe", "microbatches": 4}
    common = {"train": {"epochs": 2, "batch_size": 32, "threads": 1, "progress": False, "metrics_every_s": 0.2}}
    whole = decoupled.train(digits(tmp_path / "whole", method, **common))
    run = Path(whole["run_dir"])
    saved = sorted(int(d.name.split("-")[1]) for d in checkpoint.root(run).glob("step-*"))
    assert saved == [20, 40, 44, 60, 80, 88]
    cut_run = tmp_path / "cut"
    shutil.copytree(run, cut_run)
    for d in checkpoint.root(cut_run).glob("step-*"):
        if int(d.name.split("-")[1]) > cut:
            shutil.rmtree(d)
    resumed = decoupled.resume(cut_run)
    assert resumed["resumed_from_step"] == cut and resumed["steps"] == whole["steps"] == 88
    assert resumed["final_loss"] == pytest.approx(whole["final_loss"], rel=1e-6)
    assert resumed["test_accuracy_per_epoch"] == whole["test_accuracy_per_epoch"]
    events = EventAccumulator(str(cut_run))
    events.Reload()
    steps = [e.step for e in events.Scalars("test/accuracy")]
    assert steps == [44, 88]  # the curve continues; nothing logged twice
    progress = [e.step for e in events.Scalars("stage0/compute_fraction")]
    assert progress == sorted(progress) and progress[-1] > cut  # the stages' curves go on from the cut


def test_a_stage_that_keeps_failing_stops_the_run_naming_it(ray_cluster, tmp_path):
    when_checkpointed(tmp_path / "rel", 40, lambda run: os.kill(stage_pid(run, 1), signal.SIGKILL))
    with pytest.raises(RunFailed, match=r"stage 1 failed 1 times \(recovery.max_restarts: 0\); "
                                        r"last failure near step \d+: worker process died"):
        decoupled.train(digits(tmp_path, {"name": "dgl"}, recovery={"max_restarts": 0}))


def test_a_lost_connection_is_blamed_on_the_peer_as_a_death_once_ray_sees_the_peer_gone(ray_cluster):
    """The survivor's broken link is seen first; the report must still say the peer's process died."""
    # (defined here: Ray workers cannot import the tests' modules, so the classes travel by value)
    class SlowToDieStage:  # a killed stage whose death Ray notices only after the driver's first look
        def train_epoch(self, epoch: int) -> None:
            time.sleep(10.0)  # well past the moment (5 s) the driver gives every call before picking a culprit
            os._exit(1)

    class SurvivorStage:
        def train_epoch(self, epoch: int) -> None:
            raise LinkClosed("link stage0->stage1 (peer rank 0) failed: Connection reset by peer", peer=0)

    actors = [ray_cluster.remote(num_cpus=0)(cls).remote() for cls in (SlowToDieStage, SurvivorStage)]
    run = _RayRun.__new__(_RayRun)
    run.ray, run.workers = ray_cluster, SimpleNamespace(actors=actors)
    refs = [a.train_epoch.remote(0) for a in actors]
    ray_cluster.wait(refs[1:], timeout=30)
    with pytest.raises(WorkerFailure) as failed:
        run._get_all(refs[1:], 30, 7, refs)
    assert failed.value.rank == 0
    assert failed.value.cause.startswith("worker process died") and failed.value.cause.endswith("(at step 7)")


def test_a_peer_that_never_answers_is_reported_within_the_timeout(ray_cluster, tmp_path):
    cfg = digits(tmp_path, {"name": "dgl"}, links={"timeout_s": 3, "max_in_flight": 1},
                 recovery={"max_restarts": 0},
                 train={"epochs": 1, "batch_size": 32, "threads": 1, "progress": False, "stage_delay_s": {1: 600}})
    start = time.time()
    with pytest.raises(RunFailed) as failed:
        decoupled.train(cfg)
    # stage 0 waits 3 s to send, the driver gives the others a moment, then stops everything
    assert time.time() - start < 30
    message = str(failed.value)
    assert "stage 1 failed" in message and "stuck: link stage0->stage1, step" in message, message
    assert "rank 1 took nothing for 3 s" in message, message


def test_a_nonfinite_loss_on_a_worker_stops_the_run_without_restarts(ray_cluster, tmp_path):
    cfg = digits(tmp_path, {"name": "dgl"}, optimizer={"lr": 1e12, "momentum": 0.0})
    with pytest.raises(NonFiniteError) as caught:
        decoupled.train(cfg)
    assert caught.value.stage in (0, 1) and caught.value.step >= 0
    assert f"stage {caught.value.stage}, step {caught.value.step}: non-finite" in str(caught.value)
    # stopped at once rather than restarted into the same numbers: no worker was ever replaced
    workers = json.loads((tmp_path / "rel" / "workers.json").read_text())
    assert workers["restarts"] == [0, 0]


@pytest.mark.parametrize("method", [{"name": "backprop", "schedule": "gpipe", "microbatches": 4},
                                    {"name": "backprop", "schedule": "ddp"},
                                    {"name": "dni", "conditioned": True}], ids=["gpipe", "ddp", "cdni"])
def test_a_stop_request_ends_every_worker_at_the_same_step(ray_cluster, tmp_path, method):
    """Lockstep schedules agree on the stop step (a pipeline's later stages follow stage 0): the
    checkpoint is complete and the run resumes to its end."""
    cfg = digits(tmp_path, method, train={"epochs": 20, "batch_size": 32, "threads": 1, "progress": False,
                                          "metrics_every_s": 0.2})
    run = tmp_path / "rel"
    when_checkpointed(run, 1, lambda _: os.kill(os.getpid(), signal.SIGINT))  # the driver's own Ctrl-C
    with pytest.raises(RunStopped) as stopped:
        decoupled.train(cfg)
    total = 20 * (22 if method.get("schedule") == "ddp" else 44)  # ddp: each replica takes half the batches
    _, manifest = checkpoint.latest(run)
    assert 0 < stopped.value.steps_done == manifest["steps_done"] < total
    assert manifest["workers"] == 2  # both workers wrote that step: they stopped together
    summary = decoupled.resume(run)
    assert summary["resumed_from_step"] == manifest["steps_done"]
    assert summary["steps"] == total and len(summary["test_accuracy_per_epoch"]) == 20


def _processes_mentioning(text: str) -> dict[int, str]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and _alive(int(entry.name)) and text in _cmdline(int(entry.name)):
            out[int(entry.name)] = _cmdline(int(entry.name))
    return out


def test_ctrl_c_stops_cleanly_with_a_checkpoint_and_resume_finishes(ray_cluster, tmp_path):
    """`decoupled train` with its own embedded Ray: SIGINT ends it within seconds, leaves no process
    behind, and `--resume` runs the rest."""
    cfg = digits(tmp_path, {"name": "dgl"}, train={"epochs": 30, "batch_size": 32, "threads": 1,
                                                    "progress": False, "metrics_every_s": 0.5},
                 checkpoint={"every_steps": 1000})
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp}
    # its own process group, as a shell job: Ctrl-C in a terminal goes to the whole group
    proc = subprocess.Popen([sys.executable, "-m", "decoupled.cli", "train", "--config", str(config_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    run = tmp_path / "rel"
    deadline = time.time() + 120
    while not checkpoint.latest(run) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert checkpoint.latest(run), proc.communicate()[1] if proc.poll() is not None else "no checkpoint in 120 s"
    workers = json.loads((run / "workers.json").read_text())["stages"]
    assert _processes_mentioning(ray_tmp), "the run's Ray is not running?"
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert time.time() - sent < 20
    assert f"decoupled train --resume {run}" in err
    deadline = time.time() + 10
    while time.time() < deadline and (_processes_mentioning(ray_tmp) or any(_alive(w["pid"]) for w in workers)):
        time.sleep(0.2)
    assert not _processes_mentioning(ray_tmp), _processes_mentioning(ray_tmp)
    assert not any(_alive(w["pid"]) for w in workers)
    _, manifest = checkpoint.latest(run)
    stopped_at = manifest["steps_done"]
    assert 44 <= stopped_at < 30 * 44  # where it stopped, after the first epoch's checkpoint
    summary = decoupled.resume(run)  # on this session's Ray
    assert summary["resumed_from_step"] == stopped_at
    assert summary["steps"] == 30 * 44 and len(summary["test_accuracy_per_epoch"]) == 30
    assert summary["test_accuracy"] > 0.9


def test_a_killed_driver_leaves_no_process_and_a_run_that_resumes(ray_cluster, tmp_path):
    """SIGKILL on `decoupled train` (no chance to clean up): Ray's own reaper ends the embedded
    cluster and the workers, and the newest checkpoint resumes."""
    cfg = digits(tmp_path, {"name": "dgl"}, train={"epochs": 4, "batch_size": 32, "threads": 1,
                                                    "progress": False, "metrics_every_s": 0.5})
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")
    proc = subprocess.Popen([sys.executable, "-m", "decoupled.cli", "train", "--config", str(config_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_TMPDIR": ray_tmp})
    run = tmp_path / "rel"
    deadline = time.time() + 120
    while (not checkpoint.latest(run) or checkpoint.latest(run)[1]["steps_done"] < 40) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    workers = json.loads((run / "workers.json").read_text())["stages"]
    proc.kill()
    proc.wait(30)
    deadline = time.time() + 30
    while time.time() < deadline and (_processes_mentioning(ray_tmp) or any(_alive(w["pid"]) for w in workers)):
        time.sleep(0.2)
    assert not _processes_mentioning(ray_tmp), _processes_mentioning(ray_tmp)
    assert not any(_alive(w["pid"]) for w in workers)
    _, manifest = checkpoint.latest(run)
    summary = decoupled.resume(run)
    assert summary["resumed_from_step"] == manifest["steps_done"] >= 40
    assert summary["steps"] == 4 * 44 and len(summary["test_accuracy_per_epoch"]) == 4


def test_a_lost_node_s_stages_come_back_on_the_nodes_left(tmp_path):
    """A 4-node Ray cluster on this machine (its own processes, not the session's Ray): the stages
    spread over nodes; the node of stage 1 is removed mid-run; the run completes."""
    ray_tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")
    job = Path(__file__).with_name("node_failure_job.py")
    proc = subprocess.run([sys.executable, str(job), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RAY_TMPDIR": ray_tmp})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    before, after, removed = result["workers_before"], result["workers_after"], result["removed"]
    assert before[0]["node_id"] != before[1]["node_id"]  # SPREAD: one stage per node
    assert removed["node_id"] == before[1]["node_id"]
    assert removed["node_id"] not in {w["node_id"] for w in after}  # back on the nodes left
    summary = result["summary"]
    assert summary["restarts"] == [0, 1] and summary["steps"] == 6 * 44
    (failure,) = summary["failures"]
    assert failure["steps_done"] - failure["checkpoint_step"] <= EVERY
    calm = result["undisturbed"]
    assert abs(summary["test_accuracy"] - calm["test_accuracy"]) <= 0.02, (summary["test_accuracy"], calm)
    assert not _processes_mentioning(ray_tmp)


def test_bad_data_exits_2_naming_the_file_before_any_worker_starts(tmp_path):
    import numpy as np
    from PIL import Image

    for split in ("train", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = np.random.default_rng(i).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", format="JPEG")
    bad = tmp_path / "images" / "train" / "dog" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated
    cfg = digits(tmp_path / "runs", {"name": "dgl"}, data={"name": "image_folder", "path": str(tmp_path / "images")},
                 model={"name": "mlp", "hidden": [16]})
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(cfg))
    ray_tmp = tempfile.mkdtemp(prefix="dr", dir="/tmp")
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "decoupled.cli", "train", "--config", str(config_file)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"error: {bad}: cannot decode image" in proc.stderr
    assert not any(Path(ray_tmp).iterdir())  # Ray never started
    assert not (tmp_path / "runs").exists()  # and no run directory was made

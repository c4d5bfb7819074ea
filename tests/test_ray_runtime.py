"""The Ray runtime on local Ray with 2 CPUs: one actor per stage, the same Stage code as in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import decoupled
from decoupled.config import build_config
from decoupled.runtime.links import in_flight_bound
from decoupled.runtime.ray_runtime import RayWorkers, train_ray
from decoupled.train import prepare

DECOUPLED = [
    {"name": "dgl"},
    {"name": "dgl", "replay_buffer": 3, "label": "dgl-replay"},
    {"name": "dni", "conditioned": True, "label": "cdni"},
    {"name": "dni", "predictor_training": "local", "label": "dni-local"},
    {"name": "dfa"},
]
E2EBP = [
    {"name": "backprop", "schedule": "naive", "label": "naive"},
    {"name": "backprop", "schedule": "gpipe", "microbatches": 4, "label": "gpipe"},
    {"name": "backprop", "schedule": "1f1b", "microbatches": 4, "label": "1f1b"},
    {"name": "backprop", "schedule": "ddp", "label": "ddp"},
    {"name": "backprop", "schedule": "single", "label": "single"},
    {"name": "fa"},
]


def digits(tmp_path, stages: int, **extra) -> dict:
    cfg = {
        "name": f"k{stages}",
        "runtime": "ray",
        "data": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [64, 64, 64]},
        "split": {"stages": stages},
        "optimizer": {"lr": 0.05},
        "cluster": {"cpus_per_worker": 2 / stages},
        "links": {"timeout_s": 60},
        "train": {"epochs": 10, "batch_size": 32, "threads": 1, "progress": False, "metrics_every_s": 0.5},
        "output": {"dir": str(tmp_path)},
    }
    cfg.update(extra)
    return cfg


def late_predictor_cosines(run_dir: str, stages: int) -> list[float]:
    """Each boundary's mean cosine between synthetic and true gradient over the second half of the run."""
    events = EventAccumulator(run_dir)
    events.Reload()
    means = []
    for k in range(stages - 1):
        values = [e.value for e in events.Scalars(f"stage{k}/predictor_cosine")]
        late = values[len(values) // 2:]
        means.append(sum(late) / len(late))
    return means


def reference_accuracy(tmp_path, stages: int, method: dict) -> float:
    """The in-process runner on the same config: the reference every Ray mode must reach."""
    inproc = {k: v for k, v in method.items() if k not in ("schedule", "microbatches", "replay_buffer")}
    cfg = digits(tmp_path / "ref", stages, runtime="inprocess", method=inproc)
    return decoupled.train(cfg)["test_accuracy"]


# 8-11 runs on Ray plus their in-process references: about 4 minutes on 2 cores, more when shared
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stages,methods", [(2, DECOUPLED + E2EBP), (4, DECOUPLED + E2EBP[:3])],
                         ids=["K=2", "K=4"])
def test_every_mode_trains_digits_like_the_inprocess_runner(ray_cluster, tmp_path, stages, methods):
    result = decoupled.compare(digits(tmp_path, stages, compare={"methods": methods}))
    runs = {r["label"]: r for r in result["runs"]}
    references: dict[str, float] = {}
    for method in methods:
        label = method.get("label", method["name"])
        run = runs[label]
        assert run["runtime"] == "ray"
        workers = 1 if label == "single" else stages
        pids = {s["pid"] for s in run["stage_info"]}
        assert len(run["stage_info"]) == workers and len(pids) == workers  # one process per stage
        key = json.dumps({k: v for k, v in method.items() if k not in ("label", "schedule", "microbatches",
                                                                        "replay_buffer")}, sort_keys=True)
        if key not in references:
            references[key] = reference_accuracy(tmp_path, stages, method)
        if method["name"] == "dni":
            # On Ray the predictors learn from gradients that arrive 2-10 steps late (the in-flight bound
            # plus a weights round trip), by a number that varies with the load on 2 shared CPUs. Measured
            # against the in-process 0.975 / 0.961 / 0.919: K=2 cDNI 0.964-0.969, K=2 DNI (local)
            # 0.936-0.947, K=4 cDNI 0.878-0.922 (the in-process runner itself spans 0.892-0.928 over
            # seeds 0-5), K=4 DNI (local) 0.864 against 0.875. At K=4, accuracy alone cannot tell working
            # cDNI from broken: with frozen predictors (only the last stage learns) it still reaches
            # 0.861-0.889. So there the accuracy bound only says training did not go wrong, and the
            # predictors' own quality says they learned: an untrained predictor outputs zeros, cosine 0;
            # cDNI measured 0.24-0.57 over 6 runs. (Without the label a predictor can only learn the
            # label-averaged gradient: 0.06-0.29 in-process too, too close to 0 to bound.)
            if stages == 2:
                assert run["test_accuracy"] >= references[key] - 0.035, (label, run["test_accuracy"], references[key])
            else:
                assert run["test_accuracy"] >= references[key] - 0.06, (label, run["test_accuracy"], references[key])
                if method.get("conditioned"):
                    cosines = late_predictor_cosines(run["run_dir"], stages)
                    assert min(cosines) > 0.15, (label, cosines)
            continue
        assert run["test_accuracy"] >= references[key] - 0.02, (label, run["test_accuracy"], references[key])
        assert all(0.0 <= s["compute_fraction"] <= 1.0 for s in run["stage_stats"])
    assert runs["cdni"]["stage_stats"][0]["predictor_loads"] >= 1
    # on CPU each run gets fresh worker processes, so a stage's peak memory is that run's own
    pid_sets = [{s["pid"] for s in r["stage_info"]} for r in result["runs"]]
    assert all(not (a & b) for i, a in enumerate(pid_sets) for b in pid_sets[i + 1:])
    assert all(s["peak_memory_mb"] > 0 for r in result["runs"] for s in r["stage_stats"])
    assert (Path(result["parent"]) / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_naive_stage_logs_its_backward_as_compute_of_the_step(ray_cluster, tmp_path):
    """steps_compute: what the planner's one-stage-at-a-time factor rests on (profile.stage_alone_factor)."""
    cfg, dataset = prepare(build_config(digits(
        tmp_path, 2, method={"name": "backprop", "schedule": "naive"},
        train={"epochs": 1, "max_steps": 12, "batch_size": 32, "threads": 1, "progress": False},
    )))
    with RayWorkers(cfg) as workers:
        train_ray(cfg, tmp_path / "run", dataset, workers)
        timelines = ray_cluster.get([a.steps_timeline.remote() for a in workers.actors])
        computed = ray_cluster.get([a.steps_compute.remote() for a in workers.actors])
    assert [[s for s, _ in c] for c in computed] == [list(range(12))] * 2
    # stage 0's timeline step is its forward; its compute also holds the backward and update that
    # came after stage 1's gradient (a backward costs about two forwards)
    forward = sum(end - start for _, start, end in timelines[0])
    assert sum(s for _, s in computed[0]) > 1.5 * forward
    # neither counts the ~step-long waits for the other stage
    assert all(0 < s < 1.0 for c in computed for _, s in c)


def test_a_slow_stage_holds_back_the_stage_before_it_only_by_the_in_flight_bound(ray_cluster, tmp_path):
    """dgl, stage 1 slowed on purpose: stage 0 runs ahead, but at most the links' bound."""
    m = 2
    cfg, dataset = prepare(build_config(digits(
        tmp_path, 2, method={"name": "dgl"}, links={"max_in_flight": m, "timeout_s": 60},
        train={"epochs": 1, "max_steps": 30, "batch_size": 32, "threads": 1, "progress": False,
               "stage_delay_s": {1: 0.05}},
    )))
    with RayWorkers(cfg) as workers:
        summary = train_ray(cfg, tmp_path / "run", dataset, workers)
        fast, slow = ray_cluster.get([a.steps_timeline.remote() for a in workers.actors])
        places = ray_cluster.get([a.where.remote() for a in workers.actors])
    # every worker process started with malloc told to keep what it frees (train.keep_freed_memory)
    assert all("glibc.malloc.mmap_max=0" in (p["glibc_tunables"] or "") for p in places)
    assert len(fast) == len(slow) == 30
    starts_of_slow = sorted(start for _, start, _ in slow)
    leads = []
    for step, _, end in fast:
        started_downstream = sum(1 for t in starts_of_slow if t <= end)
        leads.append(step + 1 - started_downstream)  # how far stage 0 is ahead when it finishes `step`
    bound = in_flight_bound(m)
    assert max(leads) <= bound
    assert max(leads) >= m  # it does run ahead: it never waits for stage 1's backward
    # and the slow stage sets the pace: stage 0 took about as long as 30 steps of 50 ms
    assert fast[-1][2] - fast[0][1] >= 0.05 * (30 - bound - 1)
    # samples/s is the slow stage's own pace once it is past its warm-up: timing from stage 0's step 5,
    # when stage 0 is already steps ahead, would also count the slow stage's earlier steps (~15% less)
    warmup = cfg.train.warmup_steps
    ends = [end for _, _, end in slow]
    pace = (len(ends) - warmup) * 32 / (ends[-1] - ends[warmup - 1])
    assert summary["samples_per_sec"] == pytest.approx(pace, rel=0.05)


def test_dni_predictors_change_only_through_coordinator_pushes(ray_cluster, tmp_path):
    cfg = digits(tmp_path, 3, method={"name": "dni", "predictor_push_every": 5},
                 train={"epochs": 2, "batch_size": 32, "threads": 1, "progress": False})
    summary = decoupled.train(cfg)
    for stage in summary["stage_stats"][:-1]:
        assert stage["predictor_loads"] >= 2
        assert stage.get("predictor_local_changes", 0) == 0
    assert summary["stage_stats"][1]["sent_samples"] > 0  # stage 1 fed predictor 0's training


@pytest.mark.parametrize("schedule", ["naive", "gpipe", "1f1b"])
def test_pipelined_backprop_first_step_loss_equals_inprocess(ray_cluster, tmp_path, schedule):
    common = {"model": {"name": "mlp", "hidden": [32, 32], "batch_norm": False},
              "train": {"epochs": 1, "max_steps": 1, "batch_size": 32, "threads": 1, "progress": False}}
    ref = decoupled.train(digits(tmp_path / "ref", 2, runtime="inprocess", method={"name": "backprop"}, **common))
    run = decoupled.train(digits(tmp_path, 2, method={"name": "backprop", "schedule": schedule, "microbatches": 4},
                                 **common))
    assert run["schedule"] == schedule and run["steps"] == 1
    assert run["final_loss"] == pytest.approx(ref["final_loss"], rel=1e-5)


def test_a_request_beyond_the_cluster_is_refused_with_the_numbers(ray_cluster, tmp_path, capsys):
    from decoupled.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(digits(tmp_path, 2, method={"name": "dgl"}, cluster={"cpus_per_worker": 4})))
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "cluster.cpus_per_worker: 2 workers x 4 CPUs = 8 CPUs, but the cluster has 2" in err
    assert ray_cluster.util.placement_group_table() == {} or all(
        pg["state"] == "REMOVED" for pg in ray_cluster.util.placement_group_table().values())


def test_a_time_balanced_split_is_fixed_once_before_any_worker_builds_its_stage(tmp_path, monkeypatch):
    """Each worker timing the blocks itself once split the VGG differently on two workers (the receiver
    expected another boundary's activation shape and gloo aborted): train_ray fixes the split first."""
    from decoupled.data import load_dataset
    from decoupled.pipeline import plan_stages
    from decoupled.runtime import ray_runtime

    cfg = build_config(digits(tmp_path, 3, split={"stages": 3, "balance": "time"}))
    dataset = load_dataset(cfg.data, cfg.seed)
    seen = []

    class Run:  # stands in for the run on workers: what each worker's setup would receive
        def __init__(self, cfg, run_dir, dataset, workers):
            seen.append(cfg)

        def run(self, resume):
            return {}

    monkeypatch.setattr(ray_runtime, "_RayRun", Run)
    train_ray(cfg, tmp_path / "run", dataset, workers=object())
    (given,) = seen
    assert given.split.boundaries is not None and len(given.split.boundaries) == 2
    _, plans = plan_stages(given, dataset)  # fixed boundaries: no timing, the same split everywhere
    assert [p.start for p in plans[1:]] == list(given.split.boundaries)
    fixed = build_config(digits(tmp_path, 3, split={"stages": 3, "boundaries": [1, 2]}))
    train_ray(fixed, tmp_path / "run2", dataset, workers=object())
    assert seen[-1].split.boundaries == [1, 2]  # a split already fixed is kept

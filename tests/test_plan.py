"""The scaling planner: its simulation against closed forms, its profile and its command line."""

from __future__ import annotations

import copy
import json

import pytest

from decoupled.cli import main
from decoupled.config import ConfigError, build_config
from decoupled.plan import balanced_split, load_profile, measure_profile, plan, workload
from decoupled.plan.profile import assume_device
from decoupled.plan.simulate import LinkCost, StageTimes, Workload, _pipeline_order, simulate
from decoupled.train import prepare

FREE = LinkCost(0.0, 1e18)  # no link cost: the schedules' own arithmetic shows


def _run(mode: str, stages: list[StageTimes], steps: int = 40, warmup: int = 5, cores=None, link=FREE,
         contention=None, **kw):
    return simulate(Workload(mode, stages, 10, steps, warmup, **kw), link, cores, contention)


def test_single_worker_is_one_step_after_another():
    p = _run("single", [StageTimes(fwd=0.01, bwd=0.02, opt=0.005)])
    assert p.samples_per_sec == pytest.approx(10 / 0.035)
    assert p.idle_fraction == [pytest.approx(0.0)]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("w", [1, 5])
def test_local_losses_pipeline_is_timed_once_every_stage_is_past_its_warm_up(k, w):
    # stage j finishes step i at (i + j + 1) t: the run ends at (N + K - 1) t; stage 0 starts step W
    # at W t, but timing waits for the last stage to finish step W - 1, at (W + K - 1) t: one stage's
    # rate, without the pipeline's fill
    t, n = 0.01, 40
    p = _run("dgl", [StageTimes(fwd=t) for _ in range(k)], steps=n, warmup=w)
    assert p.samples_per_sec == pytest.approx(10 / t)
    # the lockstep schedules are timed from stage 0's step W: their stages are at the same step
    lockstep = _run("gpipe", [StageTimes(fwd_micro=t) for _ in range(k)], steps=n, warmup=w, microbatches=1)
    assert lockstep.samples_per_sec == pytest.approx(10 / (k * t))


def test_naive_model_parallel_is_sequential_including_both_link_directions():
    link = LinkCost(0.001, 1e9)
    stages = [StageTimes(fwd=0.01, bwd=0.02, opt=0.001, out_bytes=1e6) for _ in range(3)]
    p = _run("naive", stages, link=link)
    per_step = 3 * (0.01 + 0.02 + 0.001) + 2 * 2 * link.seconds(1e6)  # 2 boundaries, forward and back
    assert p.samples_per_sec == pytest.approx(10 / per_step, rel=1e-6)


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("k,m", [(2, 4), (4, 8)])
def test_gpipe_and_1f1b_have_the_same_bubble(kind, k, m):
    # equal stages: a step takes (M + K - 1)(f + b) plus the update, under both schedules
    f, b, opt = 0.002, 0.004, 0.001
    p = _run(kind, [StageTimes(fwd_micro=f, bwd_micro=b, opt=opt) for _ in range(k)], microbatches=m)
    assert p.samples_per_sec == pytest.approx(10 / ((m + k - 1) * (f + b) + opt), rel=1e-6)


def test_schedule_overhead_is_paid_per_micro_batch_op_and_per_step():
    f, b, opt, per_step, per_micro = 0.002, 0.004, 0.001, 0.003, 0.002
    p = _run("gpipe", [StageTimes(fwd_micro=f, bwd_micro=b, opt=opt) for _ in range(2)], microbatches=4,
             schedule_overhead=(per_step, per_micro))
    assert p.samples_per_sec == pytest.approx(10 / ((4 + 1) * (f + b + per_micro) + opt + per_step), rel=1e-6)


def test_1f1b_order_matches_torch_schedule():
    # torch's Schedule1F1B: K - k forwards first, then one backward, one forward, ...
    assert _pipeline_order("1f1b", 0, 2, 4) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3),
                                                 ("B", 2), ("B", 3)]
    assert _pipeline_order("1f1b", 1, 2, 4)[:3] == [("F", 0), ("B", 0), ("F", 1)]


def test_shared_cores_are_work_conserving():
    # two local-loss stages on one core: one step of each per batch, one after the other
    p = _run("dgl", [StageTimes(fwd=0.01), StageTimes(fwd=0.03)], steps=200, cores=1)
    assert p.samples_per_sec == pytest.approx(10 / 0.04, rel=0.03)


def test_measured_contention_slows_tasks_that_run_together():
    stages = [StageTimes(fwd=0.01), StageTimes(fwd=0.01)]
    alone = _run("dgl", stages, steps=200, cores=2)
    together = _run("dgl", stages, steps=200, cores=2, contention={"2": 1.5})
    assert together.samples_per_sec == pytest.approx(alone.samples_per_sec / 1.5, rel=0.02)
    naive = [StageTimes(fwd=0.01, bwd=0.01), StageTimes(fwd=0.01, bwd=0.01)]
    # one stage at a time: nothing to contend with
    assert _run("naive", naive, cores=2, contention={"2": 1.5}).samples_per_sec == pytest.approx(
        _run("naive", naive, cores=2).samples_per_sec)


def test_contention_slows_a_task_only_while_another_runs_beside_it():
    # stage 1 (30 ms) always runs; stage 0's 10 ms run beside it, at 1.5x: 15 ms. Stage 1 is slowed
    # for those 15 ms only, doing 10 ms of its work in them: 15 + 20 ms a step
    f = 1.5
    p = _run("dgl", [StageTimes(fwd=0.01), StageTimes(fwd=0.03)], steps=400, cores=2, contention={"2": f})
    assert p.samples_per_sec == pytest.approx(10 / (0.01 * f + 0.02), rel=0.01)
    # three at once on three cores, interpolated halfway to the measured 4: everyone at 1.25x
    three = [StageTimes(fwd=0.02) for _ in range(3)]
    q = _run("ddp", three, steps=100, cores=3, contention={"2": 1.0, "4": 1.5})
    assert q.samples_per_sec == pytest.approx(30 / (0.02 * 1.25), rel=1e-6)
    # three on two cores time-slice, as the OS runs them: all three end at 30 ms (2/3 of a core
    # each, at the 2-task slowdown), not two at 20 ms and the third at 40
    r = _run("ddp", three, steps=100, cores=2)
    assert r.samples_per_sec == pytest.approx(30 / 0.03, rel=1e-6)
    assert _run("ddp", three, steps=100, cores=2, contention={"2": 1.2}).samples_per_sec \
        == pytest.approx(30 / (0.03 * 1.2), rel=1e-6)


def test_a_split_stage_alone_runs_at_the_measured_one_task_factor_a_whole_net_worker_as_profiled():
    # naive model parallel: one stage computes at a time, each at the 1-task factor (1.1x)
    stages = [StageTimes(fwd=0.01, bwd=0.02), StageTimes(fwd=0.03, bwd=0.04)]
    contention = {"1": 1.1, "2": 1.3}
    p = _run("naive", stages, steps=50, cores=2, contention=contention)
    assert p.samples_per_sec == pytest.approx(10 / (0.1 * 1.1), rel=1e-6)
    # a single worker holds the whole net, as the profile timed it: the split stages' factor is not its
    whole = [StageTimes(fwd=0.04, bwd=0.06)]
    assert _run("single", whole, cores=2, contention=contention).samples_per_sec == pytest.approx(10 / 0.1)
    # data parallel replicas compute side by side: the 2-task factor only
    replicas = [StageTimes(fwd=0.04, bwd=0.06) for _ in range(2)]
    assert _run("ddp", replicas, steps=50, cores=2, contention=contention).samples_per_sec \
        == pytest.approx(20 / (0.1 * 1.3), rel=1e-6)


def test_message_copies_take_core_time_at_both_ends_only_on_shared_cores():
    # each batch's 1 MB costs 10 ms of CPU at the sender and 10 ms at the receiver: on two shared
    # cores, 2 x 20 ms of compute and 20 ms of copies per batch take 30 ms; with a core for each
    # copy, or a device per worker (cores=None), the copies cost the stages nothing
    link = LinkCost(0.0, 1e18, cpu_s_per_byte=1e-8)
    stages = [StageTimes(fwd=0.02, out_bytes=1e6), StageTimes(fwd=0.02)]
    assert _run("dgl", stages, steps=200, cores=2, link=link).samples_per_sec == pytest.approx(10 / 0.03, rel=0.03)
    for cores in (4, None):
        p = _run("dgl", stages, steps=200, cores=cores, link=link)
        assert p.samples_per_sec == pytest.approx(10 / 0.02, rel=0.02)
        assert p.idle_fraction[1] < 0.02  # the copies are gloo's work, not the stage's
    # data parallel: each replica's 5 ms copies run while both replicas wait 10 ms for the ring
    replicas = [StageTimes(fwd=0.01, bwd=0.02, opt=0.001) for _ in range(2)]
    free = _run("ddp", replicas, cores=2, link=LinkCost(0.0, 1e8), allreduce_bytes=1e6)
    copied = _run("ddp", replicas, cores=2, link=LinkCost(0.0, 1e8, cpu_s_per_byte=5e-9), allreduce_bytes=1e6)
    assert copied.samples_per_sec == pytest.approx(free.samples_per_sec, rel=1e-6)
    # ... but they slow the replicas when their copies take longer than the ring
    slow = _run("ddp", replicas, cores=2, link=LinkCost(0.0, 1e8, cpu_s_per_byte=4e-8), allreduce_bytes=1e6)
    assert slow.samples_per_sec < 0.85 * free.samples_per_sec


def test_a_slow_stage_sets_the_pace_and_the_fast_one_waits_to_send():
    p = _run("dgl", [StageTimes(fwd=0.01), StageTimes(fwd=0.02)], steps=200, max_in_flight=1)
    assert p.samples_per_sec == pytest.approx(10 / 0.02, rel=0.03)
    assert p.idle_fraction[0] == pytest.approx(0.5, abs=0.03)
    assert p.idle_fraction[1] < 0.02


def test_replay_buffer_lets_the_slow_upstream_stage_set_the_rate_without_waiting():
    stages = [StageTimes(fwd=0.02), StageTimes(fwd=0.01)]
    plain = _run("dgl", stages, steps=200)
    replay = _run("dgl-replay", stages, steps=200, replay_capacity=4, replay_max_reuse=4)
    assert plain.idle_fraction[1] == pytest.approx(0.5, abs=0.03)  # waits for input
    assert replay.idle_fraction[1] < 0.05  # trains on buffered inputs meanwhile
    assert replay.samples_per_sec == pytest.approx(plain.samples_per_sec, rel=0.03)  # fresh data: stage 0's rate


def test_dni_coordinator_falls_behind_and_drops_samples_when_training_is_slow():
    stages = [StageTimes(fwd=0.01, train_s=0.05), StageTimes(fwd=0.01)]
    p = _run("dni", stages, steps=100, sample_rate=1.0, max_outstanding=4)
    assert p.samples_per_sec == pytest.approx(10 / 0.01 * 95 / 96, rel=0.02)  # the stages never wait for it
    assert p.coordinator_utilisation[0] > 0.9
    assert p.dropped_samples[0] > 50
    shared = _run("dni", stages, steps=100, sample_rate=1.0, max_outstanding=4, cores=2)
    assert shared.samples_per_sec < 0.8 * p.samples_per_sec  # on two shared cores it takes the stages' time


def test_dni_stages_pay_for_their_weight_requests_and_the_host_for_answering_them():
    # own devices: stage 0 asks every step (10 ms + 5 ms), or every 5th (10 ms + 1 ms on average)
    stages = [StageTimes(fwd=0.01, weights_s=0.005, weights_host_s=0.02), StageTimes(fwd=0.005)]
    every = _run("dni", stages, steps=200, sample_rate=0.01)
    fifth = _run("dni", stages, steps=200, sample_rate=0.01, push_every=5)
    assert every.samples_per_sec == pytest.approx(10 / 0.015, rel=0.02)
    assert fifth.samples_per_sec == pytest.approx(10 / 0.011, rel=0.02)
    # one shared core: the answers' 20 ms per request take the stages' time too
    quiet = [StageTimes(fwd=0.01, weights_s=0.005), StageTimes(fwd=0.005)]
    shared = _run("dni", stages, steps=200, sample_rate=0.01, cores=1)
    assert shared.samples_per_sec == pytest.approx(10 / (0.015 + 0.005 + 0.02), rel=0.03)
    assert _run("dni", quiet, steps=200, sample_rate=0.01, cores=1).samples_per_sec == pytest.approx(10 / 0.02, rel=0.03)


def test_workload_takes_the_coordinator_costs_measured_through_ray():
    profile = {"batch_size": 10, "num_classes": 2, "blocks": [
        {"fwd_s": {"10": 0.01}, "bwd_s": {"10": 0.02}, "bwd_input_s": {"10": 0.03}, "opt_s": 0.001,
         "output_bytes": 4} for _ in range(2)],
        "boundaries": [{"methods": {"dni": {"predict_s": 0.002, "train_s": 0.004, "submit_s": 0.0001}}}]}
    cfg = build_config(_tiny_config())
    dni = build_config(_tiny_config(method={"name": "dni", "predictor_push_every": 3})).method
    bare = workload(profile, dni, [1], cfg, steps=8)
    assert (bare.stages[0].train_s, bare.stages[1].submit, bare.stages[0].weights_s) == (0.004, 0.0001, 0.0)
    profile["boundaries"][0]["methods"]["dni"].update(
        ray_submit_s=0.003, coordinator_sample_s=0.009, weights_request_s=0.002, weights_host_s=0.005)
    w = workload(profile, dni, [1], cfg, steps=8)
    assert (w.stages[0].train_s, w.stages[1].submit) == (0.009, 0.003)  # Ray's path replaces training alone
    assert (w.stages[0].weights_s, w.stages[0].weights_host_s, w.push_every) == (0.002, 0.005, 3)
    assert w.stages[0].fwd == pytest.approx(0.01 + 0.002 + 0.02 + 0.001)


def test_coordinator_path_is_measured_through_ray_with_the_runtime_actor(ray_cluster):
    import torch

    from decoupled.plan.profile import measure_coordinator_path

    cfg = build_config(_tiny_config())
    cdni = next(m for m in cfg.compare.methods if m.name == "dni")
    outputs = [torch.randn(32, 4, 4, 4), torch.randn(32, 8, 2, 2)]
    boundaries = [{"methods": {"cdni": {"train_s": 0.001}}} for _ in outputs]
    costs = measure_coordinator_path([cdni], outputs, torch.randint(0, 3, (32,)), 3, boundaries, samples=3,
                                     requests=3, idle_s=0.2)
    assert list(costs) == ["cdni"] and len(costs["cdni"]) == 2
    for c in costs["cdni"]:
        assert set(c) == {"ray_submit_s", "coordinator_sample_s", "weights_request_s", "weights_host_s"}
        # a Ray call and a training step take time: none of them is free or a placeholder
        assert 0 < c["ray_submit_s"] < 1 and 0 < c["coordinator_sample_s"] < 5 and 0 < c["weights_request_s"] < 1
    assert ray_cluster.is_initialized()  # a Ray it did not start is left running


def test_runtime_contention_probe_times_the_stages_inside_the_runtime(ray_cluster, tiny_profile):
    from decoupled.plan.profile import measure_runtime_contention

    cfg, profile = tiny_profile
    dgl = next(m for m in cfg.compare.methods if m.name == "dgl")
    _, dataset = prepare(build_config(_tiny_config()))
    record: dict = {}
    factor = measure_runtime_contention(cfg, dataset, profile, dgl, steps=8, record=record)
    assert set(factor) == {"1", "2"}
    # ratios of the runtime's steps to the profile's, not placeholders
    assert 1.0 <= factor["1"] < 20.0 and 0.3 < factor["2"] < 20.0
    # one stage at a time (naive model parallel): each stage's forward, backward and update were timed
    assert len(record["alone_compute_s"]) == 2 and all(s > 0 for s in record["alone_compute_s"])
    assert record["alone_expected_s"][1] > 0 and record["alone_host_speed"] > 0
    # a stage slowed on purpose inside the runtime (train.stage_delay_s) shows: the probe times the
    # workers' own steps, not the profile's process
    slowed = build_config(_tiny_config(train={"batch_size": 32, "threads": 1, "epochs": 1,
                                              "stage_delay_s": {0: 0.05, 1: 0.05}}))
    delayed = measure_runtime_contention(slowed, dataset, profile, dgl, steps=8)
    # 50 ms a step on each stage against a few ms of compute (the factor is also scaled by how fast
    # this process runs the net now, so the delay shows through that scaling, not exactly: 21x here)
    assert delayed["1"] > 5 * factor["1"]  # naive's steps: the delay counts as the stage's compute
    assert delayed["2"] > 5 * factor["2"] or delayed["2"] > 5  # (over 2x: the plain ratio, see pair_slowdown)
    assert ray_cluster.is_initialized()  # a Ray it did not start is left running


def test_pair_slowdown_counts_only_the_part_of_a_step_another_stage_computes_beside_it():
    from decoupled.plan.profile import pair_slowdown, step_overlaps

    def steps(offset, n=10, period=0.2, length=0.1):
        return [(i, offset + i * period, offset + i * period + length) for i in range(n)]

    def slowdown(timelines, speed=1.0):
        return pair_slowdown(step_overlaps(timelines, 2), [0.08, 0.08], speed)

    # two stages computing at the same times: 100 ms steps for 80 ms of work each, 1.25x
    assert step_overlaps([steps(0.0), steps(0.05)], 2) == [pytest.approx((0.1, 0.5))] * 2
    assert slowdown([steps(0.0), steps(0.0)]) == pytest.approx(1.25)
    # half of each step beside the other: 50 ms alone do 50 ms of work, the other 50 ms only 30 ms
    # of it, so two at once run at 1/0.6 (the whole step's plain ratio, 1.25, would understate it)
    assert slowdown([steps(0.0), steps(0.05)]) == pytest.approx(0.05 / 0.03)
    # the host runs everything 10% slower now than when the profile was timed: that is not contention
    assert slowdown([steps(0.0), steps(0.05)], speed=1.1) == pytest.approx(0.05 / (0.088 - 0.05))
    # one step in ten twice as long: throughput pays for it, so the mean counts it (a median would not)
    slow = steps(0.0, n=12)
    slow[6] = (6, slow[6][1], slow[6][1] + 0.2)
    # (the other stage's step 6 ends halfway, its step 7 starts as this one ends: the rest runs alone)
    assert step_overlaps([slow, steps(0.0, n=12)], 2)[0] == pytest.approx((0.11, 1.0 / 1.1))
    # barely overlapped (10%): contention cannot be told from overhead, the plain ratio stands
    assert slowdown([steps(0.0), steps(0.09)]) == pytest.approx(1.25)
    # each step's 50 ms alone already do 50 of its 55 ms of work, so its 50 ms beside the other would
    # run 10x slower: overhead, not two tasks on two cores (at most 2x); the plain ratio stands
    assert pair_slowdown(step_overlaps([steps(0.0), steps(0.05)], 2), [0.055, 0.055], 1.0) == pytest.approx(0.2 / 0.11)
    # stages that compute 1.25x slower even one at a time (``alone``): the 50 ms alone did 40 ms of the
    # work, so the 50 ms beside the other did 40 ms too: 1.25x, not 1/0.6
    assert pair_slowdown(step_overlaps([steps(0.0), steps(0.05)], 2), [0.08, 0.08], 1.0, alone=1.25) \
        == pytest.approx(1.25)


def test_stage_alone_factor_is_the_stages_mean_compute_after_warm_up_over_the_profiles():
    from decoupled.plan.profile import stage_alone_factor

    # stage 0: 30 ms a step after a slow first step, stage 1: 60 ms; the profile says 25 + 50 ms
    computed = [[(0, 0.5), (1, 0.03), (2, 0.03)], [(0, 0.9), (1, 0.06), (2, 0.06)]]
    assert stage_alone_factor(computed, [0.025, 0.05], 1.0, warmup=1) == pytest.approx(1.2)
    # the host runs 20% slower now than when the profile was timed: the stages compute as profiled
    assert stage_alone_factor(computed, [0.025, 0.05], 1.2, warmup=1) == pytest.approx(1.0)
    # faster than the profile (noise, a faster host minute): never under 1, the runtime adds work
    assert stage_alone_factor(computed, [0.025, 0.05], 1.5, warmup=1) == 1.0


def test_data_parallel_adds_the_ring_all_reduce():
    link = LinkCost(1e-4, 1e9)
    stages = [StageTimes(fwd=0.01, bwd=0.02, opt=0.001) for _ in range(4)]
    p = _run("ddp", stages, link=link, allreduce_bytes=8e6)
    ring = 2 * 3 / 4 * 8e6 / 1e9 + 2 * 3 * 1e-4
    step = 0.031 + ring + 2 * link.latency_s  # two barriers: the stop flag and the gradients
    assert p.samples_per_sec == pytest.approx(4 * 10 / step, rel=1e-3)
    # replicas in lockstep, measured 1.1x their unsynchronised step (profile.measure_ddp_lockstep)
    slow = _run("ddp", stages, link=link, allreduce_bytes=8e6, lockstep=1.1)
    assert slow.samples_per_sec == pytest.approx(4 * 10 / (step + 0.1 * 0.03), rel=1e-3)


def test_ddp_lockstep_probe_compares_ddp_with_the_same_processes_unsynchronised():
    from decoupled.plan.profile import measure_ddp_lockstep

    cfg, dataset = prepare(build_config(_tiny_config()))
    factor = measure_ddp_lockstep(cfg, dataset, rounds=2, steps=4)
    # a ratio of two timed steps, never under 1 (lockstep cannot be faster than the replicas' own pace)
    assert 1.0 <= factor < 10.0


def test_dfa_waits_only_beyond_the_in_flight_bound():
    # the error takes a long way back: with room for 8 graphs, stage 0 keeps forwarding meanwhile
    # (a link's sender thread sends one message at a time: latency counts per message, in order)
    link = LinkCost(0.015, 1e18)
    stages = [StageTimes(fwd=0.01, bwd=0.01), StageTimes(fwd=0.01)]
    loose = _run("dfa", stages, link=link, steps=100, max_in_flight=8)
    tight = _run("dfa", stages, link=link, steps=100, max_in_flight=1)
    assert loose.samples_per_sec == pytest.approx(10 / 0.02, rel=0.05)  # stage 0's own pace
    assert loose.samples_per_sec > 1.3 * tight.samples_per_sec


# ------------------------------------------------------------------ profile and plan


def _tiny_config(**overrides) -> dict:
    raw = {
        "name": "plan-test", "seed": 0, "runtime": "ray",
        "data": {"name": "synthetic", "shape": [3, 8, 8], "train_size": 256, "test_size": 32},
        "model": {"name": "vgg", "widths": [4, 8, 8], "convs_per_block": 1},
        "split": {"stages": 2},
        "train": {"batch_size": 32, "threads": 1, "epochs": 1},
        "compare": {"methods": [
            {"name": "backprop", "schedule": "single", "label": "single"},
            {"name": "backprop", "schedule": "gpipe", "microbatches": 4, "label": "gpipe"},
            {"name": "backprop", "schedule": "1f1b", "microbatches": 2, "label": "1f1b"},
            {"name": "backprop", "schedule": "ddp", "label": "ddp"},
            {"name": "dgl", "aux_hidden": 8},
            {"name": "dni", "conditioned": True, "predictor_hidden": 4, "label": "cdni"},
            {"name": "dfa"},
        ]},
    }
    raw.update(overrides)
    return raw


@pytest.fixture(scope="module")
def tiny_profile():
    cfg, dataset = prepare(build_config(_tiny_config()))
    return cfg, measure_profile(cfg, dataset, list(cfg.compare.methods), repeats=2, link=False, contention=False)


def test_link_probe_measures_latency_bandwidth_and_the_cpu_of_the_copies():
    from decoupled.plan.profile import measure_link

    link = measure_link(repeats=3)
    assert link["latency_s"] >= 0 and link["bandwidth_bytes_per_s"] > 1e6
    # a loopback byte costs each end CPU for its copies: more than nothing, less than a second per MB
    assert 0 < link["cpu_s_per_byte"] < 1e-6


def test_contention_probe_alternates_alone_and_together_and_ends_its_processes():
    import os

    from conftest import _cmdline, _descendants

    from decoupled.plan.profile import measure_contention

    cfg, dataset = prepare(build_config(_tiny_config()))
    before = _descendants(os.getpid())
    factor = measure_contention(cfg, dataset, 2, rounds=2, phase_s=0.05)
    assert set(factor) == {"1", "2"} and factor["1"] == 1.0
    assert 0.3 < factor["2"] < 5.0  # a ratio of two step times on this machine, not a placeholder
    left = {p for p in _descendants(os.getpid()) - before if "resource_tracker" not in _cmdline(p)}
    assert left == set()  # both probe processes joined (multiprocessing's tracker lives as long as we do)


def test_profile_times_every_block_size_and_rule(tiny_profile):
    cfg, profile = tiny_profile
    assert profile["sizes"] == [32, 16, 8]  # the batch, and the micro-batches of 1f1b (M=2) and gpipe (M=4)
    assert len(profile["blocks"]) == 4 and len(profile["boundaries"]) == 3
    for blk in profile["blocks"]:
        assert set(blk["fwd_s"]) == {"32", "16", "8"} and all(v > 0 for v in blk["fwd_s"].values())
        assert blk["flops"]["32"]["bwd"] > 0
        # GPipe's micro-batches (M=4: 8 samples) also with the batch's others kept; 1f1b's are not
        assert set(blk["fwd_live_s"]) == set(blk["bwd_input_live_s"]) == {"8"} and blk["fwd_live_s"]["8"] > 0
    assert profile["blocks"][0]["output_bytes"] == 4 * 4 * 4 * 4  # 4 channels at 4x4, float32
    extras = profile["boundaries"][0]["methods"]
    assert extras["dgl"]["aux_s"] > 0 and extras["cdni"]["train_s"] > 0 and extras["dfa"]["project_s"] > 0


def _blocks_and_whole_net_gradients(train: bool = True):
    """The tiny config's blocks, an input, and the parameters' gradients of one backward through
    the whole net (with a gradient of ones); the blocks' own gradients are cleared after."""
    import torch
    from torch import nn

    from decoupled.models import build_blocks

    torch.manual_seed(0)
    blocks = build_blocks(build_config(_tiny_config()).model, (3, 8, 8), 10)
    for block in blocks:
        block.train(train)
    x = torch.randn(16, 3, 8, 8)
    out = nn.Sequential(*blocks)(x)
    out.backward(torch.ones_like(out))
    reference = [p.grad.clone() for p in nn.Sequential(*blocks).parameters()]
    for block in blocks:
        block.zero_grad(set_to_none=True)
    return blocks, x, reference


def test_blocks_are_timed_in_a_pass_that_is_the_whole_nets_backprop():
    import torch
    from torch import nn

    from decoupled.split import pass_times

    blocks, x, reference = _blocks_and_whole_net_gradients()
    times = pass_times(blocks, x, True)
    assert len(times) == len(blocks) and all(f > 0 and b > 0 for f, b in times)
    for p, ref in zip(nn.Sequential(*blocks).parameters(), reference):
        torch.testing.assert_close(p.grad, ref)  # each block got its successor's real gradient
    for block in blocks:
        block.zero_grad(set_to_none=True)
    pass_times(blocks, x, False)  # no input gradients: each block gets ones
    last = list(blocks[-1].parameters())
    torch.testing.assert_close(last[-1].grad, reference[-1])  # the last block's gradient is the same
    assert not torch.allclose(list(blocks[0].parameters())[0].grad, reference[0])


def test_a_chunked_pass_keeps_every_micro_batch_until_the_backwards_and_sums_their_gradients():
    import torch
    from torch import nn

    from decoupled.split import pass_times

    # eval: BatchNorm normalises a micro-batch as it does the batch, so the gradients can add up
    blocks, x, reference = _blocks_and_whole_net_gradients(train=False)
    kept = []
    real_backward = torch.Tensor.backward

    def backward(tensor, *args, **kwargs):  # how many micro-batches' outputs are alive at each backward
        kept.append(len(outputs))
        return real_backward(tensor, *args, **kwargs)

    outputs = []
    hooks = [blocks[-1].register_forward_hook(lambda m, i, o: outputs.append(o))]
    torch.Tensor.backward = backward
    try:
        times = pass_times(blocks, x, True, chunks=4)
    finally:
        torch.Tensor.backward = real_backward
        for h in hooks:
            h.remove()
    assert len(times) == len(blocks) and all(f > 0 and b > 0 for f, b in times)
    assert len(outputs) == 4 and kept[0] == 4  # all four forwarded before the first backward
    for p, ref in zip(nn.Sequential(*blocks).parameters(), reference):
        torch.testing.assert_close(p.grad, ref)  # the micro-batches' gradients add up to the batch's


def test_gpipe_takes_the_micro_batch_times_measured_with_the_others_kept(tiny_profile):
    cfg, profile = tiny_profile
    profile = copy.deepcopy(profile)
    for blk in profile["blocks"]:  # make the kept-in-memory times stand out
        for name in ("fwd", "bwd", "bwd_input"):
            blk[f"{name}_live_s"]["8"] = 10 * blk[f"{name}_s"]["8"]
    gpipe = next(m for m in cfg.compare.methods if m.label == "gpipe")
    onef1b = next(m for m in cfg.compare.methods if m.label == "1f1b")
    w = workload(profile, gpipe, [2], cfg, steps=8)
    b0, b1 = profile["blocks"][0], profile["blocks"][1]
    assert w.stages[0].fwd_micro == pytest.approx(10 * (b0["fwd_s"]["8"] + b1["fwd_s"]["8"]))
    assert w.stages[0].bwd_micro == pytest.approx(10 * (b0["bwd_s"]["8"] + b1["bwd_input_s"]["8"]))
    w = workload(profile, onef1b, [2], cfg, steps=8)  # 1F1B keeps at most K micro-batches: the plain times
    assert w.stages[0].fwd_micro == pytest.approx(b0["fwd_s"]["16"] + b1["fwd_s"]["16"])
    assumed = assume_device(profile, tflops=100.0, overhead_us=5.0)  # another device: no CPU memory effect
    assert "fwd_live_s" not in assumed["blocks"][0]


def test_plan_predicts_every_method_and_balances_the_split(tiny_profile):
    cfg, profile = tiny_profile
    link = {"latency_s": 1e-5, "bandwidth_bytes_per_s": 1e9, "source": "test"}
    result = plan(cfg, 2, profile, link=link, cores=None)
    labels = [p["label"] for p in result["predictions"]]
    assert labels == [m.display_name() for m in cfg.compare.methods]
    assert all(p["samples_per_sec"] > 0 for p in result["predictions"])
    by = {p["label"]: p for p in result["predictions"]}
    assert len(by["dgl"]["idle_fraction"]) == 2 and len(by["single"]["idle_fraction"]) == 1
    assert by["ddp"]["samples_per_sec"] > by["single"]["samples_per_sec"]  # two replicas, own devices
    four = plan(cfg, 4, profile, link=link, cores=None)
    assert len(four["boundaries"]) == 3 and four["boundaries"] == balanced_split(profile, 4)


def test_workload_composes_stage_times_from_blocks(tiny_profile):
    cfg, profile = tiny_profile
    dgl = next(m for m in cfg.compare.methods if m.name == "dgl")
    w = workload(profile, dgl, [2], cfg, steps=8)
    b0, b1 = profile["blocks"][0], profile["blocks"][1]
    aux = profile["boundaries"][1]["methods"]["dgl"]["aux_s"]
    expected = (b0["fwd_s"]["32"] + b1["fwd_s"]["32"] + aux + b0["bwd_s"]["32"] + b1["bwd_input_s"]["32"]
                + b0["opt_s"] + b1["opt_s"])
    assert w.stages[0].fwd == pytest.approx(expected)


def test_a_saved_profile_plans_elsewhere_and_a_wrong_one_is_refused(tiny_profile, tmp_path, capsys):
    cfg, profile = tiny_profile
    profile = dict(profile, link={"latency_s": 1e-5, "bandwidth_bytes_per_s": 1e9, "source": "test"})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(profile))
    config = tmp_path / "c.yaml"
    import yaml

    config.write_text(yaml.safe_dump(_tiny_config()))
    out = tmp_path / "plan.json"
    assert main(["plan", "--config", str(config), "--workers", "3", "--profile", str(path), "--cores", "none",
                 "--link", "gpu-cluster", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["workers"] == 3 and result["link"]["bandwidth_bytes_per_s"] == 25e9
    assert "| dgl |" in capsys.readouterr().out
    assert load_profile(path)["batch_size"] == 32
    with pytest.raises(ConfigError, match="train.batch_size"):
        plan(build_config(_tiny_config(train={"batch_size": 64, "threads": 1})), 2, profile)
    # predicted against measured: the measured runs' split is used, and every error printed
    comparison = tmp_path / "comparison.json"
    comparison.write_text(json.dumps({"runs": [
        {"label": "dgl", "stages": 2, "samples_per_sec": 1000.0, "split": [{"index": 0, "blocks": [0, 1]},
                                                                           {"index": 1, "blocks": [1, 4]}]},
        {"label": "single", "stages": 1, "samples_per_sec": 500.0, "split": [{"index": 0, "blocks": [0, 4]}]}]}))
    assert main(["plan", "--config", str(config), "--workers", "2", "--profile", str(path), "--measured",
                 str(comparison), "--json", str(out), "--plot", str(tmp_path / "plan.png")]) == 0
    result = json.loads(out.read_text())
    assert result["boundaries"] == [1]
    by = {v["label"]: v for v in result["validation"]}
    assert set(by) == {"dgl", "single"}
    assert by["dgl"]["error"] == pytest.approx(by["dgl"]["predicted"] / 1000.0 - 1.0)
    assert "largest error" in capsys.readouterr().out
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plan", "--config", str(config), "--workers", "9", "--profile", str(path)]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main(["plan", "--config", str(config), "--workers", "2", "--profile", str(path), "--link", "fast"]) == 2
    assert "--link" in capsys.readouterr().err

"""``decoupled plan``: predict samples/s and idle time of every method at K workers, before running.

1. A profile (``profile.py``): per-block forward/backward/optimizer times at the batch and
   micro-batch sizes, each rule's extra work at every possible boundary (auxiliary head,
   gradient predictor, its training), activation sizes, and the link cost. Measured here,
   or read from a file saved on another machine.
2. A split: the config's, or the balanced one (the slowest stage's forward+backward as
   small as it can be, from the measured block times).
3. Per method, each stage's task times composed from the profile, and a discrete-event
   simulation (``simulate.py``) of the schedule the runtime would run.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

from ..config import (BackpropMethod, Config, ConfigError, DFAMethod, DGLMethod, DNIMethod, FAMethod,
                      SignSymmetricMethod)
from ..split import partition
from .profile import PROFILE_VERSION, assume_device, gpu_cluster_link, measure_profile, merge_profiles, micro_sizes
from .simulate import LinkCost, Prediction, StageTimes, Workload, simulate

MAX_SIMULATED_STEPS = 300  # beyond this the pipeline is in its steady state: more steps change nothing


def methods_of(cfg: Config) -> list:
    return list(cfg.compare.methods) if cfg.compare else [cfg.method]


def load_profile(path: str | Path) -> dict:
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"--profile: cannot read {path}: {err}") from None
    if not isinstance(profile, dict) or profile.get("version") != PROFILE_VERSION:
        raise ConfigError(f"--profile: {path} is not a version-{PROFILE_VERSION} profile from 'decoupled plan'")
    return profile


def check_profile(profile: dict, cfg: Config, methods: list) -> None:
    """A profile fits a config if it timed this model, batch size, micro-batch sizes and rule settings."""
    where = "--profile"
    if profile["model"] != cfg.model.model_dump(mode="json"):
        raise ConfigError(f"{where}: profiled model {profile['model']} is not the config's {cfg.model.model_dump()}")
    if profile["batch_size"] != cfg.train.batch_size:
        raise ConfigError(f"{where}: profiled at batch size {profile['batch_size']}, the config trains at "
                          f"{cfg.train.batch_size} (train.batch_size)")
    missing = sorted(set(micro_sizes(cfg, methods)) - set(profile["sizes"]))
    if missing:
        raise ConfigError(f"{where}: no block times at batch sizes {missing} (micro-batches of the config's methods)")
    for m in methods:
        if isinstance(m, (DGLMethod, DNIMethod, DFAMethod)) and profile["boundaries"] and \
                m.display_name() not in profile["boundaries"][0]["methods"]:
            raise ConfigError(f"{where}: method '{m.display_name()}' was not profiled; profile with this config")


# ------------------------------------------------------------------- stage costs


class Costs:
    """Sums of profiled times over a stage's blocks."""

    def __init__(self, profile: dict) -> None:
        self.p = profile
        self.blocks = profile["blocks"]

    @staticmethod
    def _time(blk: dict, name: str, size: int, live: bool) -> float:
        """``live``: timed with the batch's other micro-batches kept in memory, where profiled (GPipe)."""
        times = blk.get(f"{name}_live_s", {}) if live else {}
        return times.get(str(size), blk[f"{name}_s"][str(size)])

    def fwd(self, a: int, b: int, size: int, live: bool = False) -> float:
        return sum(self._time(blk, "fwd", size, live) for blk in self.blocks[a:b])

    def bwd(self, a: int, b: int, size: int, input_grad: bool, live: bool = False) -> float:
        """Backward of blocks [a, b); the first computes dL/dinput only if ``input_grad``."""
        first = self._time(self.blocks[a], "bwd_input" if input_grad else "bwd", size, live)
        return first + sum(self._time(blk, "bwd_input", size, live) for blk in self.blocks[a + 1 : b])

    def opt(self, a: int, b: int) -> float:
        return sum(blk["opt_s"] for blk in self.blocks[a:b])

    def clone(self, a: int, b: int) -> float:
        return sum(blk["clone_s"] for blk in self.blocks[a:b])

    def out_bytes(self, b: int, size: int) -> float:
        """One message carrying block b-1's output for ``size`` samples, with their labels and header."""
        return size * (self.blocks[b - 1]["output_bytes"] + 8) + 24

    def extra(self, b: int, label: str) -> dict:
        """What method ``label`` adds at a stage ending with block b-1."""
        return self.p["boundaries"][b - 1]["methods"].get(label, {})

    def params(self) -> int:
        return sum(blk["params"] for blk in self.blocks)


def balanced_split(profile: dict, k: int) -> list[int]:
    """Boundaries minimising the slowest stage's forward+backward+update at the full batch."""
    c, size = Costs(profile), profile["batch_size"]
    costs = [c.fwd(j, j + 1, size) + c.bwd(j, j + 1, size, j > 0) + c.opt(j, j + 1) for j in range(len(c.blocks))]
    return partition(costs, k)


def mode_of(method, k: int) -> str:
    if isinstance(method, BackpropMethod):
        return method.schedule or ("naive" if k > 1 else "single")
    if isinstance(method, (FAMethod, SignSymmetricMethod)):
        return "naive"
    if isinstance(method, DGLMethod):
        return "dgl-replay" if method.replay_buffer else "dgl"
    if isinstance(method, DNIMethod):
        return "dni-local" if method.predictor_training == "local" else "dni"
    return "dfa"


def workload(profile: dict, method, boundaries: list[int], cfg: Config, steps: int) -> Workload:
    """Stage task times of ``method`` on the split ``boundaries`` (block indices), from the profile."""
    c, batch = Costs(profile), profile["batch_size"]
    n_blocks, k = len(c.blocks), len(boundaries) + 1
    edges = list(zip([0, *boundaries], [*boundaries, n_blocks]))
    mode = mode_of(method, k)
    label = method.display_name()
    w = Workload(mode, [], batch, steps, cfg.train.warmup_steps, cfg.links.max_in_flight, seed=cfg.seed)
    if mode in ("single", "ddp"):
        whole = StageTimes(fwd=c.fwd(0, n_blocks, batch), bwd=c.bwd(0, n_blocks, batch, False), opt=c.opt(0, n_blocks))
        w.stages = [copy.copy(whole) for _ in range(k)]
        w.allreduce_bytes = 4 * c.params()
        if mode == "ddp":  # each replica draws its own batches: an epoch has 1/K of the steps
            w.steps = max(1, steps // k)
            w.lockstep = profile.get("ddp_lockstep") or 1.0
        return w
    for i, (a, b) in enumerate(edges):
        last, first = i == k - 1, i == 0
        t = StageTimes(out_bytes=0 if last else c.out_bytes(b, batch))
        sends_grad = not first and mode in ("naive", "gpipe", "1f1b", "dni", "dni-local")
        fwd, bwd, opt = c.fwd(a, b, batch), c.bwd(a, b, batch, sends_grad), c.opt(a, b)
        extra = {} if last else c.extra(b, label)
        if mode == "naive":
            t.fwd, t.bwd, t.opt = fwd, bwd, opt
        elif mode in ("gpipe", "1f1b"):
            m = method.microbatches
            w.microbatches = m
            overhead = (profile.get("pipeline_overhead") or {}).get(mode)
            if overhead:
                w.schedule_overhead = (overhead["per_step_s"], overhead["per_microbatch_s"])
            # GPipe keeps every micro-batch's activations until its backward; 1F1B at most K of them
            live = mode == "gpipe"
            t.fwd_micro = c.fwd(a, b, batch // m, live)
            t.bwd_micro, t.opt = c.bwd(a, b, batch // m, sends_grad, live), opt
        elif mode in ("dgl", "dgl-replay"):
            t.fwd = fwd + extra.get("aux_s", 0.0) + bwd + opt  # the whole local step
            w.replay_capacity, w.replay_max_reuse = method.replay_buffer, method.replay_max_reuse
        elif mode in ("dni", "dni-local"):
            t.fwd = fwd + extra.get("predict_s", 0.0) + bwd + opt
            t.train_s = extra.get("train_s", 0.0)
            if mode == "dni":
                incoming = c.extra(a, label) if not first else {}
                # measured through Ray when the profile has it (profile.measure_coordinator_path); else
                # the training step and pickling alone, which undercount the coordinator's traffic
                t.train_s = extra.get("coordinator_sample_s", t.train_s)
                t.submit = incoming.get("ray_submit_s", incoming.get("submit_s", 0.0))
                t.weights_s, t.weights_host_s = extra.get("weights_request_s", 0.0), extra.get("weights_host_s", 0.0)
                w.push_every = method.predictor_push_every
            w.sample_rate, w.max_outstanding = method.predictor_sample_rate, method.predictor_max_outstanding
        else:  # dfa: the forward keeps a copy of the weights; the update waits for the output error
            if last:
                t.fwd = fwd + bwd + opt
                t.back_bytes = batch * 4 * profile["num_classes"] + 24
            else:
                t.fwd = fwd + c.clone(a, b)
                t.bwd, t.opt = extra.get("project_s", 0.0) + bwd, opt
        w.stages.append(t)
    return w


# ---------------------------------------------------------------------- planning


def plan(cfg: Config, workers: int, profile: dict, link: dict | None = None, cores: int | None | str = "profile",
         steps: int | None = None) -> dict:
    """Predict every method of ``cfg`` (its ``compare`` list, or its method) at ``workers`` stages."""
    methods = methods_of(cfg)
    check_profile(profile, cfg, methods)
    if not profile.get("timed", True):
        raise ConfigError("--profile: it counted FLOPs only; plan with it through --assume-device")
    n_blocks = len(profile["blocks"])
    if not 1 <= workers <= n_blocks:
        raise ConfigError(f"--workers: {workers} stages requested but the model has {n_blocks} blocks")
    link = link or profile.get("link")
    if link is None:
        raise ConfigError("--link: the profile has no link measurement; give one (e.g. --link gpu-cluster)")
    if cores == "profile":
        cores = profile.get("cores")
    pool = None
    if cores:  # workers share the machine's cores: each runs ``threads`` of them
        pool = max(1, int(cores) // max(1, int(profile.get("threads") or 1)))
    balanced = balanced_split(profile, workers)
    given = cfg.split.boundaries
    boundaries = list(given) if given is not None and len(given) == workers - 1 else balanced
    if steps is None:
        per_epoch = profile["train_samples"] // cfg.train.batch_size
        steps = cfg.train.epochs * per_epoch
        if cfg.train.max_steps:
            steps = min(steps, cfg.train.max_steps)
    steps = max(2, min(steps, MAX_SIMULATED_STEPS))
    cost = LinkCost.from_profile(link)
    rows = []
    for m in methods:
        w = workload(profile, m, boundaries, cfg, steps)
        pred: Prediction = simulate(w, cost, pool, profile.get("contention") if pool else None)
        rows.append({"label": m.display_name(), "method": m.name, "mode": w.mode,
                     "workers": len(w.stages) if w.mode != "single" else 1,
                     "samples_per_sec": pred.samples_per_sec, "idle_fraction": pred.idle_fraction,
                     "coordinator_utilisation": pred.coordinator_utilisation,
                     "coordinator_dropped": pred.dropped_samples, "coordinator_trained": pred.trained_samples})
    return {"workers": workers, "boundaries": boundaries, "balanced_boundaries": balanced,
            "stages": stage_table(profile, boundaries, methods, cost), "link": link, "cores": cores, "pool": pool,
            "steps": steps, "device": profile["device"], "contention": profile.get("contention") if pool else None,
            "ddp_lockstep": profile.get("ddp_lockstep"),
            "predictions": rows}


def stage_table(profile: dict, boundaries: list[int], methods: list, link: LinkCost) -> list[dict]:
    """Per stage: blocks, forward/backward/update ms, and each rule's extra ms (for the printed plan)."""
    c, batch = Costs(profile), profile["batch_size"]
    edges = list(zip([0, *boundaries], [*boundaries, len(c.blocks)]))
    out = []
    for i, (a, b) in enumerate(edges):
        row = {"stage": i, "blocks": [a, b - 1], "fwd_ms": 1e3 * c.fwd(a, b, batch),
               "bwd_ms": 1e3 * c.bwd(a, b, batch, i > 0), "opt_ms": 1e3 * c.opt(a, b),
               "params": sum(blk["params"] for blk in c.blocks[a:b])}
        if i < len(edges) - 1:
            row["activation_mib"] = c.out_bytes(b, batch) / 2**20
            row["link_ms"] = 1e3 * link.seconds(c.out_bytes(b, batch))
            for m in methods:
                for key, v in c.extra(b, m.display_name()).items():
                    if key.endswith("_s"):
                        row[f"{m.display_name()}:{key[:-2]}_ms"] = 1e3 * v
        out.append(row)
    return out


def compare_measured(result: dict, comparison: dict) -> list[dict]:
    """Predicted against measured samples/s for every run in a ``comparison.json``, matched by label."""
    measured = {r["label"]: r for r in comparison["runs"]}
    rows = []
    for p in result["predictions"]:
        r = measured.get(p["label"])
        if r is None:
            continue
        error = p["samples_per_sec"] / r["samples_per_sec"] - 1.0
        rows.append({"label": p["label"], "predicted": p["samples_per_sec"], "measured": r["samples_per_sec"],
                     "error": error, "predicted_idle": p["idle_fraction"], "measured_idle": r.get("idle_fraction")})
    return rows


def _slowdown(contention: dict | None) -> str:
    if not contention:
        return "no contention measured"
    alone = contention.get("1", 1.0)
    return ", ".join(([f"a split stage alone: {alone:.2f}x slower"] if alone != 1.0 else [])
                     + [f"{n} at once: {f:.2f}x slower" for n, f in contention.items() if n != "1"])


def format_plan(result: dict, validation: list[dict] | None = None) -> str:
    lines = [f"device: {result['device']}",
             f"split at blocks {result['boundaries']} (balanced: {result['balanced_boundaries']}); "
             f"{result['steps']} steps simulated; link: {result['link'].get('source', '')} "
             f"({1e6 * result['link']['latency_s']:.0f} us + {result['link']['bandwidth_bytes_per_s'] / 1e9:.2f} GB/s)"
             + (f"; {result['pool']} workers' worth of cores shared, {_slowdown(result['contention'])}, "
                f"message copies {1e3 * result['link'].get('cpu_s_per_byte', 0.0) * 2**20:.2f} ms of CPU per MiB "
                "at each end"
                + (f", DDP's lockstep {result['ddp_lockstep']:.2f}x the replicas' own step"
                   if result.get("ddp_lockstep") else "")
                if result["pool"] else "; a device per worker"),
             "", "| stage | blocks | params | fwd ms | bwd ms | update ms | activation MiB | link ms | extra ms |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in result["stages"]:
        extras = ", ".join(f"{k[:-3]} {v:.1f}" for k, v in s.items() if ":" in k)
        lines.append(f"| {s['stage']} | {s['blocks'][0]}..{s['blocks'][1]} | {s['params']:,} | {s['fwd_ms']:.1f} | "
                     f"{s['bwd_ms']:.1f} | {s['opt_ms']:.1f} | "
                     f"{s.get('activation_mib', 0):.2f} | {s.get('link_ms', 0):.2f} | {extras or '–'} |")
    single = next((p["samples_per_sec"] for p in result["predictions"] if p["mode"] == "single"), None)
    lines += ["", "| run | schedule | workers | predicted samples/s | idle per stage |"
              + (" × single |" if single else ""), "|---|---|---|---|---|" + ("---|" if single else "")]
    coordinators = []
    for p in result["predictions"]:
        idle = " / ".join(f"{x:.2f}" for x in p["idle_fraction"])
        row = f"| {p['label']} | {p['mode']} | {p['workers']} | {p['samples_per_sec']:.0f} | {idle} |"
        if single:
            row += f" {p['samples_per_sec'] / single:.2f} |"
        lines.append(row)
        if p["coordinator_utilisation"]:
            busy = " / ".join(f"{100 * u:.0f}%" for u in p["coordinator_utilisation"])
            trained = " / ".join(str(t) for t in p["coordinator_trained"])
            dropped = " / ".join(str(d) for d in p["coordinator_dropped"])
            coordinators.append(f"{p['label']}: coordinators busy {busy}; samples trained on {trained}, "
                                f"dropped {dropped} (per boundary)")
    lines += [""] + coordinators if coordinators else []
    if validation:
        errors = [abs(v["error"]) for v in validation]
        lines += ["", "| run | predicted | measured | error |", "|---|---|---|---|"]
        lines += [f"| {v['label']} | {v['predicted']:.0f} | {v['measured']:.0f} | {100 * v['error']:+.1f}% |"
                  for v in validation]
        lines.append(f"largest error {100 * max(errors):.1f}%, median {100 * statistics.median(errors):.1f}%")
    return "\n".join(lines) + "\n"


__all__ = ["plan", "measure_profile", "load_profile", "balanced_split", "workload", "compare_measured",
           "format_plan", "gpu_cluster_link", "assume_device", "merge_profiles"]

"""Command line: ``decoupled train | compare | split | plan | sequence | sequence-compare --config FILE
[key=value ...]`` and ``decoupled dashboard RUN_DIR``."""

from __future__ import annotations

import argparse
import json
import sys

from .checkpoint import CheckpointError
from .config import ConfigError, load_config
from .stage import NonFiniteError
from .stopping import RunFailed, RunStopped


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="decoupled",
        description="Pipeline-parallel training without end-to-end backprop (DGL, DNI, feedback alignment) "
        "beside E2EBP baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    helps = {
        "train": "train one run: runs/<name>/ gets config.yaml, TensorBoard events and summary.json",
        "compare": "run every method in the config's 'compare' section side by side; writes comparison.json/.md",
        "split": "print how the model's blocks are split into stages",
        "plan": "profile the model here (or read a profile) and predict samples/s and idle time of every method "
                "at --workers stages with a discrete-event simulation of the schedules",
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=name != "train", help="YAML config file")
        if name == "train":
            p.add_argument("--resume", metavar="RUN_DIR",
                           help="continue the run in RUN_DIR from its latest checkpoint (with its own config)")
        if name == "plan":
            _plan_arguments(p)
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. train.epochs=3")
    text = ("start TensorBoard for a run or a comparison, laid out to put each decoupled method's throughput and "
            "accuracy beside the E2EBP baselines, with every stage's idle and waiting time")
    p = sub.add_parser("dashboard", help=text, description=text)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run's directory, a comparison's, or a folder of them")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default loopback; 0.0.0.0 inside a container)")
    p.add_argument("--port", type=int, default=6006, help="port (default 6006; 0: any free port)")
    p.add_argument("--refresh-s", type=float, default=15.0, metavar="S",
                   help="seconds between updates of the comparison charts while runs are still going")
    p.add_argument("--write-only", action="store_true",
                   help="write the layout and comparison charts into RUN_DIR/dashboard and exit, for a "
                   "TensorBoard you start yourself")
    from .recurrent.cli import add_parsers as add_sequence_parsers

    add_sequence_parsers(sub)  # recurrent networks: truncated BPTT with and without synthetic gradients
    return parser


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, required=True, metavar="K", help="pipeline stages (workers) to plan for")
    p.add_argument("--profile", metavar="FILE", action="append",
                   help="use a profile saved earlier (on this or another machine) instead of measuring here; given "
                   "several times (e.g. before and after a benchmark on a shared host), each time is their median")
    p.add_argument("--save-profile", metavar="FILE", help="write the measured profile here (JSON)")
    p.add_argument("--link", default="profile", metavar="SPEC",
                   help="link cost: 'profile' (measured, default), 'gpu-cluster' (25 GB/s, 10 us: InfiniBand "
                   "HDR between nodes) or 'GBPS,US' (bandwidth in GB/s, latency in microseconds)")
    p.add_argument("--cores", default="profile", metavar="N",
                   help="cores the workers share ('profile': the profiled machine's on CPU; 'none': a device per "
                   "worker, as on a GPU cluster)")
    p.add_argument("--assume-device", metavar="TFLOPS,US[,GBPS]",
                   help="plan for a device you do not have: every block's counted FLOPs at TFLOPS achieved, plus US "
                   "microseconds per layer and pass, updates at GBPS GB/s of memory (default 2000); e.g. 100,15 "
                   "for an H100 in TF32")
    p.add_argument("--steps", type=int, help="steps to simulate (default: the config's run, at most 300)")
    p.add_argument("--measured", metavar="COMPARISON_JSON",
                   help="a 'decoupled compare' result at the same K: print predicted against measured samples/s")
    p.add_argument("--json", metavar="FILE", help="also write the plan as JSON")
    p.add_argument("--plot", metavar="PNG", help="also draw predicted (and measured) samples/s per method")


def _link_spec(spec: str) -> dict | None:
    from .plan import gpu_cluster_link

    if spec == "profile":
        return None
    if spec == "gpu-cluster":
        return gpu_cluster_link()
    try:
        bandwidth, latency = (float(v) for v in spec.split(","))
        if bandwidth <= 0 or latency < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--link: expected 'profile', 'gpu-cluster' or 'GBPS,US' (e.g. 25,10), got {spec!r}") from None
    return gpu_cluster_link(bandwidth, latency)


def _plan(args, cfg) -> None:
    from .metrics import write_json_atomic
    from .plan import compare_measured, format_plan, load_profile, measure_profile, methods_of, plan

    link = _link_spec(args.link)
    if args.cores not in ("profile", "none") and not args.cores.isdigit():
        raise ConfigError(f"--cores: expected a number, 'profile' or 'none', got {args.cores!r}")
    cores = None if args.cores == "none" else args.cores if args.cores == "profile" else int(args.cores)
    comparison = None
    if args.measured:
        try:
            comparison = json.loads(open(args.measured).read())
        except (OSError, json.JSONDecodeError) as err:
            raise ConfigError(f"--measured: cannot read {args.measured}: {err}") from None
    if args.profile:
        from .plan import merge_profiles

        try:
            profile = merge_profiles([load_profile(p) for p in args.profile])
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:
        from .train import prepare

        cfg, dataset = prepare(cfg)
        print(f"profiling {cfg.model.name} at batch size {cfg.train.batch_size} ...", file=sys.stderr, flush=True)
        # an assumed device needs FLOP counts, not this machine's times (nor its link)
        profile = measure_profile(cfg, dataset, methods_of(cfg), timed=not args.assume_device,
                                  link=not args.assume_device and link is None)
        if args.save_profile:
            write_json_atomic(args.save_profile, profile)
    if args.assume_device:
        from .plan import assume_device

        try:
            values = [float(v) for v in args.assume_device.split(",")]
            if len(values) not in (2, 3) or min(values) <= 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"--assume-device: expected TFLOPS,US[,GBPS] (e.g. 100,15), got {args.assume_device!r}") \
                from None
        profile = assume_device(profile, *values)
    if comparison is not None and comparison.get("runs"):
        # the measured runs' split, so both sides describe the same pipeline
        split = next((r["split"] for r in comparison["runs"] if r.get("stages", 1) == args.workers), None)
        if split:
            cfg = cfg.model_copy(update={"split": cfg.split.model_copy(update={
                "stages": args.workers, "boundaries": [b["blocks"][0] for b in split[1:]]})})
    result = plan(cfg, args.workers, profile, link=link, cores=cores, steps=args.steps)
    validation = compare_measured(result, comparison) if comparison is not None else None
    if validation is not None:
        result["validation"] = validation
    print(format_plan(result, validation), end="")
    if args.json:
        write_json_atomic(args.json, result)
    if args.plot:
        from .plots import plot_plan

        plot_plan(result, args.plot)


def _dashboard(args) -> int:
    from .dashboard import DashboardWriter, serve

    if args.write_only:
        board = DashboardWriter(args.run_dir)
        points = board.update()
        board.close()
        print(f"wrote the layout and {points} points to {board.root / 'dashboard'}; "
              f"tensorboard --logdir {board.root}")
        return 0
    if args.refresh_s <= 0:
        raise ConfigError(f"--refresh-s: expected a positive number of seconds, got {args.refresh_s}")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port: expected 0..65535, got {args.port}")
    try:
        serve(args.run_dir, args.host, args.port, args.refresh_s,
              ready=lambda url: print(f"TensorBoard at {url} (Ctrl-C stops it)", flush=True))
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "dashboard":
            return _dashboard(args)
        if args.command in ("sequence", "sequence-compare"):
            from .recurrent.cli import run as run_sequence

            return run_sequence(args)
        if args.command == "train" and args.resume:
            if args.config or args.overrides:
                raise ConfigError("--resume: continues a run with the config it started with; "
                                  "give neither --config nor overrides")
            from .train import resume

            summary = resume(args.resume)
            print(json.dumps({k: summary[k] for k in ("run_dir", "method", "stages", "samples_per_sec", "test_accuracy")}))
            return 0
        if not args.config:
            raise ConfigError("--config: required (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.overrides)
        if args.command == "train":
            from .train import train

            summary = train(cfg)
            print(json.dumps({k: summary[k] for k in ("run_dir", "method", "stages", "samples_per_sec", "test_accuracy")}))
        elif args.command == "plan":
            _plan(args, cfg)
        elif args.command == "compare":
            from .compare import compare

            result = compare(cfg)
            print(result["table"], end="")
            print(f"results: {result['parent']}/comparison.json")
        else:
            from .pipeline import plan_stages
            from .split import describe_split
            from .train import prepare

            _, dataset = prepare(cfg)
            _, plans = plan_stages(cfg, dataset)  # the unpinned config: show the costs it balanced
            print(f"{cfg.model.name}, {cfg.split.stages} stages, balanced by {cfg.split.balance}:")
            print(describe_split(plans, cfg.split.balance))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except RunStopped as stopped:
        print(f"decoupled: {stopped}", file=sys.stderr)
        return 130
    except (CheckpointError, NonFiniteError, RunFailed) as err:  # named stage/step/file: no traceback needed
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

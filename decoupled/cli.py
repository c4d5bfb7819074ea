"""Command line: ``decoupled train | compare | split --config FILE [key=value ...]``."""

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
    }
    for name, text in helps.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=name != "train", help="YAML config file")
        if name == "train":
            p.add_argument("--resume", metavar="RUN_DIR",
                           help="continue the run in RUN_DIR from its latest checkpoint (with its own config)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. train.epochs=3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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

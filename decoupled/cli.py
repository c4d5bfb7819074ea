"""Command line: ``decoupled train | compare | split --config FILE [key=value ...]``."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config


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
        p.add_argument("--config", required=True, help="YAML config file")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. train.epochs=3")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``decoupled sequence`` (one recurrent run) and ``decoupled sequence-compare`` (T x method grid).

``add_parsers(subparsers)`` adds both to the main command line (decoupled/cli.py); ``run(args)`` runs one.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..config import ConfigError
from .config import METHODS, TRUNCATIONS, load_sequence_config

COMMANDS = ("sequence", "sequence-compare")


def add_parsers(subparsers) -> None:
    helps = {
        "sequence": "train one recurrent run (copy, repeat copy or a character LM) with truncated BPTT, with or "
                    "without synthetic gradients: runs/recurrent/<name>/ gets config.yaml, TensorBoard events and "
                    "summary.json",
        "sequence-compare": "truncated BPTT vs + synthetic gradients (+aux) at several truncation windows: the "
                            "longest length learned or bits per character, in comparison.json/.md/.png",
    }
    for name, text in helps.items():
        p = subparsers.add_parser(name, help=text, description=text)
        p.add_argument("--config", required=True, help="YAML config file (e.g. configs/recurrent/copy.yaml)")
        if name == "sequence-compare":
            p.add_argument("--truncations", default=",".join(map(str, TRUNCATIONS)), metavar="T,T,...",
                           help=f"truncation windows (default {','.join(map(str, TRUNCATIONS))})")
            p.add_argument("--methods", default=",".join(METHODS), metavar="M,M,...",
                           help=f"some of {', '.join(METHODS)} (default: all)")
            p.add_argument("--seeds", metavar="S,S,...", help="seeds, each a full grid (default: train.seed)")
            p.add_argument("--jobs", type=int, default=1, metavar="N",
                           help="runs at once, each in its own process with train.threads threads (default 1)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. truncation=5")


def _ints(flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag}: expected at least one value")
    return values


def run(args) -> int:
    """Run ``args.command``; exit code 0, 2 for a bad config or flag (the message names it), 1 for a diverged run."""
    try:
        cfg = load_sequence_config(args.config, args.overrides)
        if args.command == "sequence":
            from .tbptt import run as run_one

            summary = run_one(cfg)
            keys = ["run_dir", "task", "method", "truncation", "steps", "wall_seconds"]
            keys += ["best_val_bits_per_char"] if summary["task"] == "text" else ["max_length_learned"]
            print(json.dumps({k: summary[k] for k in keys}))
        else:
            from .compare import compare

            truncations = _ints("--truncations", args.truncations)
            if min(truncations) < 1:
                raise ConfigError(f"--truncations: every T must be >= 1, got {args.truncations!r}")
            methods = [m.strip() for m in args.methods.split(",") if m.strip()]
            seeds = _ints("--seeds", args.seeds) if args.seeds else None
            result = compare(cfg, truncations, methods, seeds, jobs=args.jobs)
            print(result["table"], end="")
            print(f"results: {result['parent']}/comparison.json")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # a diverged run, named by step
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m decoupled.recurrent.cli")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

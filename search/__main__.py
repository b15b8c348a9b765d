"""``python -m search {validate,launch,resume,pareto,export,train}``."""
from __future__ import annotations

import argparse
import logging
import sys

from search.overrides import SearchConfigError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m search",
                                description="Multi-objective search over DGC networks.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one configuration in the foreground (no Ray)")
    t.add_argument("file", help="experiment YAML (its trial: section) or a trial-config YAML")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", help="folder for metrics.jsonl and the checkpoint state.pt")
    t.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "train":
            from search.train_cmd import train_command

            return train_command(args.file, args.overrides, args.out, args.resume)
    except SearchConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())

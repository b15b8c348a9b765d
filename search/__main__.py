"""``python -m search {validate,launch,resume,pareto,export,train}``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from search.overrides import SearchConfigError
from search.redact import RedactingFilter
from search.redact import redact


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m search", description="Multi-objective search over DGC networks."
    )
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check an experiment file; no cluster is started")
    v.add_argument("file")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    la = sub.add_parser("launch", help="run the search described by an experiment file")
    la.add_argument("file")
    la.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    la.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("resume", help="continue an interrupted search from its folder")
    r.add_argument("folder")
    r.add_argument("--address")
    pa = sub.add_parser("pareto", help="print the Pareto table of a search and write its plot")
    pa.add_argument("folder", help="the search folder (runs/<name>) or its MLflow parent run id")
    pa.add_argument("--no-register", dest="register", action="store_false")
    pa.add_argument("--tracking-uri", help="for a run id: the tracking store (default: MLflow's)")
    e = sub.add_parser("export", help="write a logged model's weights, config and TorchScript")
    e.add_argument("source", help="models:/<name>@<alias>, a model URI, or a run id")
    e.add_argument("--out", required=True)
    e.add_argument("--tracking-uri")
    t = sub.add_parser("train", help="train one configuration in the foreground (no Ray)")
    t.add_argument("file", help="experiment YAML (its trial: section) or a trial-config YAML")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    t.add_argument("--out", help="folder for metrics.jsonl and the checkpoint state.pt")
    t.add_argument("--resume", action="store_true", help="continue from --out/state.pt")
    return p


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "validate":
        from search.commands import validate_command

        return validate_command(args.file, args.overrides)
    if args.command == "launch":
        from search.config import load_experiment
        from search.launch import launch

        return launch(load_experiment(args.file, args.overrides), args.file, args.address)
    if args.command == "resume":
        from search.launch import resume

        return resume(Path(args.folder), args.address)
    if args.command == "pareto":
        from search.commands import pareto_command

        return pareto_command(args.folder, args.register, args.tracking_uri)
    if args.command == "export":
        from search.commands import export_command

        return export_command(args.source, args.out, args.tracking_uri)
    from search.train_cmd import train_command

    return train_command(args.file, args.overrides, args.out, args.resume)


# Console hygiene for the command line only (the library never touches the environment):
# Tune's snapshot-frequency warning fires on every short trial; MLflow's download bars.
QUIET_ENV = {
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


MAX_MESSAGE = 4000


def _capped(message: str) -> str:
    """At most MAX_MESSAGE characters of an error (a value in it can be arbitrarily large)."""
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]} ... ({len(message) - MAX_MESSAGE} more characters)"


def main(argv: list[str] | None = None) -> int:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())  # no password of a storage URL in any log line
    for noisy in ("mlflow", "alembic", "ray", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return dispatch(args)
    except SearchConfigError as err:
        print(f"error: {_capped(redact(str(err)))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went to a pipe that closed (`... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m search {validate,launch,resume,pareto,export,train}``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
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

        exp = load_experiment(args.file, args.overrides)
        return launch(exp, args.file, args.address, args.overrides)
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
    # Ray's "Unhandled error" tracebacks of trial tasks that a stop discarded: Tune recorded
    # each trial's error already (in its MLflow run), and the stop says what happened.
    "RAY_IGNORE_UNHANDLED_ERRORS": "1",
    # MLflow prints a "View run ... at: URL" line to stdout as each run of an http tracking
    # server ends, with the URL's password in clear; the tool prints its own redacted links.
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
#: loggers whose lines this tool says itself, in one line: a stop's summary, a trial's failure
#: (with its text in MLflow), a stopped search's resume command
QUIET_LOGGERS = (
    "ray.tune.tune",  # "Stop signal received ...", "Resume experiment with: Tuner.restore(...)"
    "ray.tune.execution.tune_controller",  # each trial error's traceback
    "ray.tune.analysis.experiment_analysis",  # "Failed to fetch metrics" of unstarted trials
    "ray.tune.result_grid",
)


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
    configure_logging()
    try:
        return dispatch(args)
    except SearchConfigError as err:
        print(f"error: {_capped(redact(str(err)))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the output went to a pipe that closed (`... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as err:  # before a search began, or in another command
        signum = getattr(err, "signum", signal.SIGINT)
        print(f"stopped ({signal.Signals(signum).name}) before the command finished; run it "
              "again to finish", file=sys.stderr)  # fmt: skip
        return 128 + signum
    except Exception as err:  # noqa: BLE001  (a bug or an unforeseen fault: one line, a file)
        print(f"error: {_capped(_unexpected(err))}", file=sys.stderr)
        return 1


def configure_logging() -> None:
    """The CLI's log output: plain messages, credentials redacted and a full disk said in one
    line on every handler (``search.cluster`` routes Ray's records to them once Ray runs),
    the chatty libraries at warnings."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import ray  # noqa: F401  (installs its handler on the "ray" logger, which does not propagate)

    from search.faults import FullDiskFilter

    for handler in logging.getLogger().handlers + logging.getLogger("ray").handlers:
        handler.addFilter(RedactingFilter())  # no password of a storage URL in any log line
        handler.addFilter(FullDiskFilter())  # a full disk is said once, without a traceback
    for noisy in ("mlflow", "alembic", "ray", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # urllib3 warns at every retry of a request; the tracking queue says once that the
    # tracking server is away, and once that it is back
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _unexpected(err: Exception) -> str:
    """One line for an unexpected error; its traceback goes to a file it names."""
    import tempfile
    import time
    import traceback

    from search.faults import describe

    path = Path(tempfile.gettempdir()) / f"dgc-search-error-{time.strftime('%Y%m%d-%H%M%S')}.log"
    try:
        path.write_text(redact("".join(traceback.format_exception(err))), encoding="utf-8")
    except OSError:
        return describe(err)
    return f"{describe(err)} (the traceback is in {path})"


if __name__ == "__main__":
    sys.exit(main())

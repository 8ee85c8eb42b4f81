"""Run one DVC stage from a Prefect task, with DVC deciding whether it is stale.

DVC runs the stage's own command, exactly as `dvc repro` would, so dvc.lock
ends up identical either way and there is one record of freshness. The stage
runs in a subprocess whose output never reaches Prefect, so it is told (by an
environment variable) to also log to a file, which is followed here and
re-logged on the task run, live.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from contextlib import chdir, contextmanager
from pathlib import Path

from dvc.repo import Repo

from tasks.core.stage import LOG_FILE_ENV, details_path

# The dataset's stages in DAG order (dvc.yaml): the conditioning stages after the images they read.
DATASET_STAGES = ("ingest", "bucket", "caption", "embed_text", "embed_image", "embed_pose", "shard")


@contextmanager
def _follow(path: Path, logger: logging.LoggerAdapter | logging.Logger):
    """Forward lines appended to `path` to `logger` until the block exits."""
    stop = threading.Event()

    def pump() -> None:
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    _relog(logger, line.rstrip("\n"))
                elif stop.is_set():
                    return
                else:
                    stop.wait(0.2)

    t = threading.Thread(target=pump, name="stage-log", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join(timeout=10)


def _relog(logger, line: str) -> None:
    """Lines are "LEVEL<tab>message" (tasks.core.stage.setup_logging); anything else
    (a traceback, a library's print) is passed on at INFO."""
    name, sep, message = line.partition("\t")
    level = logging.getLevelName(name) if sep else None
    if isinstance(level, int):
        logger.log(level, message)
    else:
        logger.info(line)


def _quiet_dvc_console() -> None:
    """PREFECT_LOGGING_EXTRA_LOGGERS=dvc gives DVC's logger Prefect's handlers
    (that is how its lines reach the UI); it also propagates to the root
    logger's console handler, which would print each line a second time. Its
    per-stage "git add dvc.lock" hint is said once by the flow instead."""
    dvc_log = logging.getLogger("dvc")
    if dvc_log.handlers:
        dvc_log.propagate = False
    logging.getLogger("dvc.repo.scm_context").setLevel(logging.WARNING)


def reproduce(stage: str, root: Path, logger) -> bool:
    """Reproduce `stage` alone if DVC says it is stale. True when it ran."""
    root = root.resolve()
    _quiet_dvc_console()
    # A deployment's process may not have the venv on PATH; the stage's
    # `python -m tasks.x` must run with this very interpreter.
    env_path = os.environ.get("PATH", "")
    bindir = str(Path(sys.executable).parent)
    if not env_path.startswith(bindir + os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + env_path
    with tempfile.TemporaryDirectory(prefix=f"niche-{Path(stage).name}-") as tmp:
        log_file = Path(tmp) / "stage.log"
        log_file.touch()
        os.environ[LOG_FILE_ENV] = str(log_file)
        try:
            # DVC resolves some paths against the working directory, not the
            # repo it was given (the run-cache hashes `data/raw` from cwd).
            with _follow(log_file, logger), chdir(root), Repo(str(root)) as repo:
                ran = repo.reproduce(stage, single_item=True)
        finally:
            os.environ.pop(LOG_FILE_ENV, None)
    return bool(ran)


def stage_metrics(stage: str, root: Path) -> dict:
    """What a stage's last run reported: its DVC metric metrics/<stage>.json (the counts) and,
    after them, metrics/<stage>.details.json (the rest: per bucket, per reason...); {} if neither."""
    out: dict = {}
    metric = root / "metrics" / f"{stage}.json"
    for path in (metric, details_path(metric)):
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out


def record_outputs(stage: str, root: Path, logger) -> bool:
    """Record `stage`'s outputs in dvc.lock after they changed outside DVC (a back-test or the
    nightly adding a step to the validation history), when nothing else about the stage changed:
    `dvc status` stays clean and DVC caches the new files. When its deps or params changed too,
    the stage is stale in its own right and the next `dvc repro` records everything; when DVC is
    busy, likewise. True when dvc.lock matches the outputs afterwards."""
    from dvc.lock import LockError

    root = root.resolve()
    try:
        with chdir(root), Repo(str(root)) as repo:
            changes = repo.status(targets=[stage]).get(stage, [])
            kinds = {k for c in changes for k in (c if isinstance(c, dict) else {c: None})}
            if not changes:
                return True
            if kinds != {"changed outs"}:
                logger.info("dvc: stage %s is stale besides its outputs (%s); the next `dvc repro` records "
                            "them", stage, ", ".join(sorted(kinds)))
                return False
            repo.commit(stage, force=True)
    except LockError as e:
        logger.info("dvc: busy (%s); `dvc commit %s` or the next `dvc repro` records the new outputs",
                    str(e).splitlines()[0], stage)
        return False
    logger.info("dvc: recorded %s's outputs changed outside DVC in dvc.lock (dvc commit)", stage)
    return True

"""A stage's command line and what it reports: logging, the Report of counts it writes as
its DVC metric (and its details beside it), and `stage_main` (read the params section, run,
write the metrics).

The per-item loop itself is tasks/core/runner.py; how its work is fanned out,
tasks/core/executors.py.
"""
from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from models.hub import SetupError
from tasks.core.params import ParamsError, load_section
from tasks.core.store import atomic_write_json

log = logging.getLogger("niche")

METRICS_DIR = Path("metrics")
# Set by the Prefect flow so a stage run by DVC in a subprocess can still get
# its log lines to the flow's task run (a subprocess's stdout never reaches it).
LOG_FILE_ENV = "NICHE_LOG_FILE"


class ItemError(Exception):
    """One input cannot be used; the message says why. The run goes on."""


def setup_logging(level: int = logging.INFO) -> None:
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    if not any(getattr(h, "_niche", False) for h in root.handlers):
        # Under the flow, the file is relayed to the console and the UI; also
        # writing stderr would print every line twice.
        log_file = os.environ.get(LOG_FILE_ENV)
        handlers: list[logging.Handler] = [
            logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)]
        for h in handlers:
            # The relay (flows/dvc_stage.py) reads the level before the tab and
            # adds its own time stamp.
            h.setFormatter(logging.Formatter("%(levelname)s\t%(name)s: %(message)s") if log_file else fmt)
            h._niche = True  # type: ignore[attr-defined]
            root.addHandler(h)


def details_path(metric: Path) -> Path:
    """metrics/<stage>.json -> metrics/<stage>.details.json: where a stage's wide figures go."""
    return metric.with_suffix(".details.json")


@dataclass
class Report:
    """Counts of one stage run, written for DVC in two files (dvc.yaml declares both):

    metrics/<stage>.json           its DVC metric: total, computed, reused, failed, seconds, the
                                   same five columns for every stage, so `dvc metrics show` stays
                                   one narrow table
    metrics/<stage>.details.json   everything else (`extra`: per-bucket counts, quarantine reasons,
                                   shard figures... and the rate), a plain non-cached out:
                                   `dvc metrics show metrics/<stage>.details.json` shows it
    """

    stage: str
    total: int = 0
    computed: int = 0
    reused: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # item id -> reason
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        """The DVC metric: total, computed, reused, failed, seconds."""
        return {"total": self.total, "computed": self.computed, "reused": self.reused, "failed": self.failed,
                "seconds": round(self.seconds, 3)}

    def details(self) -> dict:
        """What the stage reports besides the counts: the rate and its `extra`."""
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return {"computed_per_second": round(rate, 2), **self.extra}

    def write(self, metrics_dir: Path = METRICS_DIR) -> Path:
        """Write the details, then the metric; returns the metric's path."""
        path = metrics_dir / f"{self.stage}.json"
        atomic_write_json(details_path(path), self.details())
        atomic_write_json(path, self.metrics())
        return path

    def summary(self) -> str:
        return (f"{self.stage}: {self.total} items — {self.computed} computed, "
                f"{self.reused} reused, {self.failed} failed in {self.seconds:.1f}s")


def section_or_exit(params_cls: type, section: str, path: str) -> Any:
    """A command's params section, or exit naming the file and the bad key (no traceback)."""
    try:
        return load_section(params_cls, section, path)
    except (ParamsError, ValueError) as e:  # ValueError: a dataclass's validate()
        sys.exit(f"{path}: {e}")


def stage_main(stage: str, params_cls: type, run: Callable[..., Report], doc: str,
               argv: list[str] | None = None) -> None:
    """The command line of every stage: read its params section, run, write metrics."""
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--workers", type=int, default=None,
                    help="parallel items (default: $NICHE_WORKERS or all cores); does not change outputs")
    args = ap.parse_args(argv)
    setup_logging()
    params = section_or_exit(params_cls, stage, args.params)
    try:
        extra = {"params_file": Path(args.params)} if "params_file" in inspect.signature(run).parameters else {}
        report = run(params, workers=args.workers, **extra)
    except SetupError as e:
        sys.exit(f"{stage}: {e}")
    report.write()
    log.info("%s; %s", report.summary(), json.dumps(report.extra))

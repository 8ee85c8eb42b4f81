"""What every stage shares: logging, the per-item loop and its report.

A stage hands `run_items` its work as (item id, key) pairs and a function that
computes one missing key. The loop skips keys already in the store, turns a
failing item into a listed failure instead of a crash, shows a progress bar on a
terminal, and returns the counts the stage writes as its DVC metrics.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from models.hub import SetupError
from tasks.core.params import ParamsError, load_section
from tasks.core.store import Store, atomic_write_json

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


def default_workers() -> int:
    return int(os.environ.get("NICHE_WORKERS", 0)) or (os.cpu_count() or 1)


@dataclass
class Report:
    """Counts of one stage run; written to metrics/<stage>.json for DVC."""

    stage: str
    total: int = 0
    computed: int = 0
    reused: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures: dict[str, str] = field(default_factory=dict)  # item id -> reason
    extra: dict = field(default_factory=dict)

    def metrics(self) -> dict:
        rate = self.computed / self.seconds if self.seconds > 0 else 0.0
        return {
            "total": self.total,
            "computed": self.computed,
            "reused": self.reused,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "computed_per_second": round(rate, 2),
            **self.extra,
        }

    def write(self, metrics_dir: Path = METRICS_DIR) -> Path:
        path = metrics_dir / f"{self.stage}.json"
        atomic_write_json(path, self.metrics())
        return path

    def summary(self) -> str:
        return (f"{self.stage}: {self.total} items — {self.computed} computed, "
                f"{self.reused} reused, {self.failed} failed in {self.seconds:.1f}s")


def _finish(report: Report, attempted: int, t0: float) -> Report:
    """Stamp the time; a run in which every attempted item failed is a bug or a
    broken environment rather than bad input, so it raises."""
    report.seconds = time.perf_counter() - t0
    if attempted > 1 and report.failed == attempted:
        raise RuntimeError(f"{report.stage}: all {attempted} items failed; first: "
                           f"{next(iter(report.failures.values()))}")
    return report


def run_items(
    stage: str,
    work: Iterable[tuple[str, str]],
    store: Store,
    compute: Callable[[str, str], None],
    workers: int | None = None,
) -> Report:
    """Compute every missing key of `work` ((item id, key) pairs) into `store`.

    `compute(item_id, key)` writes the item (through `store.write`) or raises
    ItemError. Any other exception is also caught per item and reported with its
    type, because one odd file must not cost a day of work on the others; a run
    in which every computed item failed still raises, since that is a bug or a
    broken environment rather than bad input.
    """
    t0 = time.perf_counter()
    work = list(work)
    report = Report(stage=stage, total=len(work))
    stale = store.remove_stale_temps()
    if stale:
        log.info("%s: removed %d temporary files left by an interrupted run", stage, stale)
    todo = []
    for item_id, key in work:
        if store.has(key):
            report.reused += 1
        else:
            todo.append((item_id, key))

    def one(pair: tuple[str, str]) -> tuple[str, str | None]:
        item_id, key = pair
        try:
            compute(item_id, key)
            return item_id, None
        except ItemError as e:
            return item_id, str(e)
        except Exception as e:  # noqa: BLE001 — reported per item, see docstring
            return item_id, f"{type(e).__name__}: {e}"

    n = workers or default_workers()
    bar = tqdm(total=len(todo), desc=stage, unit="item", disable=None, leave=False)
    with ThreadPoolExecutor(max_workers=n) as pool:
        for item_id, err in pool.map(one, todo):
            if err is None:
                report.computed += 1
            else:
                report.failed += 1
                report.failures[item_id] = err
                log.warning("%s: %s failed: %s", stage, item_id, err)
            bar.update(1)
    bar.close()
    return _finish(report, len(todo), t0)


def settle_rows(rows: list[dict], upstream: dict[str, str], report: Report,
                write_table: Callable[[list[dict]], Any]) -> None:
    """A model stage's end: each row failed upstream or in `report` gets key and file null and
    its reason, the table is written, and the report counts every row and every failure."""
    for r in rows:
        err = upstream.get(r["id"]) or report.failures.get(r["id"])
        if err is not None:
            r.update(key=None, file=None, error=err)
    write_table(rows)
    report.total = len(rows)
    report.failures = {**upstream, **report.failures}
    report.failed = len(report.failures)


def run_batches(
    stage: str,
    work: Iterable[tuple[str, str]],
    store: Store,
    compute_batch: Callable[[list[tuple[str, str]]], dict[str, str] | None],
    batch_size: int,
    group: Callable[[str], object] | None = None,
    order: Callable[[str], object] | None = None,
) -> Report:
    """Like run_items, for models: missing keys go to `compute_batch` in batches.

    `group(item_id)` keeps items that cannot share a batch apart (images of
    different buckets); `order(item_id)` sorts within a group (text by length,
    so padding stays small). `compute_batch` writes each item and returns
    {item id: reason} for items it could not do. If a whole batch raises, its
    items are retried one by one, so one bad input fails alone. Batches run one
    after another: the model uses the cores (or the GPU) itself.
    """
    t0 = time.perf_counter()
    work = list(work)
    report = Report(stage=stage, total=len(work))
    store.remove_stale_temps()
    todo = [(i, k) for i, k in work if not store.has(k)]
    report.reused = len(work) - len(todo)
    groups: dict[object, list[tuple[str, str]]] = {}
    for pair in todo:
        groups.setdefault(group(pair[0]) if group else None, []).append(pair)
    batches = []
    for items in groups.values():
        if order:
            items.sort(key=lambda p: order(p[0]))
        batches += [items[i:i + batch_size] for i in range(0, len(items), batch_size)]

    def attempt(batch: list[tuple[str, str]]) -> dict[str, str]:
        try:
            return compute_batch(batch) or {}
        except Exception as e:  # noqa: BLE001 — isolated below, reported per item
            if len(batch) == 1:
                return {batch[0][0]: f"{type(e).__name__}: {e}"}
            log.warning("%s: a batch of %d failed (%s: %s); retrying its items one by one",
                        stage, len(batch), type(e).__name__, e)
            errors: dict[str, str] = {}
            for pair in batch:
                errors.update(attempt([pair]))
            return errors

    bar = tqdm(total=len(todo), desc=stage, unit="item", disable=None, leave=False)
    for batch in batches:
        errors = attempt(batch)
        for item_id, err in errors.items():
            report.failures[item_id] = err
            log.warning("%s: %s failed: %s", stage, item_id, err)
        report.failed += len(errors)
        report.computed += len(batch) - len(errors)
        bar.update(len(batch))
    bar.close()
    return _finish(report, len(todo), t0)


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
                    help="threads (default: $NICHE_WORKERS or all cores); does not change outputs")
    args = ap.parse_args(argv)
    setup_logging()
    params = section_or_exit(params_cls, stage, args.params)
    try:
        report = run(params, workers=args.workers)
    except SetupError as e:
        sys.exit(f"{stage}: {e}")
    report.write()
    log.info("%s; %s", report.summary(), json.dumps(report.extra))

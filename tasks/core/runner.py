"""The per-item loops every stage runs: skip what the store has, compute the rest, report.

`run_items` takes a stage's work as (item id, key) pairs and a function that computes one
missing key (ingest's probe, bucket's resize: threads, tasks/core/executors.py). `run_model`
does the same for models: the driver forms the batches, reads each item's input and writes
every result; a Worker (tasks/core/workers.py) turns batches of inputs into bytes on the
executor params.yaml names (this process, or actors on a Ray cluster). Both skip keys already
in the store, turn a failing item into a listed failure instead of a crash, show a progress bar
on a terminal, and return the counts the stage writes as its DVC metrics.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable

from tqdm import tqdm

from tasks.core.executors import Executor, executor_for
from tasks.core.stage import ItemError, Report
from tasks.core.store import Store
from tasks.core.workers import Failed, LocalModels, Worker

log = logging.getLogger("niche")


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
    executor: Executor | None = None,
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

    bar = tqdm(total=len(todo), desc=stage, unit="item", disable=None, leave=False)
    try:
        with (executor or executor_for("items", workers)) as ex:
            for item_id, err in ex.map(one, todo):
                if err is None:
                    report.computed += 1
                else:
                    report.failed += 1
                    report.failures[item_id] = err
                    log.warning("%s: %s failed: %s", stage, item_id, err)
                bar.update(1)
    finally:  # what was computed is visible to every reader, even when the loop stopped
        bar.close()
        store.finish()
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


def run_model(
    stage: str,
    work: Iterable[tuple[str, str]],
    store: Store,
    worker: Worker,
    read_input: Callable[[str], Any],
    batch_size: int,
    executor=None,
    group: Callable[[str], object] | None = None,
    order: Callable[[str], object] | None = None,
) -> Report:
    """A model stage's missing keys, computed by `worker` on `executor`, written here.

    `read_input(item_id)` gives the worker's input for an item (read on this machine: workers
    elsewhere never need its files) or raises ItemError. Batches are formed here — `group` keeps
    items that cannot share a batch apart (images of different buckets), `order` sorts within a
    group (text by length, so padding stays small) — so every executor computes the same
    batches and the store's bytes do not depend on which one ran. Results are written as they
    land, so an interrupted run keeps what it finished.
    """
    t0 = time.perf_counter()
    work = list(work)
    report = Report(stage=stage, total=len(work))
    store.remove_stale_temps()
    todo = [(i, k) for i, k in work if not store.has(k)]
    report.reused = len(work) - len(todo)
    if not todo:  # a fully cached run never loads a model nor joins a cluster
        store.finish()  # (a store from before packs is packed)
        return _finish(report, 0, t0)
    groups: dict[object, list[tuple[str, str]]] = {}
    for pair in todo:
        groups.setdefault(group(pair[0]) if group else None, []).append(pair)
    batches: list[list[tuple[str, str]]] = []
    for items in groups.values():
        if order:
            items.sort(key=lambda p: order(p[0]))
        batches += [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    sent: dict[int, list[tuple[str, str]]] = {}  # batch -> the items whose input was read

    def inputs_of(b: int) -> list[Any]:
        ok, inputs = [], []
        for item_id, key in batches[b]:
            try:
                inputs.append(read_input(item_id))
                ok.append((item_id, key))
            except ItemError as e:
                _settle_one(stage, report, item_id, str(e))
        sent[b] = ok
        return inputs

    ex = executor or LocalModels()
    log.info("%s: %d of %d items to compute in %d batches on %s", stage, len(todo), len(work),
             len(batches), ex.describe())
    bar = tqdm(total=len(todo), desc=stage, unit="item", disable=None, leave=False)
    t_run = time.perf_counter()
    # The stage opened the executor (`with`) and closes it: leaving a cluster is not compute time.
    try:
        for b, results in ex.run(worker, len(batches), inputs_of):
            for (item_id, key), r in zip(sent.pop(b), results):
                if isinstance(r, Failed):
                    _settle_one(stage, report, item_id, r.reason)
                else:
                    store.write_bytes(key, r)
                    report.computed += 1
            bar.update(len(batches[b]))
    finally:  # what was computed is visible to every reader, even when the loop stopped
        bar.close()
        store.finish()
    took = time.perf_counter() - t_run
    busy = took - getattr(ex, "setup_s", 0.0)  # without loading the model / starting the actors
    log.info("%s: %d computed, %d failed in %.1f s (%.2f items/s; %.2f items/s once the model was up) on %s",
             stage, report.computed, report.failed, took, report.computed / took if took > 0 else 0.0,
             report.computed / busy if busy > 0 else 0.0, ex.name)
    return _finish(report, len(todo), t0)


def _settle_one(stage: str, report: Report, item_id: str, reason: str) -> None:
    report.failures[item_id] = reason
    report.failed += 1
    log.warning("%s: %s failed: %s", stage, item_id, reason)

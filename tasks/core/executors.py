"""Executors: how the stage runners (tasks/core/runner.py) spread a stage's missing work.

Per-item work (ingest's probe, bucket's resize) goes through an `Executor`: it maps a function
over a list and yields the results in the list's order, while the runner keeps everything else
(what is missing, failures per item, counts, the progress bar). Threads by default
($NICHE_WORKERS or all cores); $NICHE_EXECUTOR=inline runs one item after another.

Model stages (caption, embed_text, embed_image, embed_pose, latents; bucket too on Ray) run
their missing keys through a model executor instead (`model_executor`, params.yaml's
`executor` section, or $NICHE_RAY_ADDRESS): `local` (tasks/core/workers.py, this process) or
`ray` (tasks/core/ray_pool.py, a pool of actors on a Ray cluster, one per GPU). The executor's
settings never enter a key: switching executors recomputes nothing.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Protocol, TypeVar

from models.hub import SetupError
from tasks.core.params import PARAMS_FILE, from_dict
from tasks.core.workers import ExecutorParams, LocalModels

T = TypeVar("T")
R = TypeVar("R")

EXECUTOR_ENV = "NICHE_EXECUTOR"
WORKERS_ENV = "NICHE_WORKERS"
RAY_ADDRESS_ENV = "NICHE_RAY_ADDRESS"  # set: model stages run on the Ray cluster at this address


class Executor(Protocol):
    """Runs `fn` over `items`, yielding results in the order of `items`. `fn` never raises
    for a bad item (the runner's wrappers turn failures into values); an exception out of
    `map` is the engine's own failure and stops the stage. Used as a context manager: leaving
    the block releases its workers."""

    name: str

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]: ...

    def __enter__(self) -> "Executor": ...

    def __exit__(self, *exc) -> None: ...


class InlineExecutor:
    """One item after another in this thread: for work that parallelises itself (a model)."""

    name = "inline"

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        return map(fn, items)

    def __enter__(self) -> "InlineExecutor":
        return self

    def __exit__(self, *exc) -> None:
        pass


class ThreadExecutor:
    """A pool of threads: the per-item work is I/O or releases the GIL (PIL, hashing, numpy)."""

    name = "threads"

    def __init__(self, workers: int | None = None):
        self.workers = workers or default_workers()
        self._pool: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
        if self._pool is None:
            raise RuntimeError("ThreadExecutor.map outside its `with` block")
        return self._pool.map(fn, items)

    def __enter__(self) -> "ThreadExecutor":
        self._pool = ThreadPoolExecutor(max_workers=self.workers)
        return self

    def __exit__(self, *exc) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


EXECUTORS: dict[str, Callable[[int | None], Executor]] = {
    "inline": lambda workers: InlineExecutor(),
    "threads": lambda workers: ThreadExecutor(workers),
}


def default_workers() -> int:
    return int(os.environ.get(WORKERS_ENV, 0)) or (os.cpu_count() or 1)


def executor_for(kind: Literal["items"], workers: int | None = None) -> Executor:
    """The executor for per-item work: $NICHE_EXECUTOR when set, else threads."""
    name = os.environ.get(EXECUTOR_ENV) or "threads"
    if name not in EXECUTORS:
        raise SetupError(f"${EXECUTOR_ENV}={name!r}: expected one of {', '.join(sorted(EXECUTORS))}")
    return EXECUTORS[name](workers)


def executor_params(params_path: Path | str = PARAMS_FILE) -> ExecutorParams:
    """params.yaml's `executor` section (defaults when absent), then $NICHE_RAY_ADDRESS."""
    import yaml

    path = Path(params_path)
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    p = from_dict(ExecutorParams, (doc or {}).get("executor"), prefix="executor")
    address = os.environ.get(RAY_ADDRESS_ENV)
    if address:
        p = replace(p, kind="ray", address=address)
    return p


def model_executor(params_path: Path | str = PARAMS_FILE, gpu: bool = True):
    """The executor a model stage runs its workers on: LocalModels or RayModels. `gpu=False`: the
    work never uses a GPU (bucket), so actors left to take one each (gpus_per_actor auto) take none."""
    p = executor_params(params_path)
    if not gpu and p.gpus_per_actor is None:
        p = replace(p, gpus_per_actor=0.0)
    if p.kind == "ray":
        from tasks.core.ray_pool import RayModels

        return RayModels(p)
    return LocalModels()

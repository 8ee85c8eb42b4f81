"""The model side of a model stage, and the local way to run it.

A model stage (caption, embed_text, embed_image, embed_pose, latents) splits in two:

    driver   decides which keys are missing, reads each item's input (image bytes, text),
             writes every result into the store atomically, counts, reports
    worker   loads the model once, turns a batch of inputs into a batch of results: the exact
             bytes of each item's file, or the reason it failed

The worker never touches the store or the filesystem of the driver. That is what lets the same
`Worker` run in this process (`LocalModels`) or in Ray actors on other machines
(tasks/core/ray_pool.py) and give byte-identical stores: the bytes are made by the same code
from the same inputs in the same batches, and only the driver writes them.

A `Worker` is built on the driver from picklable settings only (paths, ids, dtype names);
`setup()` loads the model wherever the worker ends up, once per process.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

log = logging.getLogger("niche")


@dataclass(frozen=True)
class Failed:
    """One item that could not be computed, and why (the text goes into the manifest)."""

    reason: str


Result = bytes | Failed


class Worker:
    """A stage's model: picklable settings until `setup()`, then a loaded model."""

    def setup(self) -> str:
        """Load the model (on whichever machine runs this); returns a line for the log."""
        return ""

    def run(self, inputs: list[Any]) -> list[Result]:
        """One result per input, in order. Raising means the whole batch failed: `attempt`
        then retries its items one by one, so one bad input fails alone."""
        raise NotImplementedError


def attempt(worker: Worker, inputs: list[Any]) -> list[Result]:
    """`worker.run(inputs)`, isolating a failing item when the batch as a whole raises."""
    if not inputs:
        return []
    try:
        out = worker.run(inputs)
        if len(out) != len(inputs):
            raise RuntimeError(f"{type(worker).__name__} returned {len(out)} results for {len(inputs)} inputs")
        return out
    except Exception as e:  # noqa: BLE001 — isolated below, reported per item
        if len(inputs) == 1:
            return [Failed(f"{type(e).__name__}: {e}")]
        log.warning("a batch of %d failed (%s: %s); retrying its items one by one",
                    len(inputs), type(e).__name__, e)
        return [attempt(worker, [x])[0] for x in inputs]


def where() -> str:
    """This process, for messages from a worker: host and pid."""
    return f"{socket.gethostname()} (pid {os.getpid()})"


@dataclass(frozen=True)
class ExecutorParams:
    """params.yaml `executor`: where model stages compute their missing keys. Not a DVC param of
    any stage, and in no key: the stores are byte-identical whichever executor made them."""

    kind: Literal["local", "ray"] = "local"
    # ray: "local" starts a cluster in this process; "auto" joins the one `ray start` runs on this
    # machine; "host:6379" joins a cluster's head; "ray://host:10001" goes through Ray Client.
    address: str = "local"
    actors: int | None = None  # None: one per GPU; on a CPU-only cluster, CPUs / cpus_per_actor
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    cpus_per_actor: float | None = None  # None: 1 without GPUs; with GPUs, the CPUs shared out (<= 8)
    max_in_flight: int = 2  # batches queued per actor: one computing while the next travels
    connect_timeout_s: float = 30.0  # a cluster that does not answer in this time is an error
    max_restarts: int = 8  # actors replaced after dying (OOM, SIGKILL, a lost node) before giving up

    def validate(self) -> None:
        if self.kind == "ray" and not self.address:
            raise ValueError("executor.address: expected local, auto, host:port or ray://host:port")
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"executor.actors: expected >= 1 or null (auto), got {self.actors}")
        for name in ("gpus_per_actor", "cpus_per_actor"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"executor.{name}: expected >= 0 or null (auto), got {v}")
        if self.max_in_flight < 1:
            raise ValueError(f"executor.max_in_flight: expected >= 1, got {self.max_in_flight}")
        if self.connect_timeout_s <= 0 or self.max_restarts < 0:
            raise ValueError("executor.connect_timeout_s: expected > 0; executor.max_restarts: >= 0")


class LocalModels:
    """The worker in this process, one batch after another: the model spreads itself over the
    cores (or the GPU), so more processes here would only fight over them."""

    name = "local"
    setup_s = 0.0  # the last run's model load: the runner reports throughput without it

    def __enter__(self) -> "LocalModels":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def device(self) -> str:
        """The device the workers compute on: it decides what dtype 'auto' means (and keys)."""
        from models.hub import torch_device

        return torch_device()

    def describe(self) -> str:
        return f"local (this process, {self.device()})"

    def run(self, worker: Worker, n_batches: int,
            inputs_of: Callable[[int], list[Any]]) -> Iterator[tuple[int, list[Result]]]:
        """(batch index, results) for batches 0..n-1; `inputs_of(i)` reads batch i's inputs
        just before it runs, so only one batch of inputs is in memory at a time."""
        t0 = time.perf_counter()
        info = worker.setup()
        self.setup_s = time.perf_counter() - t0
        if info:
            log.info("%s", info)
        for i in range(n_batches):
            yield i, attempt(worker, inputs_of(i))


def check_device(device: str) -> None:
    """A worker keyed for CUDA on a machine without it would compute other bytes under the keys."""
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            from models.hub import SetupError

            raise SetupError(f"{where()}: no CUDA device, but this stage's keys are for CUDA")

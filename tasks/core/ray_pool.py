"""Model stages on a Ray cluster: a pool of actors, each holding one loaded model.

Why actors and not Ray Data's `map_batches`: the driver already knows the exact list of missing
keys, their batches (one bucket per batch, text sorted by length) and their order, and it must
write every result itself, atomically, into the store. What remains is "send these batches to
loaded models and get bytes back", which is an actor pool and a `ray.wait` loop. Ray Data would
add a streaming executor whose CPU budgeting hangs small nodes (ENVIRONMENT.md: actors holding
every CPU starve its read tasks), and would re-batch rows — and batch composition must stay the
driver's, since it is what keeps the bytes equal to the local executor's.

How a batch travels: the driver reads its inputs (image bytes, text) and `ray.put`s them, so a
worker on another machine never needs the driver's filesystem; the actor returns each item's
file bytes (or a failure) and the driver writes them. Code travels too: `tasks` and `models` go
to the cluster as `py_modules`, so every node runs the driver's exact code. Models do not: each
node resolves the same model id and revision itself and refuses a different one.

Faults. An actor that dies (SIGKILL, the OOM killer, a lost node) fails its batches in flight;
they go back to the queue for the other actors, and a replacement actor is started (up to
`executor.max_restarts`). A batch that kills two workers is split into single items, and an
item that kills two workers on its own fails alone — a poison input costs one item, not a stage.
An address where nothing answers is a clear error before anything is computed.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from models.hub import SetupError
from tasks.core.workers import ExecutorParams, Failed, Result, Worker, attempt

log = logging.getLogger("niche")

DEATHS_BEFORE_SPLIT = 2  # a batch in flight on two workers that died is split into single items


class _Host:
    """The actor: one stage's Worker, set up once in its own process."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.ready = False

    def setup(self) -> dict:
        import ray

        info = self.worker.setup()
        self.ready = True
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "gpus": ray.get_gpu_ids(),
                "info": info}

    def run(self, inputs: list[Any], positions: tuple[int, ...] | None) -> list[Result]:
        if not self.ready:
            self.setup()
        if positions is not None:
            inputs = [inputs[i] for i in positions]
        return attempt(self.worker, inputs)


@dataclass
class _Job:
    batch: int
    positions: tuple[int, ...]  # which of the batch's inputs this job computes
    deaths: int = 0  # workers that died while this job was on them


def _host_port(address: str) -> tuple[str, int]:
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise SetupError(f"executor.address {address!r}: expected host:port or ray://host:port "
                         "(or local, auto)")
    return host, int(port)


class RayModels:
    """Runs a stage's Worker in actors on a Ray cluster; see the module docstring."""

    name = "ray"

    def __init__(self, p: ExecutorParams):
        self.p = p
        self._connected = False
        self._disconnect = False  # we called ray.init, so we call ray.shutdown
        self._shape: tuple[int, float, float] | None = None  # actors, gpus each, cpus each
        self.pids: list[int] = []  # of the first actors' processes (for logs)
        self.setup_s = 0.0  # the last run's actor start-up: the runner reports throughput without it
        self.sent = 0  # items sent to the cluster by the last run, retries not counted
        self.retried = 0  # items sent again after their worker died

    def __enter__(self) -> "RayModels":
        return self

    def __exit__(self, *exc) -> None:
        if self._disconnect:
            import ray

            ray.shutdown()  # the actors belong to this driver: they go with it
            self._connected = self._disconnect = False

    # ------------------------------------------------------------------ cluster

    def _connect(self) -> None:
        if self._connected:
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self._connected = True
        if ray.is_initialized():  # a notebook or a test that joined a cluster already keeps it
            return
        address = self.p.address
        # The driver's own code, as folders: every node imports exactly what the driver runs.
        root = Path(__file__).resolve().parents[2]
        env = {"py_modules": [str(root / "tasks"), str(root / "models")],
               "excludes": ["__pycache__", "*.pyc", "tiny/"]}  # models/tiny/: built test weights
        t0 = time.perf_counter()
        if address == "local":
            ray.init(runtime_env=env, include_dashboard=False, log_to_driver=False)
        else:
            if address != "auto":
                self._probe(address)
            try:
                ray.init(address=address, runtime_env=env, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                hint = ""
                if address != "auto" and not os.environ.get("RAY_AUTH_MODE"):
                    # Ray turns token authentication on for clusters started where a token file
                    # exists, but a driver given an explicit address only uses it when told to.
                    hint = (" If the cluster uses token authentication (Ray's default once "
                            "~/.ray/auth_token exists), set RAY_AUTH_MODE=token here too.")
                raise SetupError(f"executor.address {address}: cannot join the Ray cluster: {e}.{hint}") from None
        self._disconnect = True
        log.info("ray: joined %s in %.1f s", address, time.perf_counter() - t0)

    def _probe(self, address: str) -> None:
        # ray.init retries an address where nothing listens for minutes; a plain TCP connect
        # says the same thing within the timeout.
        host, port = _host_port(address)
        try:
            socket.create_connection((host, port), timeout=self.p.connect_timeout_s).close()
        except OSError as e:
            raise SetupError(f"executor.address {address}: no Ray cluster answers there "
                             f"({e or type(e).__name__}). Start one with `ray start --head` on that "
                             "machine, or set executor.kind: local") from None

    def shape(self) -> tuple[int, float, float]:
        """(actors, GPUs per actor, CPUs per actor), from params and the cluster's resources."""
        if self._shape is None:
            self._connect()
            import ray

            res = ray.cluster_resources()
            cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
            p = self.p
            gpa = p.gpus_per_actor if p.gpus_per_actor is not None else (1.0 if gpus >= 1 else 0.0)
            if gpa > gpus:
                raise SetupError(f"executor.gpus_per_actor={gpa:g}, but the Ray cluster has {gpus:g} GPUs")
            if p.actors:
                n = p.actors
            elif gpa:
                n = max(1, int(gpus // gpa))
            else:
                n = max(1, int(cpus // (p.cpus_per_actor or 1.0)))
            if p.cpus_per_actor is not None:
                cpa = p.cpus_per_actor
            else:  # a whole CPU each when there is one; GPU actors share the rest out (<= 8)
                cpa = 1.0 if not gpa else min(8.0, max(0.5, (cpus // (n / 2)) / 2))
                cpa = min(cpa, cpus / n) if cpus else 0.0
            if cpa * n > cpus + 1e-9 or gpa * n > gpus + 1e-9:
                raise SetupError(f"executor: {n} actors x ({cpa:g} CPU, {gpa:g} GPU) do not fit the Ray "
                                 f"cluster ({cpus:g} CPU, {gpus:g} GPU); lower executor.actors")
            self._shape = (n, gpa, cpa)
            log.info("ray: cluster has %g CPU, %g GPU on %d node(s); %d actors x (%g CPU, %g GPU)",
                     cpus, gpus, len([x for x in ray.nodes() if x.get("Alive")]), n, cpa, gpa)
        return self._shape

    def device(self) -> str:
        """Where the actors compute: it decides what dtype 'auto' means, which keys hold. Asks
        the cluster only when executor.gpus_per_actor is auto."""
        if self.p.gpus_per_actor is not None:
            return "cuda" if self.p.gpus_per_actor > 0 else "cpu"
        return "cuda" if self.shape()[1] > 0 else "cpu"

    def describe(self) -> str:
        n, gpa, cpa = self.shape()
        return f"ray at {self.p.address} ({n} actors x {cpa:g} CPU, {gpa:g} GPU)"

    # ------------------------------------------------------------------ work

    def _start(self, cls, worker: Worker):
        return cls.remote(worker)

    def run(self, worker: Worker, n_batches: int,
            inputs_of: Callable[[int], list[Any]]) -> Iterator[tuple[int, list[Result]]]:
        """(batch index, results) as batches finish, in any order."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        n, gpa, cpa = self.shape()
        self.sent = self.retried = 0
        cls = ray.remote(num_cpus=cpa, num_gpus=gpa, max_restarts=0)(_Host)
        t0 = time.perf_counter()
        actors = [cls.remote(worker) for _ in range(n)]
        try:
            infos = ray.get([a.setup.remote() for a in actors])
        except RayTaskError as e:
            raise SetupError(f"a Ray worker could not load its model: {e.cause}") from None
        self.setup_s = time.perf_counter() - t0
        log.info("ray: %d actors ready in %.1f s (process start, imports, model load)", n, self.setup_s)
        for i in infos:
            log.info("ray: actor pid %s on %s%s%s", i["pid"], i["node"],
                     f" GPU {i['gpus']}" if i["gpus"] else "", f": {i['info']}" if i["info"] else "")
        self.pids = [i["pid"] for i in infos]
        live = dict(enumerate(actors))
        load = {a: 0 for a in live}
        restarts = 0
        queue: deque[_Job] = deque()
        refs: dict[int, Any] = {}  # batch -> its inputs in the object store
        results: dict[int, list] = {}
        outstanding: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, _Job]] = {}
        next_batch = 0

        def next_job() -> _Job | None:
            nonlocal next_batch
            if queue:
                return queue.popleft()
            if next_batch >= n_batches:
                return None
            b, next_batch = next_batch, next_batch + 1
            inputs = inputs_of(b)
            self.sent += len(inputs)
            refs[b] = ray.put(inputs)
            results[b] = [None] * len(inputs)
            outstanding[b] = len(inputs)
            return _Job(b, tuple(range(len(inputs))))

        while True:
            for a in sorted(live, key=load.get):
                while load[a] < self.p.max_in_flight:
                    job = next_job()
                    if job is None:
                        break
                    if not job.positions:  # every input failed on the driver: nothing to send
                        refs.pop(job.batch)
                        outstanding.pop(job.batch)
                        yield job.batch, results.pop(job.batch)
                        continue
                    whole = len(job.positions) == len(results[job.batch])
                    ref = live[a].run.remote(refs[job.batch], None if whole else job.positions)
                    in_flight[ref] = (a, job)
                    load[a] += 1
            if not in_flight:
                if queue or next_batch < n_batches:
                    raise RuntimeError("ray: no live actors left to compute on")
                log.info("ray: %d items in %d batches sent to %d actors; %d sent again after a worker "
                         "died, %d actors replaced", self.sent, n_batches, n, self.retried, restarts)
                return
            try:
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                ref = ready[0]
                a, job = in_flight.pop(ref)
                load[a] -= 1
                out = ray.get(ref)
            except RayActorError as e:
                if a in live:
                    del live[a]
                    log.warning("ray: an actor died (%s); its batches go to the others",
                                str(e).splitlines()[0])
                    if restarts < self.p.max_restarts:
                        restarts += 1
                        key = max(load) + 1
                        live[key], load[key] = self._start(cls, worker), 0
                    elif not live:
                        raise RuntimeError(f"ray: every actor died and executor.max_restarts="
                                           f"{self.p.max_restarts} replacements are used up; last: {e}") from None
                job.deaths += 1
                self.retried += len(job.positions)
                if job.deaths < DEATHS_BEFORE_SPLIT:
                    queue.appendleft(job)
                elif len(job.positions) > 1:
                    queue.extendleft(_Job(job.batch, (i,), 1) for i in job.positions)
                else:
                    out = [Failed(f"the worker process died twice while computing this item "
                                  f"(out of memory, or a crash in the model): {str(e).splitlines()[0]}")]
                    yield from self._land(job, out, results, outstanding, refs)
                continue
            except (RayTaskError, GetTimeoutError) as e:  # attempt() catches per item: an engine fault
                cause = getattr(e, "cause", None) or e
                out = [Failed(f"ray: {type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}")
                       ] * len(job.positions)
            yield from self._land(job, out, results, outstanding, refs)

    @staticmethod
    def _land(job: _Job, out: list[Result], results: dict, outstanding: dict,
              refs: dict) -> Iterator[tuple[int, list[Result]]]:
        for pos, r in zip(job.positions, out):
            results[job.batch][pos] = r
        outstanding[job.batch] -= len(job.positions)
        if outstanding[job.batch] == 0:
            del outstanding[job.batch], refs[job.batch]
            yield job.batch, results.pop(job.batch)

"""A training run's bookkeeping, the same for both trainers: the error that stops a run, the
seeded per-step generator that makes a resume exact, the process group under torchrun, the
memory figure, and moving a run made with other settings aside (never deleting it)."""
from __future__ import annotations

import logging
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("niche.train")


class TrainError(Exception):
    """The run cannot go on; the message says why and what is intact."""


def seeded(*keys: int) -> torch.Generator:
    """A generator seeded by (seed, step, micro, rank, ...): the randomness of a step depends on
    where it is in the run, never on what ran before, so a resumed run draws the same numbers."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank), starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB (process peak RSS)


def supersede(run_dir: Path, why: str) -> None:
    """Move the run's checkpoints, samples and live metrics to runs/<run>.superseded-<time>/."""
    parts = [d for d in ("checkpoints", "samples", "live") if (run_dir / d).exists() and any((run_dir / d).iterdir())]
    if not parts:
        return
    dest = run_dir.with_name(f"{run_dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    dest.mkdir(parents=True)
    for d in parts:
        shutil.move(str(run_dir / d), str(dest / d))
    log.warning("train: %s; the previous run's files were moved to %s and training starts over", why, dest)

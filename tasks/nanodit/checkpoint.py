"""A NanoDiT run's checkpoints: resume or start over, and save (tasks/training/checkpoints.py
writes the folder atomically).

Everything that must survive a restart is named here: the model and its EMA, the optimizers
and schedulers, every rank's loader position, the RNG states, the counters and the logging
window. Rank 0 alone decides between resuming and moving an old run aside, then tells the
others: a rank reading runs/<run>/checkpoints while rank 0 moves it would lose it halfway.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from models.nanodit import NanoDiT
from tasks.data.loader import ShardLoader
from tasks.training import checkpoints
from tasks.training.live import Window
from tasks.training.run import supersede

log = logging.getLogger("niche.train")


@dataclass
class RunState:
    """What a checkpoint restores beyond the tensors: the step, the counters, the log window."""
    step: int
    counters: dict
    window: Window


class Checkpointer:
    def __init__(self, run_dir: Path, model: NanoDiT, ema: NanoDiT, opts: list, scheds: list,
                 loader: ShardLoader, rank: int, world: int, keep: int):
        self.dir = run_dir / "checkpoints"
        self.run_dir, self.model, self.ema, self.opts, self.scheds = run_dir, model, ema, opts, scheds
        self.loader, self.rank, self.world, self.keep = loader, rank, world, keep

    def resume(self, fingerprint: str, resume: str, state: RunState) -> None:
        """Load the newest checkpoint into everything when it was made by this run's settings
        (`state` is updated in place); otherwise move the old run aside and leave all as built."""
        chosen = [self._resumable(fingerprint, resume) if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(chosen, src=0)
        if chosen[0] is not None:
            self._load(chosen[0], state)

    def _resumable(self, fingerprint: str, resume: str) -> Path | None:
        """The checkpoint to resume from; None after moving anything else in the run aside."""
        ckpt = checkpoints.latest(self.dir)
        if ckpt is not None and resume == "auto":
            meta = checkpoints.read_meta(ckpt)
            if meta.get("fingerprint") == fingerprint:
                return ckpt
            why = f"{ckpt} was made with other settings or shards (fingerprint {meta.get('fingerprint', '?')[:12]})"
        else:
            why = "train.resume is never" if ckpt is not None else "no checkpoint to resume from"
        supersede(self.run_dir, why)
        return None

    def _load(self, ckpt: Path, state: RunState) -> None:
        saved = checkpoints.load_state(ckpt)
        self.model.load_state_dict(NanoDiT.from_pretrained(ckpt / "model").state_dict())
        self.ema.load_state_dict(NanoDiT.from_pretrained(ckpt / "ema").state_dict())
        for o, s in zip(self.opts, saved["optimizers"]):
            o.load_state_dict(s)
        for sc, s in zip(self.scheds, saved["schedulers"]):
            sc.load_state_dict(s)
        self.loader.load_state_dict(saved["loader"][self.rank])
        checkpoints.set_rng_state(saved["rng"])
        state.step, state.counters = int(checkpoints.read_meta(ckpt)["step"]), dict(saved["counters"])
        if "window" in saved:
            state.window.load_state_dict(saved["window"])
        log.info("train: resumed from %s (step %d)", ckpt, state.step)

    def save(self, state: RunState, loss: float, meta_base: dict) -> Path | None:
        """Every rank's loader position is gathered; rank 0 writes the step and prunes old ones."""
        loaders = [self.loader.state_dict()]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, loaders[0])
            loaders = gathered
        path = None
        if self.rank == 0:
            saved = {"optimizers": [o.state_dict() for o in self.opts],
                     "schedulers": [s.state_dict() for s in self.scheds], "loader": loaders,
                     "rng": checkpoints.rng_state(), "counters": dict(state.counters),
                     "window": state.window.state_dict()}
            meta = {**meta_base, "step": state.step, "loss": loss, "time": time.time()}
            path = checkpoints.save(self.dir, state.step, self.model, self.ema, saved, meta, self.keep)
            log.info("train: checkpoint %s", path)
        if self.world > 1:
            dist.barrier()
        return path

    def latest(self) -> Path | None:
        return checkpoints.latest(self.dir)


"""Training checkpoints: written whole or not at all, loaded with weights_only=True.

    runs/<run>/checkpoints/step-000500/
        model/  ema/       NanoDiT.save_pretrained (config.json + safetensors)
        state.pt           optimizers, schedulers, every rank's loader position, RNG states,
                           counters — plain tensors and containers only
        meta.json          step, the run's fingerprint, the params it was trained with,
                           the dataset params (for generation), loss at that step

A checkpoint is assembled in a hidden temporary folder, every file fsync'd, then
renamed into place: a crash at any moment leaves either the old set or the new
one, never a half-written step. The newest `keep` are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d{6,})$")


def step_dirs(checkpoints: Path, need: tuple[str, ...] = ("meta.json", "state.pt")) -> list[tuple[int, Path]]:
    """Finished checkpoints holding the files `need`, oldest first."""
    if not checkpoints.is_dir():
        return []
    found = []
    for d in checkpoints.iterdir():
        m = STEP_DIR.match(d.name)
        if m and all((d / f).is_file() for f in need):
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(checkpoints: Path) -> Path | None:
    dirs = step_dirs(checkpoints)
    return dirs[-1][1] if dirs else None


def read_meta(ckpt: Path) -> dict:
    return json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": list(random.getstate()[1]), "python_version": random.getstate()[0],
             "python_gauss": random.getstate()[2],
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")) + [root]:
        _fsync(path)


def write_step(checkpoints: Path, step: int, write: Callable[[Path], None], meta: dict) -> Path:
    """checkpoints/step-N, whole or not at all: `write(folder)` fills a hidden temporary folder,
    meta.json goes in last, every file is fsync'd, then the folder is renamed into place."""
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{step:06d}"
    tmp = checkpoints / f".step-{step:06d}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():  # the same step again (a resumed run that re-saves): replace it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync(checkpoints)  # the rename itself survives a power cut
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for d in checkpoints.glob(".step-*.tmp"):  # a crash mid-save left it
        shutil.rmtree(d, ignore_errors=True)
    return final


def save(checkpoints: Path, step: int, model, ema, state: dict, meta: dict, keep: int) -> Path:
    """Write step `step` atomically, then drop all but the newest `keep` and any leftovers."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp / "model", safe_serialization=True)
        ema.save_pretrained(tmp / "ema", safe_serialization=True)
        torch.save(state, tmp / "state.pt")

    final = write_step(checkpoints, step, write, meta)
    prune(checkpoints, keep)
    return final


def prune(checkpoints: Path, keep: int) -> None:
    for _, d in step_dirs(checkpoints)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def load_state(ckpt: Path, map_location="cpu") -> dict:
    return torch.load(ckpt / "state.pt", map_location=map_location, weights_only=True)

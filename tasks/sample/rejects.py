"""Images a curator would reject: particle figures with a visible defect.

They stand in for the ~90% of generations a user throws away and keeps beside
the approved ones (`data/raw/rejected/`), the training set of a "negative" LoRA.
Each defect is cheap to draw and obvious at a glance:

    scrambled  the figure cut into a 4x4 grid whose tiles are all moved (a broken body)
    noisy      heavy grain over the whole image
    blurred    so soft that no particle is sharp

Everything about reject i comes from numpy.random.default_rng([seed, i, STREAM]),
a stream no approved figure uses, so a reject is never the same bytes as a figure
and extending the set keeps the files already written.
"""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tasks.sample.particles import SIZES, _write_atomic, encode_image, render_figure
from tasks.sample.skeleton import sample_pose

DEFECTS = ("scrambled", "noisy", "blurred")
STREAM = 0x5EC7  # a third seed word: figures use [seed, i], rejects [seed, i, STREAM]
GRID = 4
NOISE_SIGMA = 70.0
BLUR_RADIUS = 12


def scramble(img: Image.Image, rng: np.random.Generator, grid: int = GRID) -> Image.Image:
    """Move every tile of a grid x grid cut to another tile's place (one cycle: none stays)."""
    a = np.asarray(img)
    th, tw = a.shape[0] // grid, a.shape[1] // grid
    out = a.copy()
    order = rng.permutation(grid * grid)
    for j, src in enumerate(order):
        dst = order[(j + 1) % len(order)]
        (sy, sx), (dy, dx) = divmod(int(src), grid), divmod(int(dst), grid)
        out[dy * th:(dy + 1) * th, dx * tw:(dx + 1) * tw] = a[sy * th:(sy + 1) * th, sx * tw:(sx + 1) * tw]
    return Image.fromarray(out)


def add_noise(img: Image.Image, rng: np.random.Generator, sigma: float = NOISE_SIGMA) -> Image.Image:
    a = np.asarray(img).astype(np.float32)
    grain = rng.normal(0.0, sigma, a.shape[:2])[..., None]  # grey grain, like sensor noise
    return Image.fromarray(np.clip(a + grain, 0, 255).astype(np.uint8))


def make_reject(seed: int, index: int) -> tuple[Image.Image, Image.Image, str]:
    """(reject, the clean figure it was made from, defect name) for reject `index`."""
    rng = np.random.default_rng([seed, index, STREAM])
    width, height = SIZES[index % len(SIZES)]
    clean = render_figure(sample_pose(rng, width, height).keypoints, width, height, rng)
    defect = DEFECTS[index % len(DEFECTS)]
    if defect == "scrambled":
        img = scramble(clean, rng)
    elif defect == "noisy":
        img = add_noise(clean, rng)
    else:
        img = clean.filter(ImageFilter.GaussianBlur(BLUR_RADIUS))
    return img, clean, defect


def write_rejects(out_dir: str | os.PathLike, count: int, seed: int = 0, start: int = 0) -> list[Path]:
    """Write rejects start..start+count-1 (no captions: a negative LoRA uses one fixed prompt)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        img, _, defect = make_reject(seed, i)
        # Grain does not compress losslessly (~3 MB as PNG); the others stay PNG.
        fmt = "jpg" if defect == "noisy" else "png"
        path = out / f"reject_{i:05d}.{fmt}"
        _write_atomic(path, encode_image(img, fmt))
        paths.append(path)
    return paths


def write_corrupt_reject(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A truncated PNG among the rejects: quarantined as corrupt, never counted as a reject."""
    img, _, _ = make_reject(seed, 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    path = Path(out_dir) / "broken_reject.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, data[: len(data) // 2])
    return path

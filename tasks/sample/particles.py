"""Render skeleton poses as sparse black particles on white and write a sample dataset.

Everything about image i comes from numpy.random.default_rng([seed, i]), so a
dataset can be extended (or regenerated) without changing the files it already has.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tasks.sample.skeleton import BONE_RADII, BONES, HEAD_R, SPINE, sample_pose

# Roughly 1-1.6 MP each, portrait and landscape, cycled by image index.
SIZES: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1248, 832), (832, 1248), (1344, 768), (768, 1344),
    (1456, 704), (704, 1456), (1200, 900), (900, 1200))
JPEG_SHARE = 0.3
PNG_COMPRESS_LEVEL = 6  # measured: level 3 is ~8 ms faster per image but ~35% larger; 9 is 3x slower for ~5%
_DOTS_PER_AREA = 95.0  # particles per square head unit of body at density 1


def _capsule(a: np.ndarray, b: np.ndarray, radius: float, count: int, rng: np.random.Generator) -> np.ndarray:
    """count points inside a capsule, denser toward its axis so limbs keep a readable line."""
    along = rng.uniform(-0.05, 1.05, count)
    d = b - a
    length = float(np.hypot(*d))
    normal = np.array([-d[1], d[0]]) / length if length > 1e-9 else np.array([1.0, 0.0])
    across = np.clip(rng.normal(0.0, 0.55, count), -1.0, 1.0) * radius
    return a + along[:, None] * d + across[:, None] * normal


def _count(area: float, density: float, rng: np.random.Generator) -> int:
    return int(rng.poisson(max(area * density * _DOTS_PER_AREA, 0.5)))


def _particles(kp: np.ndarray, unit: float, density: float, rng: np.random.Generator) -> np.ndarray:
    """All particle centres for one figure; unit is pixels per head unit."""
    parts = []
    for (i, j), r in zip(BONES, BONE_RADII):
        length = np.hypot(*(kp[j] - kp[i])) / unit
        parts.append(_capsule(kp[i], kp[j], r * unit, _count(2 * r * length + 0.5 * r * r, density, rng), rng))

    # Torso: bilinear samples over the shoulder-hip quad plus a thick spine, so a
    # side view (where the quad collapses to a sliver) still has a chest.
    ls, rs, lh, rh = kp[5], kp[6], kp[11], kp[12]
    d1, d2 = rh - ls, lh - rs
    quad_area = 0.5 * abs(d1[0] * d2[1] - d1[1] * d2[0]) / unit ** 2
    n = _count(quad_area * 0.7, density, rng)
    u, v = rng.uniform(0, 1, (2, n, 1))
    parts.append((1 - v) * ((1 - u) * ls + u * rs) + v * ((1 - u) * lh + u * rh))
    neck_base, pelvis = (ls + rs) / 2, (lh + rh) / 2
    parts.append(_capsule(neck_base, pelvis, 0.5 * unit, _count(SPINE * 0.8, density, rng), rng))

    # Head: a filled disc with a denser rim so it reads as a round head, joined by a neck.
    centre, r = (kp[3] + kp[4]) / 2, HEAD_R * unit
    neck = np.hypot(*(centre - neck_base)) / unit
    parts.append(_capsule(neck_base, centre, 0.2 * unit, _count(0.6 * neck, density, rng), rng))
    n = _count(np.pi * HEAD_R ** 2 * 0.9, density, rng)
    rim = rng.random(n) < 0.45
    rad = np.where(rim, rng.uniform(0.86, 1.0, n), np.sqrt(rng.uniform(0, 0.8, n))) * r
    ang = rng.uniform(0, 2 * np.pi, n)
    parts.append(centre + np.column_stack([np.cos(ang), np.sin(ang)]) * rad[:, None])

    # A few stray flecks around the figure, like dust on a print.
    lo, hi = kp.min(0) - unit, kp.max(0) + unit
    parts.append(rng.uniform(lo, hi, (int(rng.integers(4, 20)), 2)))
    return np.concatenate(parts)


def render_figure(keypoints: np.ndarray, width: int, height: int, rng: np.random.Generator,
                  density: float = 1.0) -> Image.Image:
    """Draw a (133, 2) pixel-space skeleton as black particles on a white RGB canvas."""
    kp = np.asarray(keypoints, dtype=np.float64)
    unit = float(np.hypot(*((kp[5] + kp[6]) / 2 - (kp[11] + kp[12]) / 2))) / SPINE
    pts = _particles(kp, unit, density, rng)
    n = len(pts)
    dot = float(np.clip(0.035 * unit, 1.0, 3.0))
    rx = dot * rng.uniform(0.6, 1.25, n)
    ry = rx * rng.uniform(0.6, 1.4, n)  # slightly elongated specks look less mechanical
    grey = rng.integers(0, 70, n)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    boxes = np.column_stack([pts[:, 0] - rx, pts[:, 1] - ry, pts[:, 0] + rx, pts[:, 1] + ry]).tolist()
    for box, g in zip(boxes, grey.tolist()):
        draw.ellipse(box, fill=(g, g, g))
    return img


def _write_atomic(path: Path, data: bytes) -> None:
    # Identical content is left alone so regenerating a dataset does not touch mtimes.
    if path.exists() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def encode_image(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def make_sample(seed: int, index: int) -> tuple[dict, str, Image.Image, str]:
    """(pose record, caption, image, file extension) for one dataset item."""
    rng = np.random.default_rng([seed, index])
    width, height = SIZES[index % len(SIZES)]
    fmt = "jpg" if rng.random() < JPEG_SHARE else "png"
    pose = sample_pose(rng, width, height)
    img = render_figure(pose.keypoints, width, height, rng)
    record = {"format": "coco_wholebody_133", "width": width, "height": height, "pose": pose.name,
              "keypoints": [[round(float(x), 2), round(float(y), 2), 1.0] for x, y in pose.keypoints]}
    return record, pose.caption, img, fmt


def write_particle_dataset(out_dir: str | os.PathLike, count: int, seed: int = 0, start: int = 0) -> list[Path]:
    """Write images start..start+count-1 with .txt captions and .pose.json keypoints; return image paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        record, caption, img, fmt = make_sample(seed, i)
        stem = f"figure_{i:05d}"
        # Sidecars first: whoever sees the image appear can rely on them being there.
        _write_atomic(out / f"{stem}.txt", (caption + "\n").encode("utf-8"))
        _write_atomic(out / f"{stem}.pose.json", json.dumps(record).encode("utf-8"))
        image_path = out / f"{stem}.{fmt}"
        _write_atomic(image_path, encode_image(img, fmt))
        paths.append(image_path)
    return paths

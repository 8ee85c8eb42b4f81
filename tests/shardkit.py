"""Shards in the shard stage's FORMAT, from random arrays: for the loader's tests
and benchmark, so they do not depend on the stage.

    ROOT/{split}/{bucket}/shard-{n:06d}.tar, ROOT/index.parquet, ROOT/shards.parquet

Members per sample, in order: {id}.image.png, .t5.npy, .dino_cls.npy,
.dino_patches.npy, [.dino_scale.npy when the patches are int8], .pose.npy, .json
"""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


@dataclass(frozen=True)
class Spec:
    t5_dim: int = 8
    t5_len: tuple[int, int] = (2, 12)  # tokens drawn in [lo, hi]
    dino_dim: int = 16
    patch: int = 16  # DINO patch size: the grid is (H/patch, W/patch)
    int8: bool = True  # int8 patches + a float16 scale, else float16 patches
    png_level: int = 1


def npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def png(a: np.ndarray, level: int = 1) -> bytes:
    b = io.BytesIO()
    Image.fromarray(a).save(b, format="PNG", compress_level=level)
    return b.getvalue()


def make_sample(rng: np.random.Generator, sid: str, bucket: str, split: str, spec: Spec,
                image: np.ndarray | None = None, png_bytes: bytes | None = None) -> dict:
    """One sample's arrays (image (H, W, 3) uint8, ...) and its tar members."""
    w, h = (int(v) for v in bucket.split("x"))
    if image is None and png_bytes is None:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    gh, gw, D = h // spec.patch, w // spec.patch, spec.dino_dim
    s = {"id": sid, "bucket": bucket, "split": split, "caption": f"sample {sid[:8]} in {bucket}",
         "image": image,
         "t5": rng.standard_normal((int(rng.integers(spec.t5_len[0], spec.t5_len[1] + 1)), spec.t5_dim)
                                   ).astype(np.float16),
         "dino_cls": rng.standard_normal(D).astype(np.float16),
         "pose": np.concatenate([rng.uniform(-1, 1, (133, 2)), rng.uniform(0, 1, (133, 1))],
                                1).astype(np.float16)}  # [x_norm, y_norm, conf]
    if spec.int8:
        s["dino_patches"] = rng.integers(-127, 128, (gh, gw, D), dtype=np.int8)
        s["dino_scale"] = rng.uniform(0.001, 0.05, (gh, gw)).astype(np.float16)
    else:
        s["dino_patches"] = rng.standard_normal((gh, gw, D)).astype(np.float16)
    meta = {"id": sid, "caption": s["caption"], "bucket": bucket, "width": w, "height": h, "split": split}
    members = [("image.png", png_bytes if png_bytes is not None else png(image, spec.png_level)),
               ("t5.npy", npy(s["t5"])), ("dino_cls.npy", npy(s["dino_cls"])),
               ("dino_patches.npy", npy(s["dino_patches"]))]
    if spec.int8:
        members.append(("dino_scale.npy", npy(s["dino_scale"])))
    members += [("pose.npy", npy(s["pose"])), ("json", json.dumps(meta).encode())]
    s["members"] = members
    return s


def write_tar(path: Path, samples: list[dict]) -> list[tuple[int, int]]:
    """Write the samples' members; return each sample's (offset, bytes) in the archive."""
    spans = []
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            start = tar.offset
            for ext, data in s["members"]:
                info = tarfile.TarInfo(f"{s['id']}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
            spans.append((start, tar.offset - start))
    return spans


def write_dataset(root: Path, counts: dict[str, int], shard_size: int = 8, spec: Spec = Spec(),
                  seed: int = 0, holdout: dict[str, int] | None = None, keep: bool = True,
                  png_pool: dict[str, list[bytes]] | None = None) -> dict[str, dict]:
    """`counts` train samples per bucket (+ `holdout` per bucket) in shards of `shard_size`.
    Returns {id: sample} (arrays dropped unless `keep`)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    out, index, shards, k = {}, [], [], 0
    for split, per in (("train", counts), ("holdout", holdout or {})):
        for bucket, n in sorted(per.items()):
            samples = []
            for _ in range(n):
                sid = hashlib.sha256(f"{seed}/{k}".encode()).hexdigest()
                pool = (png_pool or {}).get(bucket)
                samples.append(make_sample(rng, sid, bucket, split, spec,
                                           png_bytes=pool[k % len(pool)] if pool else None))
                k += 1
            for j in range(0, n, shard_size):
                chunk = samples[j:j + shard_size]
                rel = f"{split}/{bucket}/shard-{j // shard_size:06d}.tar"
                spans = write_tar(root / rel, chunk)
                data = (root / rel).read_bytes()
                shards.append({"shard": rel, "split": split, "bucket": bucket, "samples": len(chunk),
                               "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
                for s, (off, size) in zip(chunk, spans):
                    index.append({"id": s["id"], "split": split, "bucket": bucket, "shard": rel,
                                  "offset": off, "bytes": size, "error": None})
                    s["shard"] = rel
                    out[s["id"]] = s if keep else {kk: s[kk] for kk in ("id", "bucket", "split", "shard")}
    pq.write_table(pa.Table.from_pylist(index), root / "index.parquet")
    pq.write_table(pa.Table.from_pylist(shards), root / "shards.parquet")
    return out


def member_span(path: Path, name: str) -> tuple[int, int]:
    """(offset of the data, size) of a member."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
        return info.offset_data, info.size


def truncate_in_member(path: Path, name: str) -> None:
    """Cut the archive in the middle of a member's data."""
    off, size = member_span(path, name)
    data = path.read_bytes()
    path.write_bytes(data[:off + size // 2])


def garble_member(path: Path, name: str) -> None:
    """Overwrite a member's data with junk of the same length (the archive stays valid)."""
    off, size = member_span(path, name)
    data = bytearray(path.read_bytes())
    data[off:off + size] = b"\x00junk" * (size // 5) + b"\x00" * (size % 5)
    path.write_bytes(bytes(data))

"""The members of one sample in a shard: names, order, encoding and exact sizes.

Per sample, in this order (names `{id}.{ext}`, id = the 64-hex content id):

    image.png          the bucketed PNG, bytes copied verbatim from the bucket store
    t5.npy             (n, Dt) float16 T5 hidden states, n = real tokens incl. EOS
    dino_cls.npy       (Di,) float16
    dino_patches.npy   (h, w, Di) int8 or float16; h, w = grid / patch_pool
    dino_scale.npy     (h, w) float16 per-token scales; only with int8
    pose.npy           (133, 3) float16 [x_norm, y_norm, conf]
    json               UTF-8 {"format": 1, "id", "caption", "bucket", "width", "height",
                       "split", "source", "n_people", "t5_length", "patch_pool",
                       "patch_dtype", "keys": {stage: upstream item key}}

int8 patches dequantize as q * scale[..., None] (symmetric per token, scale =
max|x| / 127). `webdataset.WebDataset(url).decode()` decodes the .npy and json
members; the PNG stays bytes unless an image spec is given (`.decode("rgb8")`).

Every size is known before a byte is encoded (`member_sizes`), so the stage
plans shards and their index without reading the arrays, and the writer checks
that what it wrote is what was planned. Tars are USTAR with every variable
header field fixed, so the same samples always give the same bytes.
"""
from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.core.store import ItemRef, atomic_write, sha256_file, tensors_from_bytes

FORMAT = 1  # bump when the bytes written for the same inputs would change
BLOCK = tarfile.BLOCKSIZE  # 512
RECORD = tarfile.RECORDSIZE  # tarfile pads a closed archive to a multiple of this
END = 2 * BLOCK  # the end-of-archive marker
POSE_SHAPE = (133, 3)
# Member extensions in the order they are written; dino_scale only with int8.
MEMBERS = ("image.png", "t5.npy", "dino_cls.npy", "dino_patches.npy", "dino_scale.npy", "pose.npy", "json")
# Which report column each member's bytes count towards.
MODALITY = {"image.png": "image", "t5.npy": "t5", "dino_cls.npy": "dino_cls",
            "dino_patches.npy": "dino_patches", "dino_scale.npy": "dino_patches",
            "pose.npy": "pose", "json": "json"}


@dataclass(frozen=True)
class Sample:
    """What one sample's members are made of: the manifests' facts and the items' paths."""

    id: str
    split: str
    bucket: str
    width: int
    height: int
    caption: str
    source: str
    n_people: int
    t5_length: int
    t5_dim: int
    dino_dim: int
    grid: tuple[int, int]  # DINOv3 patch rows, columns = (H/16, W/16)
    image: ItemRef       # the bucketed PNG
    image_bytes: int
    text: ItemRef        # T5 hidden states
    dino: ItemRef        # DINOv3 CLS and patches
    pose: ItemRef
    keys: tuple[tuple[str, str], ...]  # (stage, item key) of every upstream item


def npy_size(shape: tuple[int, ...], dtype) -> int:
    """Bytes of np.save(array of this shape and dtype), header included."""
    dt = np.dtype(dtype)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(dt), "fortran_order": False, "shape": tuple(shape)})
    return buf.tell() + math.prod(shape) * dt.itemsize


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def tar_size(nbytes: int) -> int:
    """Bytes one member takes in a USTAR tar: its header and its data padded to a block."""
    return BLOCK + -(-nbytes // BLOCK) * BLOCK


def shard_size(sample_bytes: int) -> int:
    """Bytes of a closed tar whose members take `sample_bytes` (tarfile pads to RECORD)."""
    return -(-(sample_bytes + END) // RECORD) * RECORD


def pooled_grid(grid: tuple[int, int], pool: int) -> tuple[int, int]:
    return grid[0] // pool, grid[1] // pool


def sample_json(s: Sample, patch_pool: int, patch_dtype: str) -> bytes:
    doc = {"format": FORMAT, "id": s.id, "caption": s.caption, "bucket": s.bucket,
           "width": s.width, "height": s.height, "split": s.split, "source": s.source,
           "n_people": s.n_people, "t5_length": s.t5_length, "patch_pool": patch_pool,
           "patch_dtype": patch_dtype, "keys": dict(s.keys)}
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def member_sizes(s: Sample, patch_pool: int, patch_dtype: str) -> dict[str, int]:
    """Data bytes of each member (tar headers not included), in write order."""
    h, w = pooled_grid(s.grid, patch_pool)
    sizes = {
        "image.png": s.image_bytes,
        "t5.npy": npy_size((s.t5_length, s.t5_dim), np.float16),
        "dino_cls.npy": npy_size((s.dino_dim,), np.float16),
        "dino_patches.npy": npy_size((h, w, s.dino_dim), np.int8 if patch_dtype == "int8" else np.float16),
        "dino_scale.npy": npy_size((h, w), np.float16) if patch_dtype == "int8" else None,
        "pose.npy": npy_size(POSE_SHAPE, np.float16),
        "json": len(sample_json(s, patch_pool, patch_dtype)),
    }
    return {k: v for k, v in sizes.items() if v is not None}


# ---------------------------------------------------------------- items

def tensor_shapes(item: ItemRef) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header, without reading the arrays; refuses a truncated item."""
    store = item.store()
    head = store.head(item.key, 4096)  # a T5/DINOv3/pose header fits: one read, not two
    n = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if not 2 <= n <= 1 << 24:
        raise ValueError("not a safetensors file")
    if len(head) < 8 + n:
        head = store.head(item.key, 8 + n)
    header = json.loads(head[8:8 + n])
    header.pop("__metadata__", None)
    if store.size(item.key) < 8 + n + max((v["data_offsets"][1] for v in header.values()), default=0):
        raise ValueError("truncated")
    return {k: tuple(v["shape"]) for k, v in header.items()}


def read_arrays(item: ItemRef) -> dict[str, np.ndarray]:
    return tensors_from_bytes(item.read(), str(item))[0]


# ---------------------------------------------------------------- DINOv3 patches

def pool_patches(patches: np.ndarray, pool: int) -> np.ndarray:
    """(H, W, D) → (H/pool, W/pool, D) float32 means of pool×pool blocks."""
    x = patches.astype(np.float32)
    if pool == 1:
        return x
    gh, gw, d = x.shape
    return x.reshape(gh // pool, pool, gw // pool, pool, d).mean(axis=(1, 3))


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per token: (q (h, w, D) int8, scale (h, w) float16), x ≈ q * scale.

    The scale is rounded to float16 first and q is computed against the rounded
    scale, so a reader's dequantization error is at most half a step (plus the
    clip of the few values the rounding put just past 127 steps).
    """
    amax = np.abs(x).max(axis=-1)
    scale = (amax / 127.0).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s32 > 0, np.rint(x / s32), 0.0)
    return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return q.astype(np.float32) * scale.astype(np.float32)[..., None]


# ---------------------------------------------------------------- encoding

def encode(s: Sample, arrays: dict[str, np.ndarray], png: bytes, patch_pool: int,
           patch_dtype: str) -> list[tuple[str, bytes]]:
    """[(member name, bytes)] of one sample, in write order.

    `arrays` holds the upstream items: hidden (n, Dt), cls (Di,), patches (H/16, W/16, Di), pose (133, 3).
    """
    pooled = pool_patches(arrays["patches"], patch_pool)
    if patch_dtype == "int8":
        q, scale = quantize(pooled)
        dino = {"dino_patches.npy": npy_bytes(q), "dino_scale.npy": npy_bytes(scale)}
    else:
        dino = {"dino_patches.npy": npy_bytes(pooled.astype(np.float16))}
    data = {
        "image.png": png,
        "t5.npy": npy_bytes(arrays["hidden"].astype(np.float16, copy=False)),
        "dino_cls.npy": npy_bytes(arrays["cls"].astype(np.float16, copy=False)),
        **dino,
        "pose.npy": npy_bytes(arrays["pose"].astype(np.float16, copy=False)),
        "json": sample_json(s, patch_pool, patch_dtype),
    }
    return [(f"{s.id}.{ext}", data[ext]) for ext in MEMBERS if ext in data]


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """A member header with every field that could vary fixed: same input, same bytes."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def write_tar(path: Path, shard, patch_pool: int, patch_dtype: str) -> str:
    """Write a planned shard (its samples, offsets, member sizes and bytes) to `path`
    atomically; returns its sha256. Anything that differs from the plan means an
    upstream item changed under its key, and stops the stage."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s, offset, sizes in zip(shard.samples, shard.offsets, shard.sizes):
                arrays = {**read_arrays(s.text), **read_arrays(s.dino), **read_arrays(s.pose)}
                members = encode(s, arrays, s.image.read(), patch_pool, patch_dtype)
                got = {name.split(".", 1)[1]: len(data) for name, data in members}
                if f.tell() != offset or got != sizes:
                    raise RuntimeError(f"{shard.path}: sample {s.id} is not what was planned (member bytes "
                                       f"{got}, planned {sizes}): an upstream item changed under its key")
                for name, data in members:
                    tar.addfile(tarinfo(name, len(data)), io.BytesIO(data))

    atomic_write(path, write)
    if path.stat().st_size != shard.nbytes:
        raise RuntimeError(f"{path}: {path.stat().st_size} bytes, planned {shard.nbytes}")
    return sha256_file(path)


# ---------------------------------------------------------------- bytes per sample

def bytes_report(planned: list, patch_pool: int, patch_dtype: str) -> dict:
    """Mean bytes per sample per modality over the `planned` shards (tar: member
    headers, block padding, and each shard's end marker and record padding shared
    out), the same scaled to 1 MP (x 1,048,576 / (W x H)), and what the prx-tg
    format would take for the same samples."""
    cols = ("image", "t5", "dino_cls", "dino_patches", "pose", "json", "tar", "total")
    raw, at_1mp, prx, prx_1mp, dims = [], [], [], [], set()
    for sh in planned:
        shared = (sh.nbytes - sum(sum(map(tar_size, sz.values())) for sz in sh.sizes)) / len(sh.samples)
        for s, sz in zip(sh.samples, sh.sizes):
            row = dict.fromkeys(cols, 0.0)
            for ext, n in sz.items():
                row[MODALITY[ext]] += n
            row["tar"] = sum(map(tar_size, sz.values())) - sum(sz.values()) + shared
            row["total"] = sum(row[c] for c in cols[:-1])
            scale = 1048576 / (s.width * s.height)
            raw.append(row)
            at_1mp.append({c: v * scale for c, v in row.items()})
            prx.append(_prx_tg(s, sz["json"]))
            prx_1mp.append(prx[-1] * scale)
            dims.add((s.t5_dim, s.dino_dim))
    if not raw:
        return {"bytes_per_sample": {}, "bytes_per_sample_1mp": {}, "total_1mp_mb": 0.0, "prx_tg_1mp_mb": 0.0}
    mean = lambda rows: {c: round(float(np.mean([r[c] for r in rows]))) for c in cols}  # noqa: E731
    total_1mp = float(np.mean([r["total"] for r in at_1mp]))
    return {"bytes_per_sample": mean(raw), "bytes_per_sample_1mp": mean(at_1mp),
            "total_1mp_mb": round(total_1mp / 1e6, 3),
            "prx_tg_bytes_per_sample": round(float(np.mean(prx))),
            "prx_tg_1mp_mb": round(float(np.mean(prx_1mp)) / 1e6, 3),
            "vs_prx_tg": round(total_1mp / float(np.mean(prx_1mp)), 4),
            "dims": {"t5": sorted({d[0] for d in dims}), "dino": sorted({d[1] for d in dims})},
            "patch_pool": patch_pool, "patch_dtype": patch_dtype}


def _prx_tg(s: Sample, json_bytes: int) -> int:
    """The prx-tg shard format for one sample: (3, H, W) float16 pixels, T5 padded to
    512 tokens + its mask, CLS, every DINOv3 patch in float16, pose, metadata."""
    gh, gw = s.grid
    members = [npy_size((3, s.height, s.width), np.float16), npy_size((512, s.t5_dim), np.float16),
               npy_size((512,), np.bool_), npy_size((s.dino_dim,), np.float16),
               npy_size((gh * gw, s.dino_dim), np.float16), npy_size(POSE_SHAPE, np.float16), json_bytes]
    return sum(map(tar_size, members))

"""Benchmark: samples/s of the training loader (2 workers) against a raw tarfile
read of the same shards, from a local folder and from a moto S3 endpoint it starts.

    .venv/bin/python bench/bench_loader.py [--shards data/shards] [--per-shard 256]
                                           [--json bench/results/loader.json]

Shards: data/shards when it holds a shards.parquet (or --shards DIR), else
synthetic ones of realistic sizes built with tests/shardkit.py: 256 samples a
shard, 1024x1024 and 1152x896 PNGs of ~140 KB, T5 (120, 1024) fp16, DINO
patches (32, 32, 1024)-ish int8 + scale, pose (133, 3).

Baselines, one process each:
  raw read    tarfile "r|" over each shard, every member's bytes read (the I/O floor)
  raw decode  the same + what a batch needs: PNG -> uint8, npy -> arrays, patches dequantized
The loader does the raw-decode work plus shuffling, batching (padding, stacking)
and the hand-over from its worker processes. On S3 the endpoint (moto_server)
shares this machine's cores with the loader. Prints figures, writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.data.loader import ShardLoader  # noqa: E402
from tests.shardkit import Spec, png, write_dataset  # noqa: E402

BUCKETS = ("1024x1024", "1152x896")


def synthetic_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour fields and flat boxes: compresses like a clean render (~140 KB at 1 MP)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([np.sin(x / rng.uniform(40, 200) + rng.uniform(0, 6)), np.cos(y / rng.uniform(40, 200)),
                  np.sin((x + y) / rng.uniform(60, 300))], -1) * 100 + 100
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 100), rng.integers(0, w - 100)
        a[y0:y0 + rng.integers(20, 200), x0:x0 + rng.integers(20, 200)] = rng.integers(0, 255, 3)
    a[::7, :, 0] += 20
    return np.clip(a, 0, 255).astype(np.uint8)


def build(root: Path, per_shard: int, shards_per_bucket: int) -> None:
    rng = np.random.default_rng(0)
    pool = {b: [png(synthetic_image(int(b.split("x")[1]), int(b.split("x")[0]), rng), 6) for _ in range(8)]
            for b in BUCKETS}
    spec = Spec(t5_dim=1024, t5_len=(100, 140), dino_dim=1024, patch=32, int8=True)
    write_dataset(root, {b: per_shard * shards_per_bucket for b in BUCKETS}, shard_size=per_shard,
                  spec=spec, keep=False, png_pool=pool)


def raw(streams, decode: bool) -> int:
    """Samples in the shards, read with tarfile "r|" (and decoded like a batch needs)."""
    n = 0
    for open_stream in streams:
        with open_stream() as f, tarfile.open(fileobj=f, mode="r|") as tar:
            arrays = {}
            for m in tar:
                data = tar.extractfile(m).read()
                if m.name.endswith(".json"):
                    n += 1
                if not decode:
                    continue
                ext = m.name.split(".", 1)[1]
                if ext == "image.png":
                    arrays[ext] = np.asarray(Image.open(io.BytesIO(data)))
                elif ext.endswith(".npy"):
                    arrays[ext] = np.lib.format.read_array(io.BytesIO(data), allow_pickle=False)
                if ext == "pose.npy" and "dino_scale.npy" in arrays:  # int8 x scale -> float16
                    scale = arrays["dino_scale.npy"].astype(np.float32)[..., None]
                    arrays["deq"] = (arrays["dino_patches.npy"] * scale).astype(np.float16)
    return n


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def loader_epochs(make, epochs: int = 2) -> list[dict]:
    out = []
    with make() as loader:
        for _ in range(epochs):
            dt, n = timed(lambda: sum(len(b["ids"]) for b in loader))
            out.append({"seconds": round(dt, 2), "samples": n, "samples_per_s": round(n / dt, 1)})
        out[-1]["stats"] = {k: v for k, v in loader.stats().items() if k != "recent_errors"}
    return out


def start_moto(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    with open(tmp / "moto.log", "wb") as log:
        proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=subprocess.STDOUT)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto_server did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=Path, default=ROOT / "data" / "shards")
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--shards-per-bucket", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "loader.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="niche-bench-loader-"))
    try:
        res = measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"data: {res['data']}")
    for where in ("local", "s3"):
        for name, v in res[where].items():
            runs = v if isinstance(v, list) else [v]
            print(f"{where:5s} {name:14s} "
                  + "  ".join(f"{r['samples_per_s']:7.1f} samples/s ({r['seconds']} s)" for r in runs))
    print("ratios (loader = its 2nd epoch):", json.dumps(res["ratios"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.json}")


def measure(args: argparse.Namespace, tmp: Path) -> dict:
    if (args.shards / "shards.parquet").is_file():
        root, kind = args.shards, f"real shards from {args.shards}"
    else:
        root, kind = tmp / "shards", "synthetic (tests/shardkit.py)"
        t0 = time.perf_counter()
        build(root, args.per_shard, args.shards_per_bucket)
        print(f"built {args.shards_per_bucket * len(BUCKETS)} shards of {args.per_shard} samples "
              f"in {time.perf_counter() - t0:.0f} s")
    import pyarrow.parquet as pq

    shards = [r for r in pq.read_table(root / "shards.parquet").to_pylist() if r["split"] == "train"]
    total_bytes = sum(r["bytes"] for r in shards)
    res = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                       "platform": platform.platform()},
           "data": {"kind": kind, "shards": len(shards), "samples": sum(r["samples"] for r in shards),
                    "mb_per_sample": round(total_bytes / sum(r["samples"] for r in shards) / 1e6, 2)},
           "loader": {"batch_size": args.batch_size, "num_workers": args.workers, "shuffle_buffer": 128}}
    kw = dict(batch_size=args.batch_size, num_workers=args.workers, seed=0)

    # ---- local (the files were just written or were read before: warm page cache)
    local = [lambda r=r: open(root / r["shard"], "rb") for r in shards]
    raw(local[:1], False)
    res["local"] = {}
    for name, decode in (("raw_read", False), ("raw_decode", True)):
        dt, n = timed(lambda: raw(local, decode))
        res["local"][name] = {"seconds": round(dt, 2), "samples": n, "samples_per_s": round(n / dt, 1)}
    res["local"]["loader"] = loader_epochs(lambda: ShardLoader(root, **kw))

    # ---- S3 (moto_server, in memory on this machine)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",  # dummies for moto
                      AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto(tmp)
    try:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        t0 = time.perf_counter()
        for p in [root / r["shard"] for r in shards] + [root / "shards.parquet"]:
            client.upload_file(str(p), "bench", f"ds/{p.relative_to(root)}")
        print(f"uploaded to moto in {time.perf_counter() - t0:.0f} s")
        remote = [lambda r=r: client.get_object(Bucket="bench", Key=f"ds/{r['shard']}")["Body"]
                  for r in shards]
        res["s3"] = {}
        for name, decode in (("raw_read", False), ("raw_decode", True)):
            dt, n = timed(lambda: raw(remote, decode))
            res["s3"][name] = {"seconds": round(dt, 2), "samples": n, "samples_per_s": round(n / dt, 1)}
        s3 = dict(kw, endpoint_url=endpoint)
        res["s3"]["loader"] = loader_epochs(lambda: ShardLoader("s3://bench/ds", **s3))
        res["s3"]["loader_cached"] = loader_epochs(
            lambda: ShardLoader("s3://bench/ds", cache_dir=tmp / "cache", **s3))
    finally:
        proc.terminate()
        proc.wait(10)

    steady = {where: res[where]["loader"][-1]["samples_per_s"] for where in ("local", "s3")}
    res["ratios"] = {
        "local_loader_vs_raw_read": round(steady["local"] / res["local"]["raw_read"]["samples_per_s"], 3),
        "local_loader_vs_raw_decode": round(steady["local"] / res["local"]["raw_decode"]["samples_per_s"], 3),
        "s3_loader_vs_raw_read": round(steady["s3"] / res["s3"]["raw_read"]["samples_per_s"], 3),
        "s3_loader_vs_raw_decode": round(steady["s3"] / res["s3"]["raw_decode"]["samples_per_s"], 3),
    }
    return res


if __name__ == "__main__":
    main()

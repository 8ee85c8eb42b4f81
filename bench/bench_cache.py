"""Benchmark: disk taken by the per-sample stores plus DVC's cache, per cache.type.

    .venv/bin/python bench/bench_cache.py [--images 60] [--types copy hardlink reflink,hardlink]
                                          [--json bench/results/cache.json]

Generates N particle figures once, then for each cache.type: a scaffolded repo, `dvc repro
bucket` (ingest + bucket: the bucketed-image store and three manifests), then a re-run with
every bucket 64 px smaller (new keys and bytes for every item; the old items stay).
After each repro it prints the bytes of the tracked outputs (store), of the cache, what both
take on disk (a hardlinked file counted once, as `du` does), the bytes of distinct content,
and their ratio (goal: <= 1.1). During the re-run it samples the disk use every 0.2 s ("peak"):
DVC copies a persisted output's linked files before the stage runs (unprotect) unless the
output holds a Store's marker (tasks/core/storelinks.py), so with hardlink the peak stays at
the steady state (1.40x before that patch; tests/test_dvc_cache_links.py checks it exactly).
Prints figures and JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
OUTS = ("data/derived/bucket", "data/manifest")  # what ingest + bucket track in the cache
CACHE = ".dvc/cache"


def files(root: Path, *dirs: str) -> list[Path]:
    return [p for d in dirs for p in (root / d).rglob("*") if p.is_file()]


def on_disk(paths: list[Path]) -> int:
    """st_size summed over distinct inodes: a hardlinked file counts once."""
    seen = {}
    for p in paths:
        try:
            st = p.stat()
        except FileNotFoundError:  # renamed away while sampling
            continue
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def figures(root: Path) -> dict:
    store, cache = files(root, *OUTS), files(root, CACHE)
    content = sum({hashlib.md5(p.read_bytes()).hexdigest(): p.stat().st_size for p in store + cache}.values())
    disk = on_disk(store + cache)
    return {"store_bytes": sum(p.stat().st_size for p in store), "cache_bytes": sum(p.stat().st_size for p in cache),
            "on_disk_bytes": disk, "unique_content_bytes": content, "ratio": round(disk / content, 3),
            "store_files_linked": sum(p.stat().st_nlink >= 2 for p in store), "store_files": len(store)}


def repro(root: Path, sample: bool = False) -> tuple[float, int]:
    """`dvc repro bucket`: (wall seconds, peak on-disk bytes of store + cache while it ran)."""
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], on_disk(files(root, *OUTS, CACHE)))

    t = threading.Thread(target=watch, daemon=True)
    if sample:
        t.start()
    t0 = time.perf_counter()
    subprocess.run([str(BIN / "dvc"), "repro", "-q", "bucket"], cwd=root, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    done.set()
    if sample:
        t.join()
    return wall, max(peak[0], on_disk(files(root, *OUTS, CACHE)))


def one(cache_type: str, raw: Path, work: Path) -> dict:
    import yaml

    from flows.scaffold import scaffold

    root = scaffold(work / cache_type.replace(",", "+"))
    subprocess.run([str(BIN / "dvc"), "config", "cache.type", cache_type], cwd=root, check=True)
    shutil.copytree(raw, root / "data/raw/figures")
    wall, _ = repro(root)
    first = {**figures(root), "wall_s": round(wall, 1)}
    doc = yaml.safe_load((root / "params.yaml").read_text())
    # New keys and new bytes for every item (a resampling change alone keeps the bytes of
    # images already at their bucket's size).
    doc["bucket"]["buckets"] = [[w - 64, h - 64] for w, h in doc["bucket"]["buckets"]]
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    wall, peak = repro(root, sample=True)
    second = {**figures(root), "wall_s": round(wall, 1), "peak_on_disk_bytes": peak}
    second["peak_ratio"] = round(peak / second["unique_content_bytes"], 3)
    shutil.rmtree(root)
    return {"first_repro": first, "rerun_changed_param": second}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=60)
    ap.add_argument("--types", nargs="+", default=["copy", "hardlink", "reflink,hardlink"])
    ap.add_argument("--json", type=Path, default=Path("bench/results/cache.json"))
    args = ap.parse_args()
    os.environ.update({"DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    from tasks.sample.particles import write_particle_dataset

    work = Path(tempfile.mkdtemp(prefix="niche-bench-cache-"))
    raw = work / "raw"
    write_particle_dataset(raw, args.images, seed=0)
    out = {"images": args.images, "cpus": os.cpu_count(), "python": platform.python_version(),
           "filesystem": subprocess.run(["df", "-T", str(work)], capture_output=True, text=True).stdout.splitlines()[1].split()[1],
           "stages": "ingest + bucket", "types": {}}
    mb = 1e6
    print(f"{args.images} images, {out['filesystem']}; MB = 1e6 bytes; ratio = on disk / distinct content")
    print(f"{'cache.type':18s} {'run':9s} {'store MB':>9s} {'cache MB':>9s} {'disk MB':>8s} {'content MB':>10s} "
          f"{'ratio':>6s} {'linked':>8s} {'peak':>6s} {'wall s':>7s}")
    for t in args.types:
        r = out["types"][t] = one(t, raw, work)
        for run, f in (("first", r["first_repro"]), ("re-run", r["rerun_changed_param"])):
            print(f"{t:18s} {run:9s} {f['store_bytes'] / mb:9.2f} {f['cache_bytes'] / mb:9.2f} "
                  f"{f['on_disk_bytes'] / mb:8.2f} {f['unique_content_bytes'] / mb:10.2f} {f['ratio']:6.3f} "
                  f"{f['store_files_linked']:>3d}/{f['store_files']:<4d} {f.get('peak_ratio', ''):>6} {f['wall_s']:7.1f}")
    shutil.rmtree(work)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

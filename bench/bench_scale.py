"""Benchmark: the dataset's DVC figures at 10,000 and 70,000 images (packed stores).

    .venv/bin/python bench/bench_scale.py --n 10000 70000 [--work DIR] [--keep]
                                          [--json bench/results/scale_cpu.json]

Why. A store of one file per item made DVC stat ~500,000 files on every `dvc status` at
70,000 images; the stores are packs now (tasks/core/packs.py). This bench builds the real
stores of N images through the real stage code and the real dvc.yaml and reports what a user
waits for and what the disk holds: a no-op `dvc repro shard latents`, `dvc status shard
latents` (plain `dvc status` too: it also checks the training stages, never run here), adding
10 images (and how many items each stage computed), bytes on disk against content, and file
counts. It prints figures and never asserts a time.

How. A scratch repo per N, made as the tests make theirs (flows.scaffold, then the tiny
profile, then git commit), with these params changed so that 70,000 images fit on a small
disk: ingest.min_side 32; bucket.buckets 64x64, 96x64, 64x96; caption.backend sidecar;
latents.image_scale 1.0. Raw images are N random-noise RGB PNGs of those three sizes (so the
bucketed PNGs have a real PNG's entropy), 1,000 per folder, each with a `.txt` caption of
8 to 30 random words (prompt-length captions, so that 70,000 fit). What is real: ingest,
bucket, caption (sidecar), shard, every store, manifest, dvc.yaml/dvc.lock and DVC itself. What is synthetic: the bytes of the four model
stages (embed_text, embed_image, embed_pose, latents), made by bench/scale_hook/sitecustomize.py
(on PYTHONPATH with NICHE_BENCH_SYNTHETIC=1 for the `dvc` commands): no model loads, and each
Worker returns the safetensors its real model would give for that input, same names, shapes,
dtypes and metadata, seeded random values: T5-large (n, 1024) float16 with n ~ 1.3 tokens a
caption word + EOS; DINOv3 ViT-L CLS (1024,) + patches (H/16, W/16, 1024) float16; DWPose
(133, 3) float16 + box + n_people; SDXL VAE mean and std (4, h/8, w/8) float16. Their keys
are the real stages' keys (with the tiny models' ids). `item_bytes` in the JSON: mean bytes per
item per store, as built. At real sizes (1 MP PNGs, ~250-token captions) items are ~20x larger
and the pack count grows accordingly (256 MB a pack): the file counts here are a lower bound.

Disk: st_blocks * 512 of every inode under data/derived, data/manifest, data/shards and
.dvc/cache, counted once (the cache is hardlinked), against the content: st_size of the
workspace's inodes. After adding 10 images the cache also holds the replaced manifests and
shards (DVC keeps every version): reported apart as `cache_only_bytes`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HOOK = ROOT / "bench" / "scale_hook"
sys.path.insert(0, str(ROOT))

TARGETS = ["shard", "latents"]  # every dataset stage: `dvc repro shard latents`
STORES = {"ingest": ".json", "bucket": ".png", "caption": ".json", "embed_text": ".safetensors",
          "embed_image": ".safetensors", "embed_pose": ".safetensors", "latents": ".safetensors"}
SHAPES = [(64, 64), (96, 64), (64, 96)]  # raw sizes = the buckets: (width, height)
PER_FOLDER = 1000
UP_TO_DATE = "Data and pipelines are up to date."
WORDS = ("a an the figure person woman man child dancer runner two three small large tall thin "
         "standing sitting walking running jumping reaching leaning turning kneeling stretching "
         "holding carrying throwing catching juggling balls ball box chair table bicycle rope "
         "red blue black white gray green yellow dark bright soft sharp left right front back "
         "above below beside near far centre corner edge background white plain studio light "
         "shadow arm arms leg legs hand hands head torso body pose motion dynamic still calm "
         "with and of in on at against toward away from under over between across").split()


def _env() -> dict:
    env = dict(os.environ, NICHE_BENCH_SYNTHETIC="1", NICHE_WORKERS="2", DVC_NO_ANALYTICS="1",
               PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH")) if p)
    return env


def dvc(repo: Path, *args: str) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([str(BIN / "dvc"), *args], cwd=repo, env=_env(), capture_output=True, text=True)
    took = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed ({p.returncode}):\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}")
    return took, p.stdout + p.stderr


def repro_traced(repo: Path) -> tuple[float, dict[str, dict]]:
    """`dvc repro shard latents`: (wall s, {stage: {segment_s, process_s}}). A stage's segment runs
    from DVC's "Running stage" line to its next stage line: the stage's process (process_s:
    imports, loop, tables), then DVC hashing its outs, writing dvc.lock, checking the next stage."""
    trace = repo / ".dvc/tmp/bench-trace.jsonl"
    trace.unlink(missing_ok=True)
    t0 = time.time()
    p = subprocess.Popen([str(BIN / "dvc"), "repro", *TARGETS], cwd=repo, text=True,
                         env={**_env(), "NICHE_BENCH_TRACE": str(trace)},
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    marks, lines = [("(dvc, before the first stage)", t0)], []
    for line in p.stdout:
        lines.append(line)
        for head in ("Running stage '", "Stage '"):
            if line.startswith(head):
                name = line[len(head):].split("'")[0]
                marks.append((name + ("" if head == "Running stage '" else " (unchanged)"), time.time()))
    rc, end = p.wait(), time.time()
    out = "".join(lines)
    if rc != 0:
        raise RuntimeError(f"dvc repro failed ({rc}):\n{out[-6000:]}")
    if "synthetic outputs (bench/scale_hook)" not in out and "Running stage 'embed_text'" in out:
        raise RuntimeError("the model stages did not use the synthetic Workers (bench/scale_hook)")
    procs = {}
    for rec in map(json.loads, trace.read_text().splitlines()):
        if "/tasks/" in rec["argv0"]:
            procs[Path(rec["argv0"]).stem] = round(rec["end"] - rec["start"], 2)
    segs = {name: {"segment_s": round(nxt - t, 2), **({"process_s": procs[name]} if name in procs else {})}
            for (name, t), (_, nxt) in zip(marks, marks[1:] + [("end", end)])}
    return end - t0, segs


def caption(rng) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(8, 31))))


def _write_one(args: tuple[Path, int]) -> None:
    import numpy as np
    from PIL import Image

    folder, i = args
    rng = np.random.default_rng([7, i])
    w, h = SHAPES[i % len(SHAPES)]
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"img{i:06d}.png")
    (folder / f"img{i:06d}.txt").write_text(caption(rng) + "\n")


def write_images(raw: Path, start: int, count: int, folder: str | None = None) -> None:
    jobs = []
    for i in range(start, start + count):
        d = raw / (folder or f"g{i // PER_FOLDER:03d}")
        d.mkdir(parents=True, exist_ok=True)
        jobs.append((d, i))
    with Pool(2) as pool:
        pool.map(_write_one, jobs, chunksize=256)


def make_repo(path: Path, n: int) -> Path:
    import yaml

    from flows.scaffold import scaffold

    scaffold(path)
    if not (path / "models/tiny").is_dir():
        shutil.copytree(ROOT / "models/tiny", path / "models/tiny")
    subprocess.run([sys.executable, "-m", "tasks.profile", "tiny"], cwd=path, check=True, capture_output=True)
    doc = yaml.safe_load((path / "params.yaml").read_text())
    doc["ingest"]["min_side"] = 32
    doc["bucket"]["buckets"] = [list(s) for s in SHAPES]
    doc["caption"]["backend"] = "sidecar"
    doc["latents"]["image_scale"] = 1.0
    (path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    write_images(path / "data/raw", 0, n)
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "scale bench repo"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


def metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def disk(repo: Path) -> dict:
    """Bytes on disk (each inode once) against the content of the workspace's files."""
    seen: dict[tuple[int, int], tuple[str, int, int]] = {}
    for area in ("data/derived", "data/manifest", "data/shards", ".dvc/cache"):  # workspace first
        for dirpath, _, files in os.walk(repo / area):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                seen.setdefault((st.st_dev, st.st_ino), (area, st.st_blocks * 512, st.st_size))
    on_disk = sum(b for _, b, _ in seen.values())
    content = sum(s for a, _, s in seen.values() if a != ".dvc/cache")
    per_area = {a: sum(b for x, b, _ in seen.values() if x == a) for a in ("data/derived", "data/manifest",
                                                                           "data/shards", ".dvc/cache")}
    return {"disk_bytes": on_disk, "content_bytes": content, "ratio": round(on_disk / content, 3),
            "cache_only_bytes": per_area[".dvc/cache"], "disk_per_area": per_area}


def file_counts(repo: Path) -> dict:
    """Files in the stores, and every file DVC hashes for the dataset (dvc.lock's outs under data/
    and the data/raw dependency: nfiles of a folder, 1 for a file)."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    tracked, raw = 0, 0
    for st in lock.values():
        for o in st.get("outs", []):
            if o["path"].startswith("data/"):
                tracked += o.get("nfiles", 1)
        for d in st.get("deps", []):
            if d["path"] == "data/raw":
                raw = d.get("nfiles", 1)
    derived = sum(len(f) for _, _, f in os.walk(repo / "data/derived"))
    return {"files_data_derived": derived, "files_dvc_outs_data": tracked, "files_data_raw": raw,
            "files_dvc_tracked": tracked + raw}


def item_bytes(repo: Path) -> dict:
    from tasks.core.store import Store

    out = {}
    for stage, ext in STORES.items():
        s = Store(repo / "data/derived" / stage, ext)
        keys = s.keys()
        out[stage] = round(sum(s.size(k) for k in keys) / max(1, len(keys)))
        s.close()
    tars = list((repo / "data/shards").rglob("*.tar"))
    out["shard_per_sample"] = round(sum(t.stat().st_size for t in tars) / max(1, metrics(repo, "shard")["total"]))
    out["shards"] = len(tars)
    return out


def clean_status(repo: Path, *targets: str) -> tuple[float, bool, str]:
    took, out = dvc(repo, "status", *targets)
    return took, UP_TO_DATE in out, out.strip()[-2000:]


def bench_one(work: Path, n: int) -> dict:
    r: dict = {"images": n}
    t0 = time.perf_counter()
    repo = make_repo(work / f"n{n}", n)
    r["make_repo_s"] = round(time.perf_counter() - t0, 1)
    print(f"[{n}] repo and {n} raw images in {r['make_repo_s']} s; building ...", flush=True)

    took, r["build_stages"] = repro_traced(repo)
    r["build_s"] = round(took, 1)
    for s in [*STORES, "shard"]:
        r["build_stages"][s]["loop_s"] = metrics(repo, s)["seconds"]
    _, r["status_clean_after_build"], _ = clean_status(repo, *TARGETS)
    subprocess.run(["git", "add", "dvc.lock"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "build"], cwd=repo, check=True, capture_output=True)
    r["item_bytes"] = item_bytes(repo)
    r["disk_after_build"] = disk(repo)
    r.update(file_counts(repo))
    print(f"[{n}] built in {r['build_s']} s; status clean: {r['status_clean_after_build']}", flush=True)

    noop = [dvc(repo, "repro", *TARGETS) for _ in range(3)]
    if any("didn't change" not in o or "Running stage" in o for _, o in noop):
        raise RuntimeError(f"a no-op repro ran a stage:\n{noop[-1][1][-3000:]}")
    r["noop_repro_runs_s"] = [round(t, 2) for t, _ in noop]
    r["noop_repro_s"] = round(statistics.median(t for t, _ in noop), 2)
    status = [clean_status(repo, *TARGETS) for _ in range(3)]
    r["status_runs_s"] = [round(t, 2) for t, _, _ in status]
    r["status_s"] = round(statistics.median(t for t, _, _ in status), 2)
    # Plain `dvc status` checks the training stages too (never run here, so never clean).
    r["status_all_stages_s"] = round(statistics.median(clean_status(repo)[0] for _ in range(3)), 2)

    # 10 new images (+ captions) dropped into an existing folder, as a person adds a few.
    write_images(repo / "data/raw", n, 10, folder="g000")
    took, r["add10_stages"] = repro_traced(repo)
    r["add10_repro_s"] = round(took, 1)
    m = {s: metrics(repo, s) for s in [*STORES, "shard"]}
    r["add10_computed"] = {s: v["computed"] for s, v in m.items()}
    r["add10_reused"] = {s: v["reused"] for s, v in m.items()}
    r["add10_failed"] = {s: v["failed"] for s, v in m.items()}
    for s, v in m.items():
        r["add10_stages"][s]["loop_s"] = v["seconds"]
    r["add10_exactly_10_per_store"] = all(m[s]["computed"] == 10 for s in STORES)
    took, r["status_clean_after_add10"], text = clean_status(repo, *TARGETS)
    r["status_after_add10_s"] = round(took, 2)
    if not r["status_clean_after_add10"]:
        r["status_after_add10"] = text
    r["disk_after_add10"] = disk(repo)
    r["files_after_add10"] = file_counts(repo)
    return r


def machine() -> dict:
    pth = next(Path(sys.prefix).glob("lib/python*/site-packages/niche-rawfs.pth"), None)
    armed = pth.read_text() if pth else ""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--short", "tasks", "dvc.yaml", "params.yaml"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split("\n")
    dvc_v = subprocess.run([str(BIN / "dvc"), "--version"], capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "dvc": dvc_v, "commit": head.stdout.strip(), "tasks_uncommitted": [d for d in dirty if d],
            "dvc_patches_armed": [n for n in ("rawfs", "storelinks", "dirstat") if f"_niche_{n}" in armed]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[10000, 70000])
    ap.add_argument("--work", type=Path, default=None, help="default: a new folder under /tmp")
    ap.add_argument("--json", type=Path, default=Path("bench/results/scale_cpu.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work folder (GBs)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="niche-scale-", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    host = machine()  # before the runs: the code the scaffolds copied
    try:
        for n in args.n:
            results[str(n)] = bench_one(work, n)
            if not args.keep:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    last = results[str(args.n[-1])]
    doc = {**results, "machine": host, "item_bytes": last["item_bytes"],
           "notes": ("Synthetic model outputs of real shapes (bench/scale_hook); real ingest, bucket, "
                     "sidecar captions, shard, stores and DVC. Images 64x64/96x64/64x96 noise PNGs, captions "
                     "8-30 words; item_bytes per store in bytes. Times are wall seconds of the CLI "
                     "(medians of 3), NICHE_WORKERS=2. Disk ratio: st_blocks of unique inodes over "
                     "st_size of the workspace's; after add-10 the cache also keeps the replaced "
                     "manifests and shards (cache_only_bytes).")}
    cols = ["noop_repro_s", "status_s", "add10_repro_s", "build_s"]
    print(f"\n{'N':>7} " + " ".join(f"{c:>14}" for c in cols)
          + f" {'disk/content':>13} {'files derived':>14} {'DVC-tracked':>12}")
    for n, r in results.items():
        d = r["disk_after_build"]
        print(f"{n:>7} " + " ".join(f"{r[c]:>14}" for c in cols)
              + f" {d['ratio']:>13} {r['files_data_derived']:>14} {r['files_dvc_tracked']:>12}")
    for n, r in results.items():
        print(f"\n[{n}] add-10 computed: {r['add10_computed']} (exactly 10 per store: "
              f"{r['add10_exactly_10_per_store']}); status clean after: {r['status_clean_after_add10']}")
        print(f"[{n}] add-10, s per stage: segment (process (loop)):")
        for s, v in r["add10_stages"].items():
            print(f"    {s:38s} {v['segment_s']:7.2f}  ({v.get('process_s', '-')}  ({v.get('loop_s', '-')}))")
        print(f"[{n}] disk after add-10: {r['disk_after_add10']}")
        print(f"[{n}] item bytes: {r['item_bytes']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

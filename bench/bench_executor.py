"""Benchmark: one model stage (embed_image, DINOv3) on the local executor and on a Ray cluster.

    .venv/bin/python bench/bench_executor.py [--images 64] [--size 256] [--model vits16]
                                             [--json bench/results/executor_cpu.json]
    # on a GPU machine: DINOv3 ViT-L/16 at ~1 MP, one actor per GPU
    .venv/bin/python bench/bench_executor.py --model vitl16 --size 1024 --images 512 --gpu \\
        --json bench/results/executor_gpu.json

Builds a DINOv3 from the named architecture's config with random weights (true throughput,
no download), generates N sample figures, ingests and buckets them into one square bucket,
then runs the real `embed_image` stage from scratch into a fresh store for each setting:

    local, 1 or 2 torch threads          this process (the local executor)
    ray, 1 actor x 1 or 2 CPUs           equal parallelism: the difference is Ray's overhead
    ray, 2 actors x 1 CPU                data-parallel over the cores (CPU); one per GPU (--gpu)

on a Ray head started here on 127.0.0.1 (`ray start --head`, as a user would). It prints
items/s over the whole stage (model load included on both sides), Ray's actor start-up (process,
imports, model load) and the overhead at equal parallelism (goal <= 10%), checks the stores are
byte-identical, and writes JSON. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

ARCHS = {  # DINOv3 ViT/16 configs with 4 registers (facebook/dinov3-vit*16-pretrain-lvd1689m)
    "vits16": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6),
    "vitb16": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "vitl16": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16),
}


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def build_model(arch: str, folder: Path) -> Path:
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    config = DINOv3ViTConfig(patch_size=16, num_register_tokens=4, **ARCHS[arch])
    torch.manual_seed(0)
    DINOv3ViTModel(config).eval().save_pretrained(folder, safe_serialization=True)
    return folder


def write_params(path: Path, kind: str, actors: int | None, cpus: float | None, gpus: float | None) -> Path:
    import yaml

    section = {"kind": kind, "address": "local", "actors": actors, "cpus_per_actor": cpus,
               "gpus_per_actor": gpus}
    path.write_text(yaml.safe_dump({"executor": section}))
    return path


def start_head(cpus: int, gpus: int, temp: str) -> str:
    # Loopback only: no token authentication (see tests/test_ray_executor.py).
    quiet = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, **quiet}
    port = 6380 + os.getpid() % 1000
    subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                    f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--include-dashboard=false",
                    "--disable-usage-stats", f"--temp-dir={temp}"], env=env, check=True, capture_output=True)
    os.environ.update(quiet)
    return f"127.0.0.1:{port}"


def run_stage(model: Path, batch: int, store: Path, params_file: Path, threads: int, log: Lines) -> dict:
    import torch

    from tasks.embed_image import EmbedImageParams, embed_image

    torch.set_num_threads(threads)  # the local executor's parallelism (Ray actors get their CPUs')
    log.lines.clear()
    t0 = time.perf_counter()
    report = embed_image(EmbedImageParams(model=str(model), batch_size=batch), store_dir=store,
                         out_dir=store.with_suffix(".out"), workers=threads, params_file=params_file)
    wall = time.perf_counter() - t0
    startup = next((float(m.group(1)) for line in log.lines
                    if (m := re.search(r"actors ready in ([\d.]+) s", line))), 0.0)
    # The runner's own figure: items over the time from the first batch sent to the last written,
    # less the model load (local) or the actors' start-up (Ray).
    steady = next(float(m.group(1)) for line in log.lines
                  if (m := re.search(r"([\d.]+) items/s once the model was up", line)))
    assert report.failed == 0, report.failures
    return {"items": report.computed, "wall_s": round(wall, 2), "items_per_s": round(report.computed / wall, 2),
            "actor_startup_s": round(startup, 2), "items_per_s_model_up": steady}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--size", type=int, default=256, help="the one square bucket's side (px)")
    ap.add_argument("--model", choices=sorted(ARCHS), default="vits16")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gpu", action="store_true", help="one actor per GPU instead of the CPU settings")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from tasks.bucket import BucketParams, bucket
    from tasks.core.stage import setup_logging
    from tasks.ingest import IngestParams, ingest
    from tasks.sample.__main__ import make_sample

    setup_logging(logging.WARNING)
    lines = Lines()
    logging.getLogger("niche").addHandler(lines)
    logging.getLogger("niche").setLevel(logging.INFO)
    work = Path(tempfile.mkdtemp(prefix="niche-bench-executor-"))
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    cwd = os.getcwd()
    os.chdir(work)
    try:
        model = build_model(args.model, work / f"dinov3-{args.model}")
        make_sample(Path("data/raw"), figures=args.images, photos=False, bad_examples=False)
        ingest(IngestParams(holdout_count=0), workers=os.cpu_count())
        bucket(BucketParams(buckets=((args.size, args.size),)), workers=os.cpu_count())
        cpus = os.cpu_count() or 2
        import torch

        gpus = torch.cuda.device_count() if args.gpu else 0
        address = start_head(cpus, gpus, temp)
        os.environ["NICHE_RAY_ADDRESS"] = address
        local_params = write_params(work / "local.yaml", "local", None, None, None)
        settings = [("local", 1, local_params, 1), ("local", 2, local_params, 2)]
        if args.gpu:
            settings = [("local (GPU)", 1, local_params, cpus)]
            settings.append((f"ray {gpus} actors x 1 GPU", gpus,
                             write_params(work / "gpu.yaml", "ray", gpus, max(1, cpus // gpus), 1), cpus))
        else:
            for actors, per in ((1, 1), (1, 2), (2, 1)):
                settings.append((f"ray {actors} actor(s) x {per} CPU", actors * per,
                                 write_params(work / f"ray{actors}x{per}.yaml", "ray", actors, per, 0), 1))
        results = []
        for name, parallel, params_file, threads in settings:
            if name.startswith("local"):
                os.environ.pop("NICHE_RAY_ADDRESS", None)
            else:
                os.environ["NICHE_RAY_ADDRESS"] = address
            store = work / f"store-{len(results)}"
            r = {"setting": name, "parallelism": parallel,
                 **run_stage(model, args.batch, store, params_file, threads, lines)}
            r["identical_to_first"] = _files(store) == _files(work / "store-0")
            results.append(r)
            print(f"{name:28s} {r['items']:5d} items {r['wall_s']:8.2f} s {r['items_per_s']:8.2f}/s "
                  f"startup {r['actor_startup_s']:5.2f} s  model up {r['items_per_s_model_up']:8.2f}/s "
                  f"identical {r['identical_to_first']}", flush=True)
        overhead = {}
        for r in results:
            local = next((x for x in results if x["setting"] == "local" and x["parallelism"] == r["parallelism"]
                          and "actor" not in x["setting"]), None)
            if local and r["setting"].startswith("ray") and " 1 actor" in r["setting"]:
                overhead[r["setting"]] = {
                    "wall": round(r["wall_s"] / local["wall_s"] - 1, 3),
                    "model_up": round(local["items_per_s_model_up"] / r["items_per_s_model_up"] - 1, 3)}
        for k, v in overhead.items():
            print(f"overhead of {k} vs local at equal parallelism: {v['wall']:+.1%} of the wall time, "
                  f"{v['model_up']:+.1%} once the model is up")
        doc = {"bench": "executor", "model": args.model, "size": args.size, "images": args.images,
               "batch": args.batch, "machine": {"cpus": cpus, "gpus": gpus, "platform": platform.platform()},
               "results": results, "ray_overhead_equal_parallelism": overhead}
        if args.json:
            out = args.json if args.json.is_absolute() else Path(cwd) / args.json
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(doc))
    finally:
        os.chdir(cwd)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


if __name__ == "__main__":
    main()

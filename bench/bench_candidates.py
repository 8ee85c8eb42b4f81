"""Benchmark: the candidates stage's images/s with the tiny SDXL on this machine's CPU.

    .venv/bin/python bench/bench_candidates.py [--prompts 16] [--seeds 2] [--device cpu]
                                               [--json bench/results/candidates_cpu.json]

Builds the tiny SDXL (random weights, models/sdxl/pipeline.build_tiny_sdxl) in a temporary
repo, writes an expand table of N prompts, and runs `python -m tasks.candidates` there as DVC
would, at the tiny profile's candidates settings (profiles/tiny.yaml: steps, size):

    cold     every prompt x seed rendered: the command's wall time (interpreter, imports, model
             load, rendering, table) and the stage's own figures from metrics/candidates.details.json
             (images/s over the stage, images/s once the model is up, the model's load time)
    cached   the same command again: nothing to render, no model loads
    added    N/4 more prompts: only their images render

The tiny SDXL's images mean nothing and its speed says little about the real one (a 2.6 B UNet
at 1024 px); what it shows is the stage's own overhead around the model. Asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_expand(n: int) -> None:
    from tasks.core.manifest import write_table
    from tasks.curate.tables import EXPAND, EXPAND_TABLE

    scenes = ["juggling three balls", "dancing", "riding a bicycle", "reading a book", "climbing a ladder",
              "playing the violin", "throwing a frisbee", "sweeping the floor"]
    rows = [dict(id=f"{i:05d}", word=f"word{i}", variation=0, template="particle", scene=scenes[i % len(scenes)],
                 prompt=f"Sparse black particle flecks on white forming a figure {scenes[i % len(scenes)]}, "
                        f"variation {i}", key=None, file=None, error=None) for i in range(n)]
    write_table(rows, EXPAND, EXPAND_TABLE, sort_by="id")


def run_stage(env: dict) -> dict:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "tasks.candidates", "--params", "params.yaml"], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"tasks.candidates failed:\n{p.stderr[-3000:]}")
    metric = json.loads(Path("metrics/candidates.json").read_text())
    details = json.loads(Path("metrics/candidates.details.json").read_text())
    return {"images": metric["total"], "rendered": metric["computed"], "reused": metric["reused"],
            "failed": metric["failed"], "command_wall_s": round(wall, 2), "stage_s": metric["seconds"],
            "images_per_s_command": round(metric["computed"] / wall, 3),
            "images_per_s_stage": details["images_per_second"],
            "images_per_s_model_up": details["images_per_second_model_up"],
            "model_load_s": details["model_load_seconds"]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/candidates_cpu.json"))
    args = ap.parse_args(argv)

    from models.sdxl.pipeline import build_tiny_sdxl

    tiny = yaml.safe_load((ROOT / "profiles/tiny.yaml").read_text())["candidates"]
    work = Path(tempfile.mkdtemp(prefix="niche-bench-candidates-"))
    cwd = os.getcwd()
    os.chdir(work)
    try:
        model = build_tiny_sdxl(work / "tiny-sdxl")
        section = {"model": str(model), "steps": tiny["steps"], "size": tiny["size"],
                   "seeds": list(range(args.seeds)), "device": args.device}
        Path("params.yaml").write_text(yaml.safe_dump({"candidates": section}))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        load = os.getloadavg()[0]  # other work on the machine slows every figure below
        write_expand(args.prompts)
        results = {"cold": run_stage(env), "cached": run_stage(env)}
        write_expand(args.prompts + max(1, args.prompts // 4))
        results["added"] = run_stage(env)
        for name, r in results.items():
            print(f"{name:7s} {r['images']:4d} images, {r['rendered']:4d} rendered in {r['command_wall_s']:7.2f} s "
                  f"(command; stage {r['stage_s']:.2f} s): {r['images_per_s_command']:6.2f} images/s command, "
                  f"{r['images_per_s_stage']:6.2f} stage, {r['images_per_s_model_up']:6.2f} once the model is up "
                  f"(load {r['model_load_s']:.2f} s)", flush=True)
        import torch

        doc = {"bench": "candidates", "generator": "sdxl (tiny, random weights)", "settings": section | {
                   "model": "tiny SDXL (models/sdxl/pipeline.build_tiny_sdxl)"},
               "prompts": args.prompts, "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                                    "platform": platform.platform(),
                                                    "load_average_1m_before": round(load, 2)},
               "results": results}
        out = args.json if args.json.is_absolute() else Path(cwd) / args.json
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(json.dumps(doc))
    finally:
        os.chdir(cwd)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

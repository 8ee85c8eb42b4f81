"""Benchmark: items/s of every dataset stage on the tiny profile, this machine.

    .venv/bin/python bench/bench_stages.py [--images 100] [--json bench/results/stages.json]

Generates N particle figures in a scratch repo on the tiny profile, runs
`dvc repro`, and reads each stage's own metrics (items computed, seconds of
work, which excludes interpreter and model start-up). Then captions switch to
the sidecar files (distinct texts for T5), and one caption file is edited: the
figures of that re-run show what was recomputed. Prints figures
and JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
STAGES = ("ingest", "bucket", "caption", "embed_text", "embed_image", "embed_pose", "shard")


def repro(repo: Path) -> tuple[float, dict[str, dict]]:
    t0 = time.perf_counter()
    out = subprocess.run([str(BIN / "dvc"), "repro"], cwd=repo, check=True, capture_output=True,
                         text=True).stdout
    wall = time.perf_counter() - t0
    ran = re.findall(r"Running stage '(\w+)'", out)
    return wall, {s: json.loads((repo / "metrics" / f"{s}.json").read_text()) for s in ran}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=100)
    ap.add_argument("--json", type=Path, default=Path("bench/results/stages.json"))
    args = ap.parse_args()
    os.environ.update({"DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})

    from flows.scaffold import scaffold
    from tasks.profile import build_tiny
    from tasks.profile import apply
    from tasks.sample.particles import write_particle_dataset

    build_tiny(Path(__file__).resolve().parents[1] / "models" / "tiny")
    repo = scaffold(Path(tempfile.mkdtemp(prefix="niche-bench-stages-")) / "repo")
    write_particle_dataset(repo / "data/raw/figures", args.images, seed=0)
    cwd = os.getcwd()
    os.chdir(repo)
    try:
        apply("tiny", Path("params.yaml"))
    finally:
        os.chdir(cwd)

    wall, metrics = repro(repo)
    out: dict = {"images": args.images, "cpus": os.cpu_count(), "python": platform.python_version(),
                 "profile": "tiny (random weights)", "first_repro_wall_s": round(wall, 1), "stages": {}}
    for s in STAGES:
        m = metrics.get(s, {})
        out["stages"][s] = {"computed": m.get("computed"), "seconds": m.get("seconds"),
                            "items_per_s": round(m["computed"] / m["seconds"], 1) if m.get("seconds") else None}
    # The tiny captioner writes near-identical text for every image, and equal
    # captions share one T5 item; distinct sidecar captions measure T5 for real.
    from tasks.profile import set_values

    params = repo / "params.yaml"
    params.write_text(set_values(params.read_text(), {"caption": {"backend": "sidecar"}})[0])
    _, metrics = repro(repo)
    for s in ("caption", "embed_text"):
        m = metrics[s]
        out["stages"][f"{s} (sidecar captions)"] = {
            "computed": m["computed"], "seconds": m["seconds"],
            "items_per_s": round(m["computed"] / m["seconds"], 1) if m["seconds"] else None}
    wall, _ = repro(repo)
    out["noop_repro_wall_s"] = round(wall, 2)

    txt = sorted((repo / "data/raw/figures").glob("*.txt"))[0]
    txt.write_text("a figure standing on one leg, arms spread wide\n")
    wall, metrics = repro(repo)
    out["edit_one_caption_file"] = {s: m["computed"] for s, m in metrics.items()}

    for s, f in out["stages"].items():
        print(f"{s:32s} {f['computed']!s:>6} items  {f['seconds']!s:>8} s  {f['items_per_s']!s:>8} items/s")
    for k in ("first_repro_wall_s", "noop_repro_wall_s", "edit_one_caption_file"):
        print(f"{k:24s} {out[k]}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}; repo {repo}")


if __name__ == "__main__":
    main()

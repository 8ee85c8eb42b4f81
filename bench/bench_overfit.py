"""Overfit NanoDiT on 4 images on the CPU: the loss must fall steadily.

By default the baseline preset (384 x 12) at 1/8 of the bucket size, 600 steps: the
tiny preset (hidden 64) cannot represent a 16x16x3 patch, so its grid stays blocky.

The whole path a user runs: a scaffolded repo, 4 sample figures, the tiny profile,
`dvc repro train` (ingest → ... → shard → train). Prints the loss curve in windows,
copies the last sample grid (top: the 4 images, bottom: the EMA model's samples
from their own conditioning) next to the JSON.

    .venv/bin/python bench/bench_overfit.py [--steps 600] [--preset baseline] [--scale 0.125] [--json bench/results/overfit.json]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ("astronaut", "retina", "immunohistochemistry", "hubble_deep_field_exif")  # all pass ingest.min_side
sys.path.insert(0, str(ROOT))

from flows.scaffold import scaffold  # noqa: E402
from tasks.profile import apply  # noqa: E402
from tasks.sample.__main__ import make_sample  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--preset", default="baseline", choices=["tiny", "baseline", "production"],
                    help="tiny (hidden 64) cannot even represent a 16x16x3 patch: its samples stay blocky")
    ap.add_argument("--scale", type=float, default=0.125, help="train.image_scale (0.25: 1 MP buckets → ~256²)")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    ap.add_argument("--images", default="photos", choices=["photos", "figures"],
                    help="4 of scikit-image's photographs, or 4 particle figures (mostly white: the model "
                         "learns the background long before the dots)")
    ap.add_argument("--t-shift", type=float, default=3.0,
                    help="train.t_shift: at 1 (the seed's default) t near 1 is rarely drawn and the first "
                         "sampling steps, from pure noise, go wrong")
    ap.add_argument("--keep", type=Path, default=None, help="keep the scratch repo here")
    ap.add_argument("--guidance", default="none", help="train.sample_guidance for the grid")
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/overfit.json")
    args = ap.parse_args()
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1"}
    with tempfile.TemporaryDirectory(prefix="niche-overfit-") as tmp:
        repo = args.keep or Path(tmp) / "repo"
        scaffold(repo)
        os.chdir(repo)
        make_sample(Path("data/raw"), 0 if args.images == "photos" else 4, seed=0,
                    photos=args.images == "photos", bad_examples=False)
        if args.images == "photos":
            for f in Path("data/raw/photos").iterdir():
                if f.stem not in PHOTOS:
                    f.unlink()
        apply("tiny", Path("params.yaml"))
        doc = yaml.safe_load(Path("params.yaml").read_text())
        doc["train"].update(preset=args.preset, steps=args.steps, batch_size=4, lr=1e-3, warmup_steps=20, optimizer=args.optimizer,
                            image_scale=args.scale, flip=0.0, log_every=1, checkpoint_every=args.steps,
                            sample_every=args.steps, sample_steps=20, sample_guidance=args.guidance, t_shift=args.t_shift, num_workers=0, ema_warmup=50,
                            ema_decay=0.98)
        Path("params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
        subprocess.run([sys.executable, "-m", "dvc", "repro", "shard"], check=True, env=env, capture_output=True)
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "dvc", "repro", "train"], env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if p.returncode:
            sys.exit(p.stdout[-3000:] + p.stderr[-3000:])
        with open("runs/nanodit/live/plots/metrics/train/loss.tsv") as f:
            loss = [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]
        grid = sorted(Path("runs/nanodit/samples").glob("*.png"))[-1]
        out_grid = args.json.with_name("overfit_grid.png")
        out_grid.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(grid, out_grid)
        os.chdir(ROOT)
    w = max(1, len(loss) // 10)
    windows = [sum(loss[i:i + w]) / len(loss[i:i + w]) for i in range(0, len(loss), w)]
    falling = sum(b < a for a, b in zip(windows, windows[1:]))
    result = {"preset": args.preset, "images": args.images, "t_shift": args.t_shift, "guidance": args.guidance, "steps": args.steps, "optimizer": args.optimizer, "image_scale": args.scale,
              "seconds": round(seconds, 1), "steps_per_s": round(args.steps / seconds, 2),
              "loss_first": loss[0], "loss_last": loss[-1], "window": w,
              "window_means": [round(x, 4) for x in windows],
              "windows_falling": f"{falling}/{len(windows) - 1}", "grid": os.path.relpath(out_grid, ROOT)}
    print(f"{args.steps} steps in {seconds:.0f} s ({result['steps_per_s']} steps/s incl. start-up and grids)")
    print("loss, mean of each window of", w, "steps:", " ".join(f"{x:.4f}" for x in windows))
    print(f"falling in {result['windows_falling']} windows; first {loss[0]:.4f} → last {loss[-1]:.4f}")
    print("grid:", out_grid)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

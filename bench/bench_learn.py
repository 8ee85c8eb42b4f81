"""Does NanoDiT learn? Two experiments on the CPU, each through the whole pipeline (a scaffolded
repo, the tiny profile, `dvc repro shard` then `dvc repro train`) and the project's own sampler.

memorise  4 of scikit-image's photographs, cropped to 512 px buckets and trained at 64 px (the
          small preset at patch 8, 2,000 steps). Each training image is sampled back from
          its own conditioning (text, DINOv3, pose: as Suite.reconstruction does) with the EMA
          weights; PSNR(sample, original) per image. Target: mean >= 24 dB within 15 min of CPU.
text      12 synthetic 512 px images "a {colour} square in the {position}" (4 colours x 4
          quadrants; 4 combinations, one per colour and per position, never written). Each of the
          16 captions is sampled from text alone; colour and quadrant are judged by pixel
          statistics (no learned model). Target: colour and position accuracy >= 90% on the 12
          seen combinations (chance 25%); the 4 unseen ones show whether it composes.

Train settings: MEMORISE_TRAIN and TEXT_TRAIN below (params.yaml `train` keys). Grids go to
bench/results/learn_memorise.png (top originals, bottom samples) and learn_text.png (rows
colours, columns positions, unseen cells framed black). The last line of stdout is the JSON.

    .venv/bin/python bench/bench_learn.py [--quick] [--only memorise|text] [--keep DIR]
        [--set-memorise steps=800] [--set-text lr=5e-4] [--memorise-guidance none]
        [--text-guidance cfg] [--text-scale 3.0] [--json bench/results/learn.json]
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ---- train overrides (params.yaml `train`); checkpoint_every and sample_every default to steps
MEMORISE_TRAIN = dict(preset="small", patch_size=8,  # as wide (192) as a patch has values
                      batch_size=4, lr=1e-3, warmup_steps=20, optimizer="adamw", flip=0.0, log_every=50,
                      num_workers=1, ema_warmup=50, ema_decay=0.99, sample_steps=30, sample_guidance="none",
                      repa=False,  # the tiny profile's DINOv3 has random weights: nothing to align to
                      tread=False, resolution_schedule=[],
                      image_scale=0.125,  # 512 px buckets (MEMORISE_DATA) -> 64 px
                      steps=2000)  # measured: ~16 dB at 800 steps, ~28 dB at 2,000
# Square 512 px buckets: a quarter of the 1 MP decode and DINOv3 context per step (the loop
# spent a quarter of its time decoding 1 MP PNGs), and the photos all come out 64 x 64.
MEMORISE_DATA = {"bucket": {"buckets": [[512, 512]]}}
TEXT_TRAIN = dict(preset="small", patch_size=8, batch_size=12, lr=1e-3, warmup_steps=20, optimizer="adamw",
                  flip=0.0,  # a mirrored image would contradict its caption's left/right
                  log_every=50, num_workers=1, ema_warmup=50, ema_decay=0.99, sample_steps=30,
                  sample_guidance="none", repa=False, tread=False, resolution_schedule=[],
                  image_scale=0.125,  # 512 -> 64 px
                  # Sampled from text alone, so trained mostly on text alone. With the seed's shares
                  # (25% text-only; in 50% the image's own DINOv3 patches make the text redundant)
                  # 800 steps gave colour 12/12 but position 6/12: `--set-text cfg_dropout=...`.
                  cfg_dropout=dict(uncond=0.1, text_only=0.9, dino_cls_only=0.0, dino_patches_only=0.0,
                                   drop_pose=0.0, pose_only=0.0, all=0.0),
                  steps=800)
QUICK = dict(steps=20)  # plumbing only: the targets are not expected to be met

PHOTOS = ("astronaut", "retina", "immunohistochemistry", "hubble_deep_field_exif")  # all pass ingest.min_side
BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 30, 220), "yellow": (230, 200, 20)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# One per colour and one per position: each unseen caption is made of words seen elsewhere.
HELD_OUT = {("red", "bottom right"), ("green", "bottom left"), ("blue", "top right"), ("yellow", "top left")}
COMBOS = [(c, p) for c in COLOURS for p in POSITIONS]  # the 16, rows colours, columns positions
THRESHOLD = 60  # sum of |channel - background| above which a pixel is "not background"


# ---------------------------------------------------------------- the square world (pure)
def caption(colour: str, position: str) -> str:
    return f"a {colour} square in the {position}"


def square_image(colour: str, position: str, size: int = 512) -> Image.Image:
    """A square of side 3/8 of the image, centred in its quadrant, on a light-grey background."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    half, side = size // 2, size * 3 // 8
    x0 = (half if "right" in position else 0) + (half - side) // 2
    y0 = (half if "bottom" in position else 0) + (half - side) // 2
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=COLOURS[colour])
    return img


def write_squares(raw: Path) -> list[Path]:
    """The 12 seen combinations as PNGs with sidecar captions (ingest.caption_ext .txt)."""
    raw.mkdir(parents=True, exist_ok=True)
    paths = []
    for colour, position in COMBOS:
        if (colour, position) in HELD_OUT:
            continue
        path = raw / f"{colour}_{position.replace(' ', '_')}.png"
        square_image(colour, position).save(path)
        path.with_suffix(".txt").write_text(caption(colour, position) + "\n")
        paths.append(path)
    return paths


def judge(img) -> tuple[str | None, str | None]:
    """(colour, position) of a sample by pixel statistics: the nearest reference colour to the mean
    of the non-background pixels, the quadrant holding most of their difference; (None, None)
    when every pixel is background."""
    a = np.asarray(img.convert("RGB") if isinstance(img, Image.Image) else img, dtype=np.float64)
    diff = np.abs(a - BACKGROUND).sum(-1)
    mask = diff > THRESHOLD
    if not mask.any():
        return None, None
    mean = a[mask].mean(0)
    colour = min(COLOURS, key=lambda c: float(((mean - COLOURS[c]) ** 2).sum()))
    d, (h, w) = np.where(mask, diff, 0.0), mask.shape  # thresholded: faint noise everywhere does not vote
    top, bottom = d[:h // 2], d[h // 2:]
    totals = [top[:, :w // 2].sum(), top[:, w // 2:].sum(), bottom[:, :w // 2].sum(), bottom[:, w // 2:].sum()]
    return colour, POSITIONS[int(np.argmax(totals))]


def text_grid(samples: list[np.ndarray]) -> Image.Image:
    """The 16 samples, rows colours and columns positions (COMBOS order), unseen ones framed."""
    cells = [np.pad(s, ((2, 2), (2, 2), (0, 0)), constant_values=0 if combo in HELD_OUT else 255)
             for s, combo in zip(samples, COMBOS)]
    h, w = cells[0].shape[:2]
    left, top, pad = 44, 24, 4
    sheet = Image.new("RGB", (left + 4 * (w + pad), top + 4 * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, position in enumerate(POSITIONS):
        draw.multiline_text((left + j * (w + pad), 0), position.replace(" ", "\n"), fill="black")
    for i, colour in enumerate(COLOURS):
        draw.text((2, top + i * (h + pad) + h // 2 - 5), colour, fill="black")
        for j in range(4):
            sheet.paste(Image.fromarray(cells[4 * i + j]), (left + j * (w + pad), top + i * (h + pad)))
    return sheet


# ---------------------------------------------------------------- the pipeline
def parse_sets(items: list[str], base: dict) -> dict:
    """`key=value` pairs (YAML values) over `base`; keys must be params.yaml `train` keys."""
    known = yaml.safe_load((ROOT / "params.yaml").read_text())["train"]
    out = dict(base)
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in known:
            sys.exit(f"--set {item!r}: expected key=value with a params.yaml train key")
        out[key] = yaml.safe_load(value)
    out.setdefault("checkpoint_every", out["steps"])  # one checkpoint, at the end: the one sampled
    out.setdefault("sample_every", out["steps"])
    return out


def build_and_train(repo: Path, fill_raw, params: dict, env: dict) -> dict:
    """Scaffold `repo`, let `fill_raw` write data/raw, apply the tiny profile and `params`
    ({section: {key: value}}), repro shard, then train (timed alone); cwd must be `repo`."""
    from flows.scaffold import scaffold
    from tasks.profile import apply

    t0 = time.perf_counter()
    scaffold(repo)  # copies this checkout's models/tiny too, so apply() builds nothing
    fill_raw(Path("data/raw"))
    apply("tiny", Path("params.yaml"))
    doc = yaml.safe_load(Path("params.yaml").read_text())
    for section, values in params.items():
        doc[section].update(values)
    Path("params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run(["shard"], env)
    t1 = time.perf_counter()
    run(["train"], env)
    t2 = time.perf_counter()
    with open("runs/nanodit/live/plots/metrics/train/loss.tsv") as f:
        loss = [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]
    steps, live = params["train"]["steps"], json.loads(Path("runs/nanodit/live/metrics.json").read_text())
    return {"build_s": round(t1 - t0, 1), "train_s": round(t2 - t1, 1), "steps": steps,
            "steps_per_s": round(steps / (t2 - t1), 2),  # incl. the stage's start-up, grid and checkpoint
            # the loop alone, over the last log window (the trainer's own figure)
            "loop_samples_per_s": live.get("sys", {}).get("samples_per_s"),
            "loss_first": loss[0] if loss else None, "loss_last": loss[-1] if loss else None,
            "train": params["train"]}


def run(stage: list[str], env: dict) -> None:
    p = subprocess.run([sys.executable, "-m", "dvc", "repro", *stage], env=env, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"dvc repro {' '.join(stage)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")


def memorise(repo: Path, train: dict, guidance: str, env: dict) -> dict:
    def fill(raw: Path) -> None:
        from tasks.sample.__main__ import make_sample

        make_sample(raw, 0, seed=0, photos=True, bad_examples=False)
        for f in (raw / "photos").iterdir():
            if f.stem not in PHOTOS:
                f.unlink()

    out = build_and_train(repo, fill, {"train": train, **MEMORISE_DATA}, env)
    import pyarrow.parquet as pq
    import torch

    from tasks.data.loader import ShardLoader
    from tasks.nanodit.data import to_inputs
    from tasks.nanodit.sampler import NanoDiTSampler, find_checkpoint, trained_scale
    from tasks.training.live import grid, to_uint8

    t0 = time.perf_counter()
    names = {r["id"]: Path(r["path"]).stem for r in  # ids are content hashes: name them by file
             pq.read_table("data/manifest/ingest.parquet", columns=["id", "path"]).to_pylist()}
    ckpt = find_checkpoint(Path("runs/nanodit"))
    sampler = NanoDiTSampler(device="cpu")  # EMA weights
    meta, model = sampler.load(ckpt)
    scale, patch = trained_scale(meta), int(model.config.patch_size)
    settings = dict(meta["sampling"], guidance=guidance)  # steps, scale, scale_dino, route, shift
    rows: list[list[np.ndarray]] = [[], []]
    psnr: dict[str, float] = {}
    with ShardLoader("data/shards", split="train", batch_size=1, num_workers=0, shuffle_buffer=0) as loader:
        for i, batch in enumerate(loader):
            x0, cond = to_inputs(batch, scale, patch, torch.device("cpu"))
            x = sampler.denoise(model, cond, tuple(x0.shape[-2:]), **settings, seed=1000 + i)
            mse = float(((x - x0) ** 2).mean())  # on [-1, 1]: 4x the mse on [0, 1]
            psnr[names.get(batch["ids"][0], batch["ids"][0][:12])] = round(10 * math.log10(4 / max(mse, 1e-12)), 2)
            rows[0].append(to_uint8(x0)[0])
            rows[1].append(to_uint8(x)[0])
    grid(rows).save(ROOT / "bench/results/learn_memorise.png")
    print(f"\nmemorise: {out['steps']} steps, sampled at {scale:g} of the bucket, {settings['steps']} steps, "
          f"guidance {guidance}\n  {'image':22} {'size':>9} {'PSNR dB':>8}")
    for (sid, v), img in zip(psnr.items(), rows[0]):
        print(f"  {sid[:22]:22} {img.shape[1]:>4}x{img.shape[0]:<4} {v:8.2f}")
    mean = round(float(np.mean(list(psnr.values()))), 2)
    print(f"  {'mean':22} {'':9} {mean:8.2f}   (target >= 24)")
    return out | {"sample_s": round(time.perf_counter() - t0, 1), "sampling": settings, "psnr_db": psnr,
                  "psnr_mean_db": mean}


def text(repo: Path, train: dict, guidance: str, scale: float, env: dict) -> dict:
    params = {"train": train, "caption": {"backend": "sidecar"}, "bucket": {"buckets": [[512, 512]]},
              "ingest": {"holdout_count": 0}}  # all 12 train: nothing seen is wasted on a holdout
    out = build_and_train(repo, write_squares, params, env)
    from tasks.nanodit.sampler import NanoDiTSampler, find_checkpoint, read_meta

    t0 = time.perf_counter()
    ckpt = find_checkpoint(Path("runs/nanodit"))
    steps = int(read_meta(ckpt)["sampling"]["steps"])
    sampler = NanoDiTSampler(run_dir=None, device="cpu", guidance=guidance, scale=scale, steps=steps)
    rows, samples = [], []
    print(f"\ntext: {out['steps']} steps; sampled from text alone, {steps} steps, guidance {guidance} "
          f"{scale:g}\n  {'caption':34} {'seen':6} {'colour':8} {'position':13}")
    for i, (colour, position) in enumerate(COMBOS):
        img = sampler.sample(ckpt, caption(colour, position), seed=2000 + i, negative=None)
        samples.append(np.asarray(img.convert("RGB")))
        got_c, got_p = judge(img)
        seen = (colour, position) not in HELD_OUT
        rows.append({"colour": colour, "position": position, "seen": seen, "judged_colour": got_c,
                     "judged_position": got_p})
        print(f"  {caption(colour, position):34} {'seen' if seen else 'UNSEEN':6} "
              f"{str(got_c):6} {'ok' if got_c == colour else 'X':2} {str(got_p):12} "
              f"{'ok' if got_p == position else 'X'}")
    text_grid(samples).save(ROOT / "bench/results/learn_text.png")

    def acc(key: str, seen: bool) -> float:
        sel = [r for r in rows if r["seen"] == seen]
        return round(sum(r[f"judged_{key}"] == r[key] for r in sel) / len(sel), 3)

    figures = {f"{k}_acc_{s}": acc(k, s == "seen") for s in ("seen", "unseen") for k in ("colour", "position")}
    print("  " + "  ".join(f"{k} {v:.0%}" for k, v in figures.items()) + "   (target seen >= 90%, chance 25%)")
    return out | {"sample_s": round(time.perf_counter() - t0, 1), "guidance": guidance, "scale": scale,
                  "sample_steps": steps, "combinations": rows, **figures}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 steps each: plumbing only")
    ap.add_argument("--only", choices=["memorise", "text"])
    ap.add_argument("--keep", type=Path, help="keep the scratch repos in DIR/memorise and DIR/text")
    ap.add_argument("--set-memorise", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--set-text", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--memorise-guidance", default="none", choices=["none", "cfg", "self", "dual"])
    ap.add_argument("--text-guidance", default="cfg", choices=["none", "cfg", "self"])
    ap.add_argument("--text-scale", type=float, default=3.0)
    ap.add_argument("--json", type=Path, default=ROOT / "bench/results/learn.json")
    args = ap.parse_args()
    quick = QUICK if args.quick else {}
    trains = {"memorise": parse_sets(args.set_memorise, {**MEMORISE_TRAIN, **quick}),
              "text": parse_sets(args.set_text, {**TEXT_TRAIN, **quick})}
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "DVC_NO_ANALYTICS": "1"}
    (ROOT / "bench/results").mkdir(parents=True, exist_ok=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    t0, results = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="niche-learn-") as tmp:
        for name in ("memorise", "text"):
            if args.only not in (None, name):
                continue
            repo = (args.keep or Path(tmp)).resolve() / name
            if repo.exists() and any(repo.iterdir()):
                sys.exit(f"--keep: {repo} exists and is not empty")
            repo.mkdir(parents=True, exist_ok=True)
            with contextlib.chdir(repo):  # the stages and the tiny profile's model paths are relative
                results[name] = (memorise(repo, trains[name], args.memorise_guidance, env) if name == "memorise"
                                 else text(repo, trains[name], args.text_guidance, args.text_scale, env))
    m, t = results.get("memorise", {}), results.get("text", {})
    summary = {"memorise_psnr_db": m.get("psnr_mean_db"),
               **{k: t.get(k) for k in ("colour_acc_seen", "position_acc_seen", "colour_acc_unseen",
                                        "position_acc_unseen")},
               "seconds": round(time.perf_counter() - t0, 1), "quick": args.quick, **results}
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

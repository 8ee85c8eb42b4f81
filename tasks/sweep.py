"""Choose a checkpoint by eye: every checkpoint of a run x a fixed list of prompts
(some never seen in training) x fixed seeds, in ONE labelled grid.

    python -m tasks.sweep --run runs/nanodit [--prompts "a figure dancing" "a figure running" ...] \\
        [--prompts-file FILE] [--seeds 0 1] [--negative "..."] [--steps N] [--out runs/<run>/sweep.png] \\
        [--size WxH] [--guidance cfg|none|self] [--scale S] [--weights ema|model] [--device auto|cpu|cuda]

The grid and its layout .json are tasks/report/sweep_grid.py's (rows: checkpoints, oldest
first; columns: prompts x seeds). It knows nothing of the model: anything with the `Sampler`
protocol's two methods can be swept (the SDXL LoRA trainer's checkpoints too:
`python -m tasks.sample_lora sweep`). Here the sampler is NanoDiT's
(tasks/nanodit/sampler.py, the one generate and validate use too):
  - checkpoints: every finished runs/<run>/checkpoints/step-* (tasks/training/checkpoints.py);
  - text only (no reference, no pose), the prompt written as the caption stage writes
    it (trigger in front) and encoded by the checkpoint's embed_text model, once per
    prompt for the whole sweep;
  - size: --size, else the first bucket at the scale the checkpoint trained at
    (so early rows of a run with a resolution schedule are smaller);
  - Euler sampling with the seed (models/flow_matching.py euler_sample); guidance `dual`
    (validate.guidance may say it) needs a reference image, which a text-only sweep
    does not have: it samples with `cfg` instead, saying so in the log;
  - --negative: classifier-free guidance against the negative prompt instead of the
    unconditional prediction, x0 = neg + scale * (cond - neg), where neg keeps the text
    part with the negative prompt's tokens (normalised, trigger in front, like the
    prompt). An empty --negative means none.

Prompts: --prompts and/or --prompts-file (one a line; blank lines and lines starting
with # skipped); neither: params.yaml validate.sweep_prompts when present, else a
built-in list (two like the sample dataset's captions, two it never shows). --seen N
adds the first N training captions (by sample id) of the caption stage's table: prompts
the model has seen, beside ones it has not (the validate flow adds validate.sweep_seen).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from models.hub import SetupError
from tasks.nanodit.sampler import GUIDANCE, WEIGHTS, NanoDiTSampler
from tasks.report.sweep_grid import SweepError, sweep

log = logging.getLogger("niche.sweep")

DEFAULT_PROMPTS = (
    "a particle figure running hard, leaning forward with elbows bent, facing right",
    "a human figure sitting cross-legged on the floor, hands resting on its knees, facing the viewer",
    "a figure juggling three balls",
    "two figures dancing together",
)
DEFAULT_SEEDS = (0, 1)
CAPTIONS = Path("data/manifest/caption.parquet")  # the caption stage's table: --seen's prompts


def read_prompts_file(path: str | Path) -> list[str]:
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise SweepError(f"--prompts-file {path}: unreadable ({e})") from None
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def seen_captions(captions: str | Path, n: int) -> list[str]:
    """The first `n` training captions, by sample id, of the caption stage's table: prompts the
    model has seen, to sweep beside ones it never saw (memorising vs generalising shows in the
    same grid). Captions that failed are passed over; no table means none, with a warning."""
    from tasks.embed_text import read_captions

    path = Path(captions)
    if n <= 0:
        return []
    if not path.is_file():
        log.warning("sweep: %s not found: no training caption to sweep beside the prompts", path)
        return []
    try:
        rows = read_captions(path)
    except (OSError, ValueError) as e:  # a missing column, or pyarrow's ArrowInvalid (a ValueError)
        raise SweepError(f"{path}: not a readable caption table ({e})") from None
    ok = sorted((r["id"], r["text"]) for r in rows
                if r["split"] == "train" and not r["error"] and (r["text"] or "").strip())
    return [text for _, text in ok[:n]]


def default_prompts(params: str | Path = "params.yaml") -> list[str]:
    """params.yaml validate.sweep_prompts when present and not empty, else DEFAULT_PROMPTS."""
    import yaml

    path = Path(params)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"{path}: unreadable ({e})") from None
    prompts = ((doc or {}).get("validate") or {}).get("sweep_prompts") if isinstance(doc, dict) else None
    if not prompts:  # absent, null or []
        return list(DEFAULT_PROMPTS)
    if not isinstance(prompts, list) or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise SweepError(f"{path}: validate.sweep_prompts: expected a list of prompts (strings)")
    return list(prompts)


def main(argv: list[str] | None = None) -> None:
    from tasks.core.stage import setup_logging

    ap = argparse.ArgumentParser(prog="python -m tasks.sweep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run folder (runs/<run>, holding checkpoints/)")
    ap.add_argument("--prompts", nargs="+", help="the prompts (default: params.yaml validate.sweep_prompts, "
                    "else a built-in list)")
    ap.add_argument("--prompts-file", help="more prompts, one a line (# comments and blank lines skipped)")
    ap.add_argument("--seen", type=int, default=0, help="add the first N training captions (by id) of "
                    "data/manifest/caption.parquet: prompts the model has seen (the validate flow adds "
                    "validate.sweep_seen of them)")
    ap.add_argument("--seeds", nargs="+", type=int, default=list(DEFAULT_SEEDS))
    ap.add_argument("--negative", help="guide against this prompt instead of the unconditional prediction")
    ap.add_argument("--steps", type=int, help="Euler steps (default: each checkpoint's sampling.steps)")
    ap.add_argument("--out", help="the PNG (default: <run>/sweep.png; the layout .json goes beside it)")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default: the first bucket at each checkpoint's trained scale)")
    ap.add_argument("--guidance", default="cfg", choices=GUIDANCE)
    ap.add_argument("--scale", type=float, default=3.0, help="guidance scale")
    ap.add_argument("--weights", default="ema", choices=WEIGHTS)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = ap.parse_args(argv)
    setup_logging()
    try:
        if args.negative and args.negative.strip() and args.guidance != "cfg":
            raise SweepError(f"--negative guides as cfg does, against the negative prompt: it needs --guidance "
                             f"cfg, not {args.guidance!r}")
        prompts = list(args.prompts or [])
        if args.prompts_file:
            prompts += read_prompts_file(args.prompts_file)
        if not prompts:
            if args.prompts_file:
                raise SweepError(f"--prompts-file {args.prompts_file}: no prompts in it")
            prompts = default_prompts()
        prompts += seen_captions(CAPTIONS, args.seen)
        sampler = NanoDiTSampler(args.run, size=args.size, steps=args.steps, guidance=args.guidance,
                                 scale=args.scale, weights=args.weights, device=args.device)
        out = Path(args.out) if args.out else Path(args.run) / "sweep.png"
        sweep(sampler, prompts, args.seeds, args.negative, out)
    except SetupError as e:
        sys.exit(f"sweep: {e}")


if __name__ == "__main__":
    main()

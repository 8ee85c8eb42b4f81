"""Choose a checkpoint by eye: every checkpoint of a run x a fixed list of prompts
(some never seen in training) x fixed seeds, in ONE labelled grid.

    python -m tasks.sweep --run runs/nanodit [--prompts "a figure dancing" "a figure running" ...] \\
        [--prompts-file FILE] [--seeds 0 1] [--negative "..."] [--steps N] [--out runs/<run>/sweep.png] \\
        [--size WxH] [--guidance cfg|none|self] [--scale S] [--weights ema|model] [--device auto|cpu|cuda]

Rows are the checkpoints, oldest first, labelled "step N"; columns are prompts x seeds
(prompt-major), labelled with the prompt (wrapped, cut to a few lines) and "seed S".
Every cell is as large as the largest image (aspect buckets and the resolution
schedule make them differ); each image is centred in its cell on white. Beside
the PNG, a .json (same name) describes the layout: rows (the steps), cols
([prompt, seed] pairs), the checkpoints, the negative prompt, the geometry and
each cell's image size, and the sampler's settings. Both are written atomically.

The grid and the loop know nothing of the model: anything with the `Sampler`
protocol's two methods can be swept (the SDXL LoRA trainer's checkpoints too).
`NanoDiTSampler` is the one for this project's NanoDiT runs:
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
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image, ImageDraw, ImageFont

from models.hub import SetupError

log = logging.getLogger("niche.sweep")

# Two like tasks/sample's captions, two the sample dataset never shows.
DEFAULT_PROMPTS = (
    "a particle figure running hard, leaning forward with elbows bent, facing right",
    "a human figure sitting cross-legged on the floor, hands resting on its knees, facing the viewer",
    "a figure juggling three balls",
    "two figures dancing together",
)
DEFAULT_SEEDS = (0, 1)
CAPTIONS = Path("data/manifest/caption.parquet")  # the caption stage's table: --seen's prompts
GUIDANCE = ("cfg", "none", "self")

PAD = 6                 # around labels and between an image and its cell's edge
MIN_CELL_WIDTH = 128    # so that a label has room even over tiny images
PROMPT_LINES = 3        # a longer prompt is cut, ending in "..."
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


class SweepError(SetupError):
    """Something the person running the sweep fixes: the command stops with the message alone."""


@runtime_checkable
class Sampler(Protocol):
    """What a model offers the sweep. Optionally also `describe() -> dict` (its settings,
    recorded in the layout .json)."""

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(step, checkpoint), oldest first."""
        ...

    def sample(self, ckpt: Path, prompt: str, seed: int, negative: str | None) -> Image.Image:
        """One image; the same arguments give the same image."""
        ...


# ---------------------------------------------------------------- the grid

@dataclass(frozen=True)
class Layout:
    """Where everything is in the sheet (pixels)."""
    label_width: int   # the first column ("step N")
    header: int        # the first row (prompt + seed)
    cell: tuple[int, int]

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        x = self.label_width + col * self.cell[0]
        y = self.header + row * self.cell[1]
        return x, y, x + self.cell[0], y + self.cell[1]

    def size(self, rows: int, cols: int) -> tuple[int, int]:
        return self.label_width + cols * self.cell[0], self.header + rows * self.cell[1]


def _font():
    return ImageFont.load_default()


def _width(font, text: str) -> int:
    return int(round(font.getlength(text)))


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ayg|")
    return int(bottom - min(top, 0)) + 3


def wrap(text: str, font, width: int, lines: int = PROMPT_LINES) -> list[str]:
    """`text` in at most `lines` lines of at most `width` pixels; what does not fit ends in '...'."""
    out: list[str] = []
    words = text.split()
    while words and len(out) < lines:
        line = words.pop(0)
        while _width(font, line) > width and len(line) > 1:  # a word wider than the cell: break it
            cut = len(line) - 1
            while cut > 1 and _width(font, line[:cut]) > width:
                cut -= 1
            words.insert(0, line[cut:])
            line = line[:cut]
        while words and _width(font, f"{line} {words[0]}") <= width:
            line = f"{line} {words.pop(0)}"
        out.append(line)
    if words and out:  # cut: make room for the ellipsis on the last line
        last = out[-1]
        while last and _width(font, last + "...") > width:
            last = last[:-1].rstrip()
        out[-1] = last + "..."
    return out or [""]


def draw_grid(cells: list[list[Image.Image]], row_labels: list[str],
              col_labels: list[tuple[str, str]]) -> tuple[Image.Image, Layout]:
    """A white sheet: a header row of column labels (a wrapped first line(s), then a second
    part, e.g. prompt and "seed 0"), a first column of row labels, and each image centred in
    equal cells."""
    font = _font()
    line_h = _line_height(font)
    images = [img for row in cells for img in row]
    cw = max(MIN_CELL_WIDTH, max(i.width for i in images) + 2 * PAD)
    ch = max(i.height for i in images) + 2 * PAD
    wrapped = [wrap(text, font, cw - 2 * PAD) for text, _ in col_labels]
    header = (max(len(w) for w in wrapped) + 1) * line_h + 2 * PAD
    label_width = max(_width(font, t) for t in row_labels) + 2 * PAD
    layout = Layout(label_width, header, (cw, ch))
    sheet = Image.new("RGB", layout.size(len(cells), len(col_labels)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for c, (lines, (_, second)) in enumerate(zip(wrapped, col_labels)):
        x0 = label_width + c * cw + PAD
        for k, line in enumerate(lines):
            draw.text((x0, PAD + k * line_h), line, fill=INK, font=font)
        draw.text((x0, PAD + len(lines) * line_h), second, fill=INK, font=font)
    for r, (row, label) in enumerate(zip(cells, row_labels)):
        y = header + r * ch
        draw.text((PAD, y + (ch - line_h) // 2), label, fill=INK, font=font)
        for c, img in enumerate(row):
            x0, y0, x1, y1 = layout.cell_box(r, c)
            sheet.paste(img.convert("RGB"), (x0 + (cw - img.width) // 2, y0 + (ch - img.height) // 2))
    return sheet, layout


def layout_path(out_png: Path) -> Path:
    return Path(out_png).with_suffix(".json")


def sweep(sampler: Sampler, prompts: list[str] | tuple[str, ...], seeds: list[int] | tuple[int, ...],
          negative: str | None, out_png: str | Path) -> Path:
    """Sample every checkpoint x prompt x seed, draw the labelled grid to `out_png` and its
    layout to the .json beside it (both atomically); returns `out_png`."""
    from PIL.PngImagePlugin import PngInfo

    from tasks.core.store import atomic_write, atomic_write_json

    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise SweepError(f"--out {out_png}: expected a .png path")
    prompts, seeds = list(prompts), [int(s) for s in seeds]
    if not prompts:
        raise SweepError("no prompts to sweep")
    if not seeds:
        raise SweepError("no seeds to sweep")
    negative = negative if negative and negative.strip() else None
    ckpts = list(sampler.checkpoints())
    if not ckpts:
        raise SweepError("no finished checkpoints to sweep")
    cols = [(p, s) for p in prompts for s in seeds]
    total, t0 = len(ckpts) * len(cols), time.monotonic()
    cells: list[list[Image.Image]] = []
    for r, (step, ckpt) in enumerate(ckpts):
        row = []
        for c, (prompt, seed) in enumerate(cols):
            row.append(sampler.sample(ckpt, prompt, seed, negative))
            done = r * len(cols) + c + 1
            log.info("sweep: %d/%d (step %d, seed %d, %r) %.1fs", done, total, step, seed, prompt,
                     time.monotonic() - t0)
        cells.append(row)
    sheet, layout = draw_grid(cells, [f"step {step}" for step, _ in ckpts],
                              [(p, f"seed {s}") for p, s in cols])
    describe = getattr(sampler, "describe", None)
    doc = {"image": out_png.name,
           "rows": [step for step, _ in ckpts],
           "cols": [[p, s] for p, s in cols],
           "checkpoints": [str(ckpt) for _, ckpt in ckpts],
           "prompts": prompts, "seeds": seeds, "negative": negative,
           "order": "rows: checkpoints, oldest first; cols: prompts x seeds, prompt-major",
           "label_width": layout.label_width, "header": layout.header, "cell": list(layout.cell),
           "width": sheet.width, "height": sheet.height,
           "sizes": [[[img.width, img.height] for img in row] for row in cells],
           "sampler": describe() if callable(describe) else type(sampler).__name__}
    chunk = PngInfo()
    chunk.add_text("niche", json.dumps(doc, sort_keys=True, ensure_ascii=False))
    atomic_write(out_png, lambda tmp: sheet.save(tmp, format="PNG", pnginfo=chunk))
    atomic_write_json(layout_path(out_png), doc)
    log.info("sweep: wrote %s (%d checkpoints x %d prompts x %d seeds) and %s", out_png, len(ckpts),
             len(prompts), len(seeds), layout_path(out_png).name)
    return out_png


# ---------------------------------------------------------------- NanoDiT

class NanoDiTSampler:
    """A NanoDiT run's checkpoints, sampled from text alone (see the module doc)."""

    def __init__(self, run_dir: str | Path, size: tuple[int, int] | str | None = None, steps: int | None = None,
                 guidance: str = "cfg", scale: float = 3.0, weights: str = "ema", device: str = "auto"):
        from tasks.generate import WEIGHTS, parse_size, resolve_device

        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            raise SweepError(f"--run {self.run_dir}: not found (a run folder, e.g. runs/nanodit)")
        if guidance == "dual":  # the validate flow passes validate.guidance, which may be dual
            log.info("sweep: guidance dual guides with a reference image's DINOv3 parts; the sweep samples "
                     "from text alone, so it uses cfg")
            guidance = "cfg"
        if guidance not in GUIDANCE:
            raise SweepError(f"--guidance {guidance!r}: expected one of {', '.join(GUIDANCE)}")
        if weights not in WEIGHTS:
            raise SweepError(f"--weights {weights!r}: expected ema or model")
        if steps is not None and steps < 1:
            raise SweepError(f"--steps {steps}: expected at least 1")
        self.size = parse_size(size) if isinstance(size, str) else (tuple(size) if size else None)
        self.steps, self.guidance, self.scale, self.weights = steps, guidance, float(scale), weights
        self.device = resolve_device(device)
        self._texts: dict[tuple[str, str], object] = {}  # (embed_text params, text) -> T5 states
        self._loaded: tuple[Path, dict, object] | None = None  # the current checkpoint's meta and model

    def describe(self) -> dict:
        return {"sampler": "nanodit", "run": str(self.run_dir), "size": list(self.size) if self.size else None,
                "steps": self.steps, "guidance": self.guidance, "scale": self.scale, "weights": self.weights,
                "device": self.device, "parts": "text only"}

    def checkpoints(self) -> list[tuple[int, Path]]:
        from tasks.training.checkpoints import step_dirs

        found = step_dirs(self.run_dir / "checkpoints")
        if not found:
            raise SweepError(f"--run {self.run_dir}: no finished checkpoint under {self.run_dir / 'checkpoints'} "
                             "(step-NNNNNN/ with meta.json and state.pt); train first, or wait for the first "
                             "checkpoint_every steps")
        return found

    def _load(self, ckpt: Path):
        """The checkpoint's meta and model, kept while the sweep stays on it (one row)."""
        from models.nanodit import NanoDiT
        from tasks.generate import GenerateError, read_meta

        if self._loaded is None or self._loaded[0] != ckpt:
            self._loaded = None  # free the previous row's model first
            meta = read_meta(ckpt)
            weights_dir = ckpt / self.weights
            if not (weights_dir / "config.json").is_file():
                other = "model" if self.weights == "ema" else "ema"
                raise GenerateError(f"{ckpt}: no {self.weights}/ weights (config.json); try --weights {other}")
            model = NanoDiT.from_pretrained(weights_dir).to(self.device).eval()
            self._loaded = (ckpt, meta, model)
        return self._loaded[1], self._loaded[2]

    def _text(self, meta: dict, ckpt: Path, prompt: str):
        """T5 states (1, n, D) on the device, encoded once per text for the whole sweep."""
        import torch

        from tasks.generate import caption_trigger, encode_text, prompt_text

        text = prompt_text(prompt, caption_trigger(meta))
        key = (json.dumps(meta["dataset_params"].get("embed_text"), sort_keys=True), text)
        if key not in self._texts:
            self._texts[key] = encode_text(meta, ckpt, text, self.device)
        return torch.as_tensor(self._texts[key], dtype=torch.float32, device=self.device)[None]

    def _size(self, meta: dict, ckpt: Path, model) -> tuple[int, int]:
        from tasks.bucket import BucketParams
        from tasks.generate import check_size, scaled_size, section, trained_scale

        patch = model.config.patch_size
        size = self.size
        if size is None:
            bucket = section(meta, "bucket", BucketParams, ckpt).buckets[0]
            size = scaled_size(bucket, trained_scale(meta), patch)
        check_size(size, patch, f"the model's patch_size is {patch}")
        return int(size[0]), int(size[1])

    def sample(self, ckpt: Path, prompt: str, seed: int, negative: str | None) -> Image.Image:
        import torch

        from models.flow_matching import euler_sample
        from models.nanodit import Conditioning
        from tasks.generate import POSE_JOINTS, GenerateError, to_pil

        if negative and self.guidance != "cfg":
            raise SweepError(f"--negative guides as cfg does, against the negative prompt: it needs --guidance "
                             f"cfg, not {self.guidance!r}")
        meta, model = self._load(Path(ckpt))
        sampling = meta.get("sampling") or {}
        w, h = self._size(meta, ckpt, model)
        dev, cfg = self.device, model.config

        def text_only(t5):
            if t5.shape[-1] != cfg.text_dim:
                raise GenerateError(f"embed_text.model gives {t5.shape[-1]}-wide states but {ckpt} expects "
                                    f"text_dim {cfg.text_dim}")
            return Conditioning(
                t5=t5, t5_mask=torch.ones(1, t5.shape[1], dtype=torch.bool, device=dev),
                # Dropped parts are masked out of attention: 1x1 placeholders cost nothing.
                dino_cls=torch.zeros(1, cfg.dino_dim, device=dev),
                dino_patches=torch.zeros(1, 1, 1, cfg.dino_dim, device=dev),
                pose=torch.zeros(1, POSE_JOINTS, 3, device=dev),
                keep=torch.tensor([[True, False, False, False]], device=dev))

        cond = text_only(self._text(meta, ckpt, prompt))
        steps = self.steps or int(sampling.get("steps", 50))
        shift = float(sampling.get("shift", 1.0))
        neg = text_only(self._text(meta, ckpt, negative)) if negative else None
        images = euler_sample(model, cond, (h, w), steps=steps, guidance=self.guidance, scale=self.scale,
                              route=float(sampling.get("route", 0.5)), shift=shift, seed=int(seed), negative=neg)
        return to_pil(images)[0]


# ---------------------------------------------------------------- command line

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
    from tasks.generate import WEIGHTS
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

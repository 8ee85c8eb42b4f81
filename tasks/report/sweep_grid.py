"""The checkpoint sweep's grid: every checkpoint of a run x prompts x seeds, sampled by any
`Sampler` (NanoDiT's: tasks/nanodit/sampler.py; SDXL's: tasks/sdxl/sampler.py) and drawn
as ONE labelled sheet, with its layout in a .json beside it.

Rows are the checkpoints, oldest first, labelled "step N"; columns are prompts x seeds
(prompt-major), labelled with the prompt (wrapped, cut to a few lines) and "seed S".
Every cell is as large as the largest image (aspect buckets and the resolution
schedule make them differ); each image is centred in its cell on white. Beside
the PNG, a .json (same name) describes the layout: rows (the steps), cols
([prompt, seed] pairs), the checkpoints, the negative prompt, the geometry and
each cell's image size, and the sampler's settings. Both are written atomically.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image, ImageDraw, ImageFont

from models.hub import SetupError
from tasks.core.store import atomic_write, atomic_write_json

log = logging.getLogger("niche.sweep")

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

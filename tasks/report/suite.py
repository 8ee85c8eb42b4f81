"""The four checks of `validate` (tasks/validate.py) on one model and a fixed set of samples.

Every generation of sample i starts from the noise of seed (seed + i), so the images a
check compares differ only in what the check changes:
  reconstruction     own conditioning            → LPIPS(generated, original)
  dino_swap          text + pose of i, DINOv3 CLS + patches of j, the next sample of i's
                     bucket (the patch grids match) → LPIPS(generated, original j), the
                     style source, and LPIPS(generated, original i), the text source
  text_manipulation  the caption with one word swapped (VALIDATE.text_edits), both texts
                     through T5, each sampled from its text alone → LPIPS(generated from the
                     edit, generated from the original). Not with the image's own DINOv3 CLS
                     and patches: they fix the image, so a model that has learnt them rightly
                     ignores the text beside them (on the demo's model a whole other caption
                     moved the pixels 10x less with them than without)
  cfg_divergence     guidance none: all parts kept vs none kept → LPIPS between the two
Lower is better for the first two; for the last two a larger distance means the
conditioning moves the image more.

With `images_dir`, every image a check compares is also saved at full size (the grids
hold thumbnails), each atomically: <images_dir>/<check>/<index>_<id>_<role>.png, the
roles per check in IMAGE_ROLES.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from models.lpips_metric import MIN_SIZE as LPIPS_MIN
from models.nanodit import Conditioning, NanoDiT
from tasks.nanodit.data import to_inputs
from tasks.nanodit.sampler import NanoDiTSampler
from tasks.training.live import save_png, to_uint8

TESTS = ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence")
HIGHER_IS_BETTER = frozenset({"text_manipulation", "cfg_divergence"})
THUMB = 256  # the longest side of an image in the grids (a 1 MP sample would make a 25k-px sheet)
# The full-size images each check saves per sample, in its grid's row order.
IMAGE_ROLES = {"reconstruction": ("orig", "gen"), "dino_swap": ("text_source", "style_source", "gen"),
               "text_manipulation": ("gen_caption", "gen_edit"), "cfg_divergence": ("cond", "uncond")}


@dataclass
class Sample:
    id: str
    caption: str
    bucket: str
    batch: dict  # the loader's batch of one


@dataclass
class Result:
    """One check: LPIPS per image id, samples skipped, the grid's rows and per-image details."""
    values: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    rows: list[list[np.ndarray]] = field(default_factory=list)
    extra: dict[str, dict] = field(default_factory=dict)  # name → {id: value}


def edit_caption(caption: str, edits) -> tuple[str, str, str] | None:
    """(edited caption, word found, word put) for the first pair of `edits` whose either word is in
    the caption (whole word, any case; every occurrence swapped, its case kept); None without one."""
    for a, b in edits:
        for old, new in ((a, b), (b, a)):
            pattern = re.compile(rf"\b{re.escape(old)}\b", re.IGNORECASE)
            if pattern.search(caption):
                def put(m: re.Match, new=new) -> str:  # the found word's case: WORD, Word or word
                    found = m.group(0)
                    if found.isupper() and len(found) > 1:
                        return new.upper()
                    return new[:1].upper() + new[1:] if found[:1].isupper() else new
                return pattern.sub(put, caption), old, new
    return None


def partners(samples: list[Sample]) -> dict[int, int | None]:
    """Sample i → j, the next sample of its bucket (cyclically) with the same DINOv3 patch grid;
    None when i has no such partner."""
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.bucket, tuple(s.batch["dino_patches"].shape)), []).append(i)
    out: dict[int, int | None] = {}
    for members in groups.values():
        for k, i in enumerate(members):
            out[i] = members[(k + 1) % len(members)] if len(members) > 1 else None
    return out


def stats(values) -> dict:
    """n, mean, std, min, p10, p50, p90, max (None without values)."""
    v = np.asarray(list(values), dtype=np.float64)
    if not len(v):
        return dict.fromkeys(("mean", "std", "min", "p10", "p50", "p90", "max"), None) | {"n": 0}
    p10, p50, p90 = np.percentile(v, [10, 50, 90])
    figures = dict(mean=v.mean(), std=v.std(), min=v.min(), p10=p10, p50=p50, p90=p90, max=v.max())
    return {"n": int(len(v)), **{k: round(float(x), 6) for k, x in figures.items()}}


def thumb(images: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] → (h, w, 3) uint8, the longest side at most THUMB."""
    img = to_uint8(images)[0]
    h, w = img.shape[:2]
    if max(h, w) <= THUMB:
        return img
    f = THUMB / max(h, w)
    return np.asarray(Image.fromarray(img).resize((max(1, round(w * f)), max(1, round(h * f))),
                                                  Image.Resampling.LANCZOS))


class Suite:
    """The checks on `samples` (their images at `scale` of the bucket size, on the patch grid)."""

    def __init__(self, sampler: NanoDiTSampler, model: NanoDiT, lpips: Callable, samples: list[Sample], *,
                 scale: float, sampling: dict, seed: int, encode: Callable[[str], np.ndarray], edits,
                 images_dir: Path | None = None):
        """`sampler` (tasks/nanodit/sampler.py) samples every image, on its device and precision."""
        self.sampler, self.model, self.lpips, self.samples = sampler, model, lpips, samples
        self.scale, self.device, self.sampling, self.seed = scale, torch.device(sampler.device), sampling, seed
        self.encode, self.edits = encode, edits
        self.patch = int(model.config.patch_size)
        self.upscaled = 1  # the largest factor distance() enlarged images by
        self.images_dir, self.written = images_dir, set()  # the full-size images saved by this run

    def keep(self, check: str, i: int, *images: torch.Tensor) -> list[np.ndarray]:
        """Sample i's images of `check` (IMAGE_ROLES order): saved at full size when images_dir is
        set (written one by one, not held: 25 samples at 1 MP would be hundreds of MB); their
        thumbnails returned for the grid."""
        if self.images_dir is not None:
            # An id may hold any character; only safe ones go into the file name.
            sid = re.sub(r"[^A-Za-z0-9._-]+", "_", self.samples[i].id)[:80]
            for role, img in zip(IMAGE_ROLES[check], images, strict=True):
                path = self.images_dir / check / f"{i:03d}_{sid}_{role}.png"
                save_png(path, Image.fromarray(to_uint8(img)[0]))
                self.written.add(path)
        return [thumb(img) for img in images]

    def inputs(self, i: int) -> tuple[torch.Tensor, Conditioning]:
        return to_inputs(self.samples[i].batch, self.scale, self.patch, self.device)

    @torch.no_grad()
    def generate(self, i: int, cond: Conditioning, size: tuple[int, int], guidance: str | None = None):
        settings = dict(self.sampling, seed=self.seed + i)
        if guidance is not None:
            settings["guidance"] = guidance
        return self.sampler.denoise(self.model, cond, size, **settings)

    @torch.no_grad()
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """LPIPS of one pair; images under LPIPS_MIN px a side are enlarged by a whole factor (nearest)
        first, as AlexNet's feature maps vanish below that."""
        k = -(-LPIPS_MIN // min(a.shape[-2:]))
        if k > 1:
            a, b = (F.interpolate(x.float(), scale_factor=k, mode="nearest") for x in (a, b))
            self.upscaled = max(self.upscaled, k)
        return round(float(self.lpips(a.float(), b.float())[0]), 6)

    def run(self) -> dict[str, Result]:
        return {name: getattr(self, name)() for name in TESTS}

    def reconstruction(self) -> Result:
        r, originals, generated = Result(), [], []
        for i, s in enumerate(self.samples):
            x0, cond = self.inputs(i)
            out = self.generate(i, cond, tuple(x0.shape[-2:]))
            r.values[s.id] = self.distance(out, x0)
            orig, gen = self.keep("reconstruction", i, x0, out)
            originals.append(orig)
            generated.append(gen)
        r.rows = [originals, generated]
        return r

    def dino_swap(self) -> Result:
        r = Result(extra={"dino_source": {}, "to_text_source": {}})
        rows: list[list[np.ndarray]] = [[], [], []]
        for i, j in partners(self.samples).items():
            if j is None:  # alone in its bucket: nothing to swap with
                r.skipped += 1
                continue
            x0_i, cond = self.inputs(i)
            x0_j, other = self.inputs(j)
            swapped = Conditioning(cond.t5, cond.t5_mask, other.dino_cls, other.dino_patches, cond.pose, cond.keep)
            out = self.generate(i, swapped, tuple(x0_i.shape[-2:]))
            sid = self.samples[i].id
            r.values[sid] = self.distance(out, x0_j)
            r.extra["to_text_source"][sid] = self.distance(out, x0_i)
            r.extra["dino_source"][sid] = self.samples[j].id
            for row, img in zip(rows, self.keep("dino_swap", i, x0_i, x0_j, out)):
                row.append(img)
        r.rows = rows if rows[0] else []
        return r

    def _text_only(self, cond: Conditioning, text: str) -> Conditioning:
        """`text` through T5 as the only part kept (the text_only category of training)."""
        t5 = torch.as_tensor(self.encode(text), dtype=torch.float32, device=self.device)[None]
        mask = torch.ones(1, t5.shape[1], dtype=torch.bool, device=self.device)
        keep = torch.zeros_like(cond.keep)
        keep[:, 0] = True
        return Conditioning(t5, mask, cond.dino_cls, cond.dino_patches, cond.pose, keep)

    def text_manipulation(self) -> Result:
        r = Result(extra={"edit": {}})
        rows: list[list[np.ndarray]] = [[], []]
        for i, s in enumerate(self.samples):
            edit = edit_caption(s.caption, self.edits)
            if edit is None:
                r.skipped += 1
                continue
            x0, cond = self.inputs(i)
            size = tuple(x0.shape[-2:])
            # Both captions through the same encoder: the distance is the edit's alone.
            # dual guidance would bring the DINOv3 parts back in its third pass: cfg, as the
            # sampler does for a prompt without a reference image.
            guidance = "cfg" if self.sampling.get("guidance") == "dual" else None
            before = self.generate(i, self._text_only(cond, s.caption), size, guidance)
            after = self.generate(i, self._text_only(cond, edit[0]), size, guidance)
            r.values[s.id] = self.distance(after, before)
            r.extra["edit"][s.id] = f"{edit[1]} -> {edit[2]}"
            for row, img in zip(rows, self.keep("text_manipulation", i, before, after)):
                row.append(img)
        r.rows = rows if rows[0] else []
        return r

    def cfg_divergence(self) -> Result:
        r, conds, unconds = Result(), [], []
        for i, s in enumerate(self.samples):
            x0, cond = self.inputs(i)
            size = tuple(x0.shape[-2:])
            c = self.generate(i, cond, size, guidance="none")
            u = self.generate(i, cond.with_keep(torch.zeros_like(cond.keep)), size, guidance="none")
            r.values[s.id] = self.distance(c, u)
            cond_img, uncond_img = self.keep("cfg_divergence", i, c, u)
            conds.append(cond_img)
            unconds.append(uncond_img)
        r.rows = [conds, unconds]
        return r

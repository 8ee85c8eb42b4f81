"""What a training run shows a person: dvclive metrics, loss spikes, the sample grid.

dvclive writes runs/<run>/live/metrics.json (the latest values, a versioned out: `dvc
metrics show runs/<run>/live/metrics.json`) and live/plots/metrics/<name>.tsv (one row per
logged step: `dvc plots show`); the stage's DVC metric is the trainer's compact
metrics/<stage>.json (step, loss). The trainer sets dvclive's step to the optimizer step itself,
and on resuming from step k first drops the rows after k, so a crash between two
checkpoints leaves no duplicated or orphaned points.
"""
from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.core.store import atomic_write

log = logging.getLogger("niche.train")


def truncate_live(live_dir: Path, step: int) -> None:
    """Forget every point logged after `step` (the checkpoint a run resumes from)."""
    for tsv in (live_dir / "plots" / "metrics").rglob("*.tsv"):
        with tsv.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows:
            continue
        col = rows[0].index("step")
        kept = [rows[0]] + [r for r in rows[1:] if int(r[col]) <= step]
        with tsv.open("w", newline="", encoding="utf-8") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows(kept)
    summary = live_dir / "metrics.json"
    if summary.is_file():
        doc = json.loads(summary.read_text(encoding="utf-8"))
        doc["step"] = step
        summary.write_text(json.dumps(doc, indent=4) + "\n", encoding="utf-8")


def open_live(live_dir: Path, resume_step: int | None):
    from unittest import mock

    import dvclive.live  # imports dvc: only the rank that logs pays for it

    if resume_step is not None:
        truncate_live(live_dir, resume_step)
    # dvc.yaml declares the metrics and plots itself, and `dvc exp run` records the experiment,
    # so dvclive's own DVC integration (saving experiments, writing dvc.yaml, Studio) stays off.
    # Its repo lookup is skipped too: it raises in a git repo with no commit yet.
    with mock.patch.object(dvclive.live, "get_dvc_repo", return_value=None):
        return dvclive.live.Live(str(live_dir), resume=resume_step is not None, save_dvc_exp=False,
                                 dvcyaml=False)


class Window:
    """Sums of per-step figures between two log lines, plus a running mean for spike detection."""

    def __init__(self, spike_factor: float, warmup: int = 20):
        self.spike_factor, self.warmup = spike_factor, warmup
        self.sums: dict[str, float] = {}
        self.n = 0
        self.running: float | None = None
        self.seen = 0

    def add(self, figures: dict[str, float]) -> None:
        for k, v in figures.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.n += 1

    def spike(self, loss: float) -> float | None:
        """The running mean when `loss` is a spike, else None; then the mean takes the loss in."""
        mean, self.seen = self.running, self.seen + 1
        hit = mean is not None and self.seen > self.warmup and loss > self.spike_factor * mean
        self.running = loss if mean is None else 0.98 * mean + 0.02 * loss
        return mean if hit else None

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "n": self.n, "running": self.running, "seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.sums, self.n = dict(state["sums"]), int(state["n"])
        self.running, self.seen = state["running"], int(state["seen"])

    def flush(self) -> dict[str, float]:
        out = {k: v / max(self.n, 1) for k, v in self.sums.items()}
        self.sums, self.n = {}, 0
        return out


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] → (B, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def grid(rows: list[list[np.ndarray]], pad: int = 4) -> Image.Image:
    """Rows of (H, W, 3) uint8 images on a white sheet; each image centred in a cell as large as
    the largest (aspect buckets differ)."""
    images = [img for row in rows for img in row]
    h, w = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
    n = max(len(r) for r in rows)
    sheet = Image.new("RGB", (n * (w + pad) + pad, len(rows) * (h + pad) + pad), "white")
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            x = pad + j * (w + pad) + (w - img.shape[1]) // 2
            y = pad + i * (h + pad) + (h - img.shape[0]) // 2
            sheet.paste(Image.fromarray(img), (x, y))
    return sheet


def save_png(path: Path, image: Image.Image) -> None:
    atomic_write(path, lambda p: image.save(p, format="PNG"))


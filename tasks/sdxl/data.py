"""The SDXL trainer's data: the latents stage's rows, each with its own prompt.

One row carries a sample's latent file AND its caption (joined on the content id
here, once), and every latent file names the sample it belongs to in its metadata,
checked on each read: however the batches are shuffled, a latent is never paired
with another image's caption (diffusers' advanced script shuffles the cached latents
and the captions separately under `--cache_latents`).

Rows also carry ingest's tags (the full fine-tune's tag-string prompts). Batches hold one bucket
each (one tensor shape); under torchrun a batch is the global one and `rank_slice` gives each
rank its part. The order is a seeded permutation
per epoch, and the position (epoch, batch) is saved in checkpoints: a resumed run
sees the very batches an uninterrupted one would.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import torch

from models.sdxl.objective import time_ids
from tasks.latents import STORE as LATENTS_STORE
from tasks.core.store import ItemRef, StoreError, read_metadata
from tasks.latents import read_latent

log = logging.getLogger("niche.train_lora")

LATENTS_TABLE = Path("data/manifest/latents.parquet")
CAPTION_TABLE = Path("data/manifest/caption.parquet")
INGEST_TABLE = Path("data/manifest/ingest.parquet")


class NoSamples(ValueError):
    """The configured split has no usable sample."""


@dataclass(frozen=True)
class Row:
    id: str
    latent: ItemRef
    bucket: str
    size: tuple[int, int]  # (width, height) of the encoded image
    prompt: str
    time_ids: tuple[int, ...]
    tags: tuple[str, ...] = ()  # the ingest manifest's tags (the full fine-tune's tag prompts)


def load_rows(root: Path, p) -> list[Row]:
    """The split's usable rows. Samples whose latent or caption failed upstream are left out,
    each named in the log with its reason; no row at all is an error naming the split."""
    table = root / LATENTS_TABLE
    if not table.is_file():
        raise FileNotFoundError(f"{table} is missing: run the latents stage first (dvc repro latents)")
    captions: dict[str, str | None] = {}
    if p.prompt is None:
        cap = root / CAPTION_TABLE
        if not cap.is_file():
            raise FileNotFoundError(f"{cap} is missing: run the caption stage (or set {p.SECTION}.prompt)")
        captions = {r["id"]: r["text"] for r in pq.read_table(cap, columns=["id", "text"]).to_pylist()}
    tags: dict[str, tuple[str, ...]] = {}
    if getattr(p, "tag_share", 0) > 0 and p.prompt is None and (root / INGEST_TABLE).is_file():
        names = pq.read_schema(root / INGEST_TABLE).names
        if "tags" in names:  # an ingest manifest from before tags has none
            tags = {r["id"]: tuple(r["tags"]) for r in pq.read_table(root / INGEST_TABLE, columns=["id", "tags"])
                    .to_pylist() if r["tags"]}
    rows, left_out = [], {}
    for r in sorted(pq.read_table(table).to_pylist(), key=lambda r: r["id"]):
        if r["split"] != p.split:
            continue
        if r.get("error") or not r.get("file"):
            left_out[r["id"]] = f"no latent ({r.get('error') or 'failed upstream'})"
            continue
        if p.prompt is None and not captions.get(r["id"]):
            left_out[r["id"]] = "no caption (the caption stage failed or skipped it)"
            continue
        latent = ItemRef(str(root / LATENTS_STORE), ".safetensors", r["key"])
        why = _check_latent(latent, r["id"])
        if why:
            left_out[r["id"]] = why
            continue
        ids = time_ids((r["orig_height"], r["orig_width"]), (r["crop_top"], r["crop_left"]),
                       (r["height"], r["width"]))
        rows.append(Row(r["id"], latent, r["bucket"], (r["width"], r["height"]),
                        p.prompt_for(captions.get(r["id"])), tuple(ids), tags.get(r["id"], ())))
    for item, why in sorted(left_out.items()):
        log.warning("%s: sample %s left out: %s", p.SECTION, item, why)
    if not rows:
        raise NoSamples(f"{p.SECTION}.split: no usable sample of split {p.split!r} in {table}"
                         + (f" ({len(left_out)} left out, see the warnings)" if left_out else ""))
    return rows


def _check_latent(item: ItemRef, item_id: str) -> str | None:
    """Why the latent cannot be used (missing, unreadable, another sample's), or None. Only the
    header is read: checking 70,000 items costs seconds, and a bad one is left out up front
    instead of stopping the run hours in."""
    try:
        got = read_metadata(item.store(), item.key).get("id")
    except (OSError, ValueError, StoreError) as e:
        return f"latent {item} unreadable ({e}); run the latents stage again"
    if got != item_id:
        return f"latent {item} belongs to sample {got}, not to this one: run the latents stage again"
    return None


class BucketBatches:
    """Seeded, resumable batches of one bucket (and chunk count) each; every sample once per epoch (a bucket's
    last, smaller batch included: with 50 images, dropping remainders would drop images)."""

    def __init__(self, rows: list[Row], batch_size: int, seed: int, chunks: dict[str, int] | None = None):
        """`chunks` ({prompt: 75-token chunks}): batches also keep chunk counts apart, as bigASP
        does, so a long prompt does not pad every prompt of its batch to three chunks."""
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.chunks = chunks or {}
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached and self._cached[0] == epoch:
            return self._cached[1]
        rng = random.Random(f"{self.seed}:{epoch}")
        groups: dict[tuple[str, int], list[int]] = {}
        for i, r in enumerate(self.rows):
            groups.setdefault((r.bucket, self.chunks.get(r.prompt, 1)), []).append(i)
        batches = []
        for group in sorted(groups):
            idx = groups[group]
            rng.shuffle(idx)
            batches += [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        rng.shuffle(batches)
        self._cached = (epoch, batches)
        return batches

    def next(self) -> list[Row]:
        batches = self._epoch_batches(self.epoch)
        if self.index >= len(batches):
            self.epoch, self.index = self.epoch + 1, 0
            batches = self._epoch_batches(self.epoch)
        batch = [self.rows[i] for i in batches[self.index]]
        self.index += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "n": len(self.rows)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def rank_slice(batch: list[Row], rank: int, world: int) -> list[tuple[int, Row]]:
    """This rank's part of a global batch, each row with its place in the batch (what seeds its
    randomness). A bucket's last, smaller batch is first filled up to a multiple of the world size
    with its own rows again, at their own places: every rank computes on as many samples
    (data-parallel gradients are averaged over ranks), and a batch of one on two ranks computes
    that one sample twice alike, so its gradient is the one-rank gradient."""
    per = -(-len(batch) // world)
    places = [i % len(batch) for i in range(per * world)][rank * per:(rank + 1) * per]
    return [(i, batch[i]) for i in places]


def load_latents(batch: list[Row], scaling_factor: float, sample: bool, g: torch.Generator) -> torch.Tensor:
    """(B, 4, h, w) scaled latents: the posterior's mean, or a draw from it."""
    out = []
    for r in batch:
        item = read_latent(r.latent, expect_id=r.id)
        mean, std = torch.as_tensor(item["mean"]).float(), torch.as_tensor(item["std"]).float()
        x = mean + std * torch.randn(mean.shape, generator=g) if sample else mean
        out.append(x * scaling_factor)
    return torch.stack(out)

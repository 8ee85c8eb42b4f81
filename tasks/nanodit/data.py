"""NanoDiT's data: the shards through the training loader, one batch turned into model inputs,
the grid's fixed samples, and the run's fingerprint (what makes two runs the same run)."""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from models.nanodit import Conditioning
from tasks.core.params import as_dict
from tasks.data.loader import ShardLoader
from tasks.nanodit.params import NOT_TRAJECTORY, TrainParams
from tasks.training.run import TrainError

log = logging.getLogger("niche.train")
# Recorded in each checkpoint: the params the training data was built with (generation re-encodes
# a prompt, a reference image or a pose with them, as the dataset stages did).
DATASET_SECTIONS = ("bucket", "caption", "embed_text", "embed_image", "embed_pose", "shard")


def shards_of(p: TrainParams, root: Path) -> str:
    return p.shards if "://" in p.shards else str(root / p.shards)


def open_loader(p: TrainParams, root: Path, rank: int, world: int, pin_memory: bool) -> ShardLoader:
    """The train split for this rank; an error naming train.shards when it cannot give every rank
    a batch."""
    try:
        loader = ShardLoader(shards_of(p, root), split="train", batch_size=p.batch_size, seed=p.seed, rank=rank,
                             world_size=world, num_workers=p.num_workers, shuffle_buffer=p.shuffle_buffer,
                             flip=p.flip, on_error="skip", endpoint_url=p.endpoint_url, pin_memory=pin_memory)
    except ValueError as e:  # no shards.parquet, no train split
        raise TrainError(f"train.shards: {e}") from None
    empty = [r for r, n in enumerate(loader.batches_per_rank()) if n == 0]
    if empty:
        raise TrainError(f"train: rank(s) {empty} get no batches from {p.shards} (split train: "
                         f"{len(loader.shards)} shards for {world} ranks); rebuild the shards "
                         "with shard.min_shards >= ranks x loader workers")
    return loader


def fixed_samples(p: TrainParams, root: Path, n: int = 4) -> list[dict]:
    """The grid's samples, one batch of one each (buckets differ): the first `n` of the holdout
    split (then train), the same every time for these shards and seed."""
    found: list[dict] = []
    for split in ("holdout", "train"):
        try:
            with ShardLoader(shards_of(p, root), split=split, batch_size=1, seed=p.seed, num_workers=0,
                             shuffle_buffer=0, on_error="skip", endpoint_url=p.endpoint_url) as ld:
                for batch in ld:
                    found.append(batch)
                    if len(found) == n:
                        return found
        except ValueError as e:  # no such split
            log.info("train: no %s samples for the grid (%s)", split, e)
    if not found:
        raise TrainError(f"train: {p.shards} holds no readable samples")
    return found


def data_dims(first: dict) -> dict:
    """The widths the model is built for, read from a sample: T5's, DINOv3's, and how much the
    shards pooled the DINOv3 patch grid."""
    img, h = first["image"], first["dino_patches"].shape[1]
    return {"text_dim": int(first["t5"].shape[-1]), "dino_dim": int(first["dino_cls"].shape[-1]),
            "dino_pool": max(1, int(img.shape[-2]) // (16 * h))}


def to_inputs(batch: dict, scale: float, patch: int, device: torch.device) -> tuple[torch.Tensor, Conditioning]:
    """A loader batch → (x0 in [-1, 1] at `scale` of its bucket on the patch grid, conditioning)."""
    x0 = batch["image"].to(device, non_blocking=True).float() / 127.5 - 1  # (B, 3, H, W)
    if scale != 1.0:
        H, W = x0.shape[-2:]
        size = (max(patch, round(H * scale / patch) * patch), max(patch, round(W * scale / patch) * patch))
        x0 = F.interpolate(x0, size=size, mode="bilinear", antialias=True, align_corners=False)
    B = x0.shape[0]
    cond = Conditioning(batch["t5"].to(device).float(), batch["t5_mask"].to(device),
                        batch["dino_cls"].to(device).float(), batch["dino_patches"].to(device).float(),
                        batch["pose"].to(device).float(), torch.ones(B, 4, dtype=torch.bool, device=device))
    return x0, cond


def forever(loader: ShardLoader):
    """Batches epoch after epoch (the loader reshuffles each epoch by its seed)."""
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:  # an empty split, or every shard of this rank unreadable (skipped, logged)
            raise TrainError("train: a whole epoch gave this rank no batch; see the loader's warnings")


def fingerprint(p: TrainParams, loader: ShardLoader, world: int) -> str:
    """Every parameter that changes what is computed, the shards and the number of ranks: a
    checkpoint with the same fingerprint is resumed, any other run is moved aside."""
    doc = {k: v for k, v in as_dict(p).items() if k not in NOT_TRAJECTORY}
    # format 2: the EMA ramp and AdamW for t_embed's and pose_mlp's first layers (a format-1
    # checkpoint's Muon state would not even load into the new split).
    doc.update(shards=loader._config()["shards"], world_size=world, format=2)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def dataset_params(params_file: Path) -> dict:
    import yaml
    doc = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    return {k: doc.get(k) for k in DATASET_SECTIONS}

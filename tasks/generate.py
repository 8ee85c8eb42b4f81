"""Generate images from a NanoDiT checkpoint: a prompt, and optionally a
reference image (DINOv3 CLS + patches) and a pose (an image → DWPose, or keypoints
in a .json file), through the very encoders the training data was built with.

    python -m tasks.generate --checkpoint runs/nanodit --prompt "a figure dancing" \\
        [--reference ref.png] [--pose pose.png|pose.json] --out out.png \\
        [--size WxH] [--steps N] [--guidance auto|none|cfg|self|dual] [--scale S] [--scale-dino S] \\
        [--seed 0] [--weights ema|model] [--device auto|cpu|cuda] [--batch N]

--checkpoint is a checkpoint folder (model/, ema/, meta.json) or a run folder
(its newest checkpoint: the highest step-* with a meta.json). The checkpoint's
meta.json names the dataset parameters (dataset_params: bucket, embed_text,
embed_image, embed_pose, shard, maybe caption) and the sampling defaults.

Each input goes through what the dataset stages did to the training samples:
  prompt     the caption trigger word (dataset_params.caption.trigger, when set) is
             put in front as the caption stage did; T5 as embed_text; float16 as in
             the shards. An empty prompt stays empty (no trigger).
  reference  decoded like ingest, resized to cover the conditioning frame and centre-
             cropped as bucket does, DINOv3 as embed_image, patches pooled (data.dino_pool)
             and int8-quantized (shard.patch_dtype) as the shards hold them.
  pose       an image: bucketed to the frame, DWPose as embed_pose (the largest person;
             nobody found gives all-zero keypoints, as in training, with a warning).
             A .json: either 133 rows [x_norm, y_norm, conf] (x_norm = 2x/W - 1, used as
             they are), or a tasks.sample `.pose.json` ({"width", "height", "keypoints":
             133 x [x, y, conf] in pixels}), mapped through bucket's cover-crop to the frame.
The conditioning frame is the bucket nearest the output's aspect, at its full size:
training computed DINOv3 and DWPose on buckets even when the image itself trained at
a fraction of the bucket (train.image_scale, resolution_schedule).
Parts not given are dropped (`keep`), not zeroed; only the encoders needed are loaded.
--size defaults to the reference's nearest bucket, else the first bucket, scaled to
what the checkpoint trained at (meta.json params: image_scale x the schedule's factor
at its step; 1 without them), on the patch grid as the trainer rounds it.
--guidance auto is the checkpoint's sampling.guidance, except that "dual" needs a
reference and falls back to "cfg" without one.

The PNG (one per image; --batch N writes NAME-0.png ... NAME-{N-1}.png) is written
atomically and holds the settings in a "niche" text chunk. The same checkpoint,
inputs, seed and device give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from models.hub import SetupError
from tasks.nanodit.conditioning import (META, POSE_JOINTS, Encoded, GenerateError, _f16, bucketed, caption_trigger,
                                        encode_reference, load_image, pose_from_image, pose_from_json, prompt_text,
                                        section)
from tasks.nanodit.sampler import (GUIDANCE_CHOICES, WEIGHTS, NanoDiTSampler, check_size, find_checkpoint,
                                   parse_guidance, parse_size, read_meta, scaled_size, to_pil, trained_scale)

log = logging.getLogger("niche.generate")


def output_paths(out: Path, n: int) -> list[Path]:
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def write_png(img: Image.Image, path: Path, info: dict) -> None:
    from PIL.PngImagePlugin import PngInfo

    from tasks.core.store import atomic_write

    chunk = PngInfo()
    chunk.add_text("niche", json.dumps(info, sort_keys=True, ensure_ascii=False))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG", pnginfo=chunk))


def generate(checkpoint: str | Path, prompt: str, out: str | Path, *, reference: str | Path | None = None,
             pose: str | Path | None = None, size: tuple[int, int] | str | None = None,
             steps: int | None = None, guidance: str = "auto", scale: float | None = None, seed: int = 0,
             weights: str = "ema", device: str = "auto", batch: int = 1,
             scale_dino: float | None = None) -> list[Path]:
    """Sample `batch` images and write them as PNGs; returns their paths (see the module doc)."""
    import torch

    from models.nanodit import Conditioning
    from tasks.bucket import BucketParams, nearest_bucket
    from tasks.embed_image import PATCH

    if weights not in WEIGHTS:
        raise GenerateError(f"--weights {weights!r}: expected ema or model")
    if batch < 1:
        raise GenerateError(f"--batch {batch}: expected at least 1")
    if steps is not None and steps < 1:
        raise GenerateError(f"--steps {steps}: expected at least 1")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise GenerateError(f"--out {out}: expected a .png path")
    ckpt = find_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    weights_dir = ckpt / weights
    if not (weights_dir / "config.json").is_file():
        other = "model" if weights == "ema" else "ema"
        raise GenerateError(f"{ckpt}: no {weights}/ weights (config.json); try --weights {other}")
    sampling = meta.get("sampling") or {}
    data = meta.get("data") or {}
    sampler = NanoDiTSampler(weights=weights, device=device)
    device = sampler.device
    log.info("checkpoint %s (step %s, %s weights) on %s", ckpt, meta.get("step", "?"), weights, device)
    guidance = parse_guidance(guidance, sampling, reference is not None)

    # Everything a person may have got wrong is checked before a model loads.
    ref_img = load_image(reference, "--reference") if reference is not None else None
    pose_path = Path(pose) if pose is not None else None
    pose_img = None
    if pose_path is not None and pose_path.suffix.lower() != ".json":
        pose_img = load_image(pose_path, "--pose")
    bucket_p = section(meta, "bucket", BucketParams, ckpt)
    patch = int(json.loads((weights_dir / "config.json").read_text()).get("patch_size", 16))
    if isinstance(size, str):
        size = parse_size(size)
    if size is None:
        bucket = nearest_bucket(ref_img.width, ref_img.height, bucket_p.buckets) if ref_img else bucket_p.buckets[0]
        trained = trained_scale(meta)
        size = scaled_size(bucket, trained, patch)
        log.info("size %dx%d: %s%s", *size, "the reference's bucket" if ref_img else "the first bucket",
                 f" at the {trained:g} scale the checkpoint was trained at" if trained != 1 else "")
    size = (int(size[0]), int(size[1]))
    check_size(size, patch, f"the model's patch_size is {patch}")
    # The frame the conditioning is computed in: the bucket of the output's aspect at its full
    # size, as training computed DINOv3 and DWPose on buckets, whatever scale the image trained at.
    frame = nearest_bucket(size[0], size[1], bucket_p.buckets)
    pool = None
    if ref_img is not None:
        pool = data.get("dino_pool")
        if pool is None and meta["dataset_params"].get("shard"):
            from tasks.shard import ShardParams
            pool = section(meta, "shard", ShardParams, ckpt).patch_pool
        if pool not in (1, 2):
            raise GenerateError(f"{ckpt / META}: data.dino_pool: expected 1 or 2, got {pool!r}")
        if frame[0] % (PATCH * pool) or frame[1] % (PATCH * pool):
            raise GenerateError(f"bucket {frame[0]}x{frame[1]} (the one for --size {size[0]}x{size[1]}): its "
                                f"DINOv3 grid does not pool {pool}x{pool}; the training data cannot have held it")
    pose_json = pose_from_json(pose_path, frame) if pose_path is not None and pose_img is None else None

    # Encoders, one at a time, each only when its input was given.
    text = prompt_text(prompt, caption_trigger(meta))
    enc = Encoded(t5=sampler.encode(meta, ckpt, text), dino_cls=None, dino_patches=None, pose=pose_json)
    if ref_img is not None:
        enc.dino_cls, enc.dino_patches = encode_reference(
            meta, ckpt, bucketed(ref_img, frame, bucket_p.resample), pool, device)
    if pose_img is not None:
        enc.pose = pose_from_image(meta, ckpt, bucketed(pose_img, frame, bucket_p.resample), device)
    if pose_json is not None:
        enc.pose = _f16(pose_json)

    meta, model = sampler.load(ckpt)
    text_dim, dino_dim = model.config.text_dim, model.config.dino_dim
    if enc.t5.shape[1] != text_dim:
        raise GenerateError(f"embed_text.model gives {enc.t5.shape[1]}-wide states but the checkpoint "
                            f"expects text_dim {text_dim}")
    if enc.dino_cls is not None and enc.dino_cls.shape[0] != dino_dim:
        raise GenerateError(f"embed_image.model gives {enc.dino_cls.shape[0]}-wide features but the "
                            f"checkpoint expects dino_dim {dino_dim}")

    def t(a, dtype=torch.float32):
        return torch.as_tensor(np.asarray(a), dtype=dtype, device=device)[None]

    has_ref, has_pose = enc.dino_cls is not None, enc.pose is not None
    cond = Conditioning(
        t5=t(enc.t5), t5_mask=torch.ones(1, enc.t5.shape[0], dtype=torch.bool, device=device),
        # A dropped part is masked out of attention: a 1x1 placeholder grid costs nothing.
        dino_cls=t(enc.dino_cls) if has_ref else torch.zeros(1, dino_dim, device=device),
        dino_patches=t(enc.dino_patches) if has_ref else torch.zeros(1, 1, 1, dino_dim, device=device),
        pose=t(enc.pose) if has_pose else torch.zeros(1, POSE_JOINTS, 3, device=device),
        keep=torch.tensor([[True, has_ref, has_ref, has_pose]], device=device),
    ).repeat(batch)
    settings = dict(steps=steps or int(sampling.get("steps", 50)), guidance=guidance,
                    scale=float(scale if scale is not None else sampling.get("scale", 3.0)),
                    scale_dino=float(scale_dino if scale_dino is not None else sampling.get("scale_dino", 1.5)),
                    route=float(sampling.get("route", 0.5)), shift=float(sampling.get("shift", 1.0)), seed=int(seed))
    log.info("sampling %d image(s) of %dx%d: %s; parts: text%s%s", batch, *size,
             ", ".join(f"{k} {v}" for k, v in settings.items()),
             " + reference" if has_ref else "", " + pose" if has_pose else "")
    images = sampler.denoise(model, cond, (size[1], size[0]), **settings)

    info = dict(settings, prompt=prompt, text=text, checkpoint=str(ckpt), step=meta.get("step"), weights=weights,
                size=f"{size[0]}x{size[1]}", frame=f"{frame[0]}x{frame[1]}",
                reference=None if reference is None else str(reference), pose=None if pose is None else str(pose))
    paths = output_paths(out, batch)
    for i, (img, path) in enumerate(zip(to_pil(images), paths)):
        write_png(img, path, dict(info, index=i) if batch > 1 else info)
        log.info("wrote %s", path)
    return paths


def main(argv: list[str] | None = None) -> None:
    from tasks.core.stage import setup_logging

    ap = argparse.ArgumentParser(prog="python -m tasks.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, or a run folder (its newest)")
    ap.add_argument("--prompt", required=True, help='the text ("" for none)')
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--reference", help="an image whose DINOv3 features condition the sample")
    ap.add_argument("--pose", help="an image (DWPose finds the pose) or a .json of keypoints")
    ap.add_argument("--size", help="WIDTHxHEIGHT (default: the reference's bucket, else the first bucket, "
                    "at the scale the checkpoint trained at)")
    ap.add_argument("--steps", type=int, help="Euler steps (default: the checkpoint's sampling.steps)")
    ap.add_argument("--guidance", default="auto", choices=GUIDANCE_CHOICES)
    ap.add_argument("--scale", type=float, help="guidance scale (default: the checkpoint's sampling.scale)")
    ap.add_argument("--scale-dino", type=float, help="dual guidance: the reference's (DINOv3) scale "
                    "(default: the checkpoint's sampling.scale_dino)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default="ema", choices=WEIGHTS)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--batch", type=int, default=1, help="images to sample (NAME-0.png, NAME-1.png, ...)")
    args = ap.parse_args(argv)
    setup_logging()
    try:
        generate(args.checkpoint, args.prompt, args.out, reference=args.reference, pose=args.pose,
                 size=args.size, steps=args.steps, guidance=args.guidance, scale=args.scale,
                 scale_dino=args.scale_dino, seed=args.seed, weights=args.weights, device=args.device,
                 batch=args.batch)
    except SetupError as e:
        sys.exit(f"generate: {e}")


if __name__ == "__main__":
    main()

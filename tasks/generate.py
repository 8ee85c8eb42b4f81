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
import functools
import json
import logging
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.hub import SetupError, resolve, torch_dtype
from tasks.core.params import ParamsError, from_dict

log = logging.getLogger("niche.generate")

GUIDANCE_CHOICES = ("auto", "none", "cfg", "self", "dual")
WEIGHTS = ("ema", "model")
META = "meta.json"
STEP_DIR = re.compile(r"step-(\d+)$")
POSE_JOINTS = 133


class GenerateError(SetupError):
    """Something the person running generate fixes: the command stops with the message alone."""


# ---------------------------------------------------------------- checkpoint

def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's (or its checkpoints/ folder's) newest one."""
    path = Path(path)
    if not path.exists():
        raise GenerateError(f"--checkpoint {path}: not found")
    if (path / META).is_file():
        return path
    if not path.is_dir():
        raise GenerateError(f"--checkpoint {path}: expected a checkpoint folder (with {META}) or a run folder")
    for folder in (path / "checkpoints", path):
        steps = [(int(m.group(1)), d) for d in folder.glob("step-*")
                 if (m := STEP_DIR.match(d.name)) and (d / META).is_file()] if folder.is_dir() else []
        if steps:
            return max(steps)[1]
    raise GenerateError(f"--checkpoint {path}: no {META} here and no checkpoints/step-*/{META} under it; "
                        "expected a checkpoint folder or a run folder with at least one finished checkpoint")


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerateError(f"{ckpt / META}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("dataset_params"), dict):
        raise GenerateError(f"{ckpt / META}: no dataset_params (the params the training data was built with)")
    return meta


def section(meta: dict, name: str, cls: type, ckpt: Path):
    """dataset_params.<name> of a checkpoint as its stage's typed params."""
    raw = meta["dataset_params"].get(name)
    if raw is None:
        raise GenerateError(f"{ckpt / META}: dataset_params has no '{name}' section, needed here")
    try:
        return from_dict(cls, raw, name)
    except (ParamsError, ValueError) as e:
        raise GenerateError(f"{ckpt / META}: dataset_params: {e}") from None


def caption_trigger(meta: dict) -> str:
    trigger = (meta["dataset_params"].get("caption") or {}).get("trigger") or ""
    if not isinstance(trigger, str):
        raise GenerateError(f"dataset_params.caption.trigger: expected a string, got {trigger!r}")
    return trigger


def prompt_text(prompt: str, trigger: str) -> str:
    """The prompt as the caption stage would have written it (normalised, trigger in front)."""
    from tasks.caption import apply_trigger, normalize

    text = normalize(prompt)
    return apply_trigger(text, trigger) if text else text


def _in_context(e: SetupError, ckpt: Path) -> SetupError:
    """A model error, saying where the model's name came from."""
    return type(e)(f"{e}\n(named by {ckpt / META}, the model the checkpoint's training data was built with)")


# ---------------------------------------------------------------- size

def parse_size(text: str) -> tuple[int, int]:
    """'WxH' → (W, H)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise GenerateError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
    return int(m.group(1)), int(m.group(2))


def check_size(size: tuple[int, int], multiple: int, why: str) -> None:
    w, h = size
    if w % multiple or h % multiple:
        raise GenerateError(f"--size {w}x{h}: width and height must be multiples of {multiple} ({why}); "
                            f"e.g. --size {max(multiple, w // multiple * multiple)}x"
                            f"{max(multiple, h // multiple * multiple)}")


def trained_scale(meta: dict) -> float:
    """The fraction of the bucket size the checkpoint's last step trained at (train.image_scale
    times its resolution_schedule factor; 1 when meta.json has no training params)."""
    params = meta.get("params") or {}
    scale = float(params.get("image_scale", 1.0))
    last = int(meta.get("step", 0)) - 1  # the 0-based index of the last step trained
    for until, factor in params.get("resolution_schedule") or ():
        if last < until:
            return scale * float(factor)
    return scale


def scaled_size(bucket: tuple[int, int], scale: float, patch: int) -> tuple[int, int]:
    """(W, H) of a bucket at `scale`, on the patch grid, rounded as the trainer rounds it."""
    return tuple(max(patch, round(side * scale / patch) * patch) for side in bucket)  # type: ignore[return-value]


# ---------------------------------------------------------------- inputs

def load_image(path: str | Path, what: str) -> Image.Image:
    """An image file as upright RGB, decoded as ingest decodes it."""
    from tasks.core.images import ImageRejected, decode
    from tasks.ingest import IngestParams

    path = Path(path)
    try:
        data = path.read_bytes()
        return decode(data, IngestParams().max_pixels).image
    except OSError as e:
        raise GenerateError(f"{what} {path}: cannot read ({e.strerror or e})") from None
    except ImageRejected as e:
        raise GenerateError(f"{what} {path}: not a usable image ({e})") from None


def bucketed(img: Image.Image, size: tuple[int, int], resample: str) -> Image.Image:
    """Resized to cover `size` and centre-cropped, exactly as the bucket stage does."""
    from tasks.bucket import render

    return render(img, size[0], size[1], resample)


def pose_from_json(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """(133, 3) float32 [x_norm, y_norm, conf] relative to a W x H frame, from a .json
    holding either those rows or a tasks.sample .pose.json (pixels of its own width x height)."""
    from models.encoders.dwpose_decode import normalised_keypoints
    from tasks.bucket import cover_crop

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerateError(f"--pose {path}: unreadable ({e})") from None
    expected = (f"expected {POSE_JOINTS} rows [x_norm, y_norm, conf], or a .pose.json with width, height "
                f"and {POSE_JOINTS} keypoints [x, y, conf] in pixels")
    try:
        if isinstance(doc, dict):
            kp = np.asarray(doc["keypoints"], dtype=np.float64)
            width, height = int(doc["width"]), int(doc["height"])
            if kp.shape != (POSE_JOINTS, 3) or width < 1 or height < 1:
                raise ValueError
            scale, left, top = cover_crop(width, height, *size)
            xy = np.column_stack([(kp[:, 0] - left) * scale, (kp[:, 1] - top) * scale])
            pose = normalised_keypoints(xy, kp[:, 2], *size).astype(np.float32)
        else:
            pose = np.asarray(doc, dtype=np.float32)
            if pose.shape != (POSE_JOINTS, 3):
                raise ValueError
    except (KeyError, TypeError, ValueError):
        raise GenerateError(f"--pose {path}: {expected}") from None
    if not np.isfinite(pose).all():
        raise GenerateError(f"--pose {path}: non-finite values")
    return pose


def parse_guidance(requested: str, sampling: dict, has_reference: bool) -> str:
    if requested not in GUIDANCE_CHOICES:
        raise GenerateError(f"--guidance {requested!r}: expected one of {', '.join(GUIDANCE_CHOICES)}")
    if requested != "auto":
        if requested == "dual" and not has_reference:
            raise GenerateError("--guidance dual guides by the reference image (DINOv3) as well as the text: "
                                "give --reference, or use --guidance cfg")
        return requested
    guidance = sampling.get("guidance", "cfg")
    if guidance == "dual" and not has_reference:
        log.info("guidance: the checkpoint's default is 'dual', which needs a reference image; "
                 "without --reference using 'cfg'")
        return "cfg"
    return guidance


# ---------------------------------------------------------------- generate

@dataclass
class Encoded:
    """The conditioning of one image, as arrays in the shards' precision."""
    t5: np.ndarray                   # (n, text_dim)
    dino_cls: np.ndarray | None      # (dino_dim,)
    dino_patches: np.ndarray | None  # (h, w, dino_dim), pooled
    pose: np.ndarray | None          # (133, 3)


def _f16(a: np.ndarray) -> np.ndarray:
    """Rounded through float16, as the shards store it."""
    return np.asarray(a).astype(np.float16).astype(np.float32)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise GenerateError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


@functools.lru_cache(maxsize=2)
def _t5_encoder(path: str, dtype: str, device: str):
    """One loaded T5 per (model, dtype, device) in a process: validation and sweeps encode
    dozens of prompts, and loading T5-large takes seconds each time."""
    import torch

    from models.encoders import t5
    return t5.T5Encoder(Path(path), getattr(torch, dtype.removeprefix("torch.")), device)


def encode_text(meta: dict, ckpt: Path, text: str, device: str) -> np.ndarray:
    from models.encoders import t5
    from tasks.embed_text import EmbedTextParams

    p = section(meta, "embed_text", EmbedTextParams, ckpt)
    try:
        resolved = resolve(p.model, "embed_text.model", p.revision, allow_patterns=t5.ALLOW_PATTERNS)
    except SetupError as e:
        raise _in_context(e, ckpt) from None
    encoder = _t5_encoder(str(resolved.path), str(torch_dtype(p.dtype, device)), device)
    (hidden, truncated), = encoder.encode([text], p.max_length)
    if truncated:
        log.warning("prompt: longer than embed_text.max_length = %d tokens; cut as training captions were",
                    p.max_length)
    return _f16(hidden)


def encode_reference(meta: dict, ckpt: Path, img: Image.Image, pool: int, device: str) -> tuple[np.ndarray, np.ndarray]:
    """DINOv3 CLS (D,) and patches pooled as the shards hold them (h/pool, w/pool, D)."""
    from models.encoders import dinov3
    from tasks.embed_image import PATCH, EmbedImageParams
    from tasks.shard import ShardParams
    from tasks.data.shard_format import dequantize, pool_patches, quantize

    p = section(meta, "embed_image", EmbedImageParams, ckpt)
    try:
        resolved = resolve(p.model, "embed_image.model", p.revision, allow_patterns=dinov3.ALLOW_PATTERNS)
    except SetupError as e:
        raise _in_context(e, ckpt) from None
    encoder = dinov3.DINOv3Encoder(resolved.path, torch_dtype(p.dtype, device), device)
    if encoder.patch_size != PATCH:
        raise GenerateError(f"embed_image.model: patch size {encoder.patch_size}, expected {PATCH}")
    cls, patches = encoder.encode(np.array(img)[None])
    pooled = pool_patches(patches[0].astype(np.float16), pool)
    # As the shards hold them: int8 with per-token scales, or float16 (rounded below).
    shard = section(meta, "shard", ShardParams, ckpt) if meta["dataset_params"].get("shard") else None
    if shard is not None and shard.patch_dtype == "int8":
        pooled = dequantize(*quantize(pooled))
    return _f16(cls[0]), _f16(pooled)


def pose_from_image(meta: dict, ckpt: Path, img: Image.Image, device: str) -> np.ndarray:
    """(133, 3) keypoints of the largest person in an image already bucketed to the frame."""
    from models.encoders.dwpose import DWPose, resolve_onnx
    from tasks.embed_pose import EmbedPoseParams, _item

    p = section(meta, "embed_pose", EmbedPoseParams, ckpt)
    try:
        det = resolve_onnx(p.detector, "embed_pose.detector")
        pose = resolve_onnx(p.pose, "embed_pose.pose")
        model = DWPose(det.path, pose.path, device="cpu" if device == "cpu" else p.device,
                       det_score=p.det_score, nms_iou=p.nms_iou, bbox_padding=p.bbox_padding,
                       param="embed_pose.device")
    except SetupError as e:
        raise _in_context(e, ckpt) from None
    result = model(img)
    tensors, info = _item(result, img.width, img.height)
    if result.main < 0:
        log.warning("--pose: DWPose found nobody in the pose image; using all-zero keypoints "
                    "(as training samples without a person had)")
    else:
        log.info("--pose: %s people found; the largest one's pose (mean confidence %s)",
                 info["n_people"], info["pose_conf"])
    return _f16(tensors["pose"])


def to_pil(images) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → RGB images."""
    import torch

    u8 = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB") for x in u8]


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

    from models.flow_matching import euler_sample
    from models.nanodit import Conditioning, NanoDiT
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
    device = resolve_device(device)
    log.info("checkpoint %s (step %s, %s weights) on %s", ckpt, meta.get("step", "?"), weights, device)
    guidance = parse_guidance(guidance, sampling, reference is not None)

    # Everything a person may have got wrong is checked before a model loads.
    ref_img = load_image(reference, "--reference") if reference is not None else None
    pose_path = Path(pose) if pose is not None else None
    pose_img = None
    if pose_path is not None and pose_path.suffix.lower() != ".json":
        pose_img = load_image(pose_path, "--pose")
    bucket_p = section(meta, "bucket", BucketParams, ckpt)
    patch = int(NanoDiT.load_config(weights_dir).get("patch_size", 16))
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
    enc = Encoded(t5=encode_text(meta, ckpt, text, device), dino_cls=None, dino_patches=None, pose=pose_json)
    if ref_img is not None:
        enc.dino_cls, enc.dino_patches = encode_reference(
            meta, ckpt, bucketed(ref_img, frame, bucket_p.resample), pool, device)
    if pose_img is not None:
        enc.pose = pose_from_image(meta, ckpt, bucketed(pose_img, frame, bucket_p.resample), device)
    if pose_json is not None:
        enc.pose = _f16(pose_json)

    model = NanoDiT.from_pretrained(weights_dir).to(device).eval()
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
    images = euler_sample(model, cond, (size[1], size[0]), **settings)

    info = dict(settings, prompt=prompt, text=text, checkpoint=str(ckpt), step=meta.get("step"), weights=weights,
                size=f"{size[0]}x{size[1]}", frame=f"{frame[0]}x{frame[1]}",
                reference=None if reference is None else str(reference), pose=None if pose is None else str(pose))
    paths = output_paths(out, batch)
    for i, (img, path) in enumerate(zip(to_pil(images), paths)):
        write_png(img, path, dict(info, index=i) if batch > 1 else info)
        log.info("wrote %s", path)
    return paths


# ---------------------------------------------------------------- command line

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

"""The conditioning of a NanoDiT sample, made the way the dataset stages made the training
samples': a prompt through the caption stage's normalisation and trigger and the checkpoint's
embed_text T5; a reference image decoded like ingest, bucketed like bucket, through embed_image's
DINOv3 and pooled / quantised as the shards hold it; a pose from an image (embed_pose's DWPose)
or from keypoints in a .json. The models and their settings come from the checkpoint's
meta.json (dataset_params), never from today's params.yaml.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.hub import SetupError, resolve, torch_dtype
from tasks.core.params import ParamsError, from_dict

log = logging.getLogger("niche.generate")

META = "meta.json"
POSE_JOINTS = 133


class GenerateError(SetupError):
    """Something the person running generate fixes: the command stops with the message alone."""


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


def load_image(path: str | Path, what: str) -> Image.Image:
    """An image file as upright RGB, decoded as ingest decodes it."""
    from tasks.core.images import DEFAULT_MAX_PIXELS, ImageRejected, decode

    path = Path(path)
    try:
        data = path.read_bytes()
        return decode(data, DEFAULT_MAX_PIXELS).image
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

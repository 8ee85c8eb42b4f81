"""DWPose whole-body pose in ONNX Runtime: a YOLOX person detector, then the
DW-LL SimCC pose model on the largest person's crop.

A model is named either by a local .onnx file or by a file inside a hub repo,
`org/repo/file.onnx` (the public models: `yzd-v/DWPose/yolox_l.onnx` and
`yzd-v/DWPose/dw-ll_ucoco_384.onnx`). Input sizes are read from the ONNX input
shapes, so the 384x288 and 256x192 pose variants both work unchanged.

Runs on CUDA when onnxruntime can (the `gpu` extra installs onnxruntime-gpu),
else on the CPU with a WARNING saying why; `device: cuda` on a machine without
it is an error, never a quiet fall-back.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.encoders import dwpose_decode as dec
from models.hub import ModelMissing, ResolvedModel, SetupError, resolve

log = logging.getLogger("niche.models.dwpose")

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
KEYPOINTS = 133  # COCO-WholeBody: 17 body, 6 feet, 68 face, 42 hands


class DeviceUnavailable(SetupError):
    """The configured device cannot run the models here."""


def resolve_onnx(spec: str, param: str) -> ResolvedModel:
    """A local .onnx file, or `org/repo/path/file.onnx` from the hub cache.

    The returned model's path is the .onnx file itself; its key() holds the
    spec and the hub commit (or the file's fingerprint).
    """
    local = Path(spec).expanduser()
    if local.exists():
        if not local.is_file():
            raise ModelMissing(f"{param}: {spec!r} is a folder; expected an .onnx file")
        return resolve(spec, param)
    parts = spec.split("/")
    if spec.startswith((".", "/", "~")) or len(parts) < 3:
        raise ModelMissing(f"{param}: {spec!r} is neither an existing .onnx file nor a file in a hub "
                           "repo like 'yzd-v/DWPose/yolox_l.onnx'")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    r = resolve(repo, param, allow_patterns=[filename])
    path = r.path / filename
    if not path.is_file():
        # The repo is cached, but without this file (a partial download).
        raise ModelMissing(f"{param}: {filename} is not in this machine's copy of {repo} ({r.path}); "
                           f"download it with `hf download {repo} {filename}`")
    return ResolvedModel(spec, path, r.revision, r.tiny)


def select_providers(device: str, param: str = "device") -> list[str]:
    """onnxruntime providers for device auto | cpu | cuda (see the module doc)."""
    import onnxruntime as ort

    if device == "cpu":
        return [CPU]
    available = ort.get_available_providers()
    if CUDA in available:
        return [CUDA, CPU]
    if device == "cuda":
        raise DeviceUnavailable(
            f"{param}: 'cuda', but this onnxruntime ({ort.__version__}) has no {CUDA} "
            f"(available: {', '.join(available)}). Install onnxruntime-gpu (the `gpu` extra) on a "
            f"CUDA machine, or set {param}: auto or cpu.")
    log.warning("%s: DWPose runs on the CPU because this onnxruntime (%s) has no %s (available: %s); "
                "install onnxruntime-gpu (the `gpu` extra) on a CUDA machine, or set %s: cpu to "
                "choose the CPU explicitly", param, ort.__version__, CUDA, ", ".join(available), param)
    return [CPU]


def open_session(path: Path, providers: list[str], device: str, threads: int | None = None,
                 param: str = "device"):
    """One InferenceSession on `providers` (from select_providers(device))."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3  # onnxruntime's own chatter; errors still raise
    if threads:
        so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=providers)
    if providers[0] == CUDA and session.get_providers()[0] != CUDA:
        # The CUDA provider is installed but failed to load (CUDA or cuDNN
        # libraries missing): onnxruntime then runs on the CPU without raising.
        msg = (f"{param}: onnxruntime could not start {CUDA} for {path.name} (CUDA/cuDNN libraries "
               f"missing or mismatched?); the session runs on {session.get_providers()[0]}")
        if device == "cuda":
            raise DeviceUnavailable(msg)
        log.warning("%s", msg)
    return session


def fixed_input_hw(session, path: Path) -> tuple[int, int]:
    """(H, W) of a 1 x 3 x H x W input; the pre-processing is built for that size."""
    shape = session.get_inputs()[0].shape
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[2:]) or shape[1] != 3:
        raise ValueError(f"{path}: expected a fixed input shape 1x3xHxW, got {shape}")
    return int(shape[2]), int(shape[3])


@dataclass(frozen=True)
class PoseResult:
    boxes: np.ndarray  # (n, 4) xyxy image pixels of every person found, best score first
    scores: np.ndarray  # (n,)
    main: int  # index of the main (largest) person in boxes, -1 when none
    keypoints: np.ndarray  # (133, 2) image pixels of the main person; zeros when none
    conf: np.ndarray  # (133,)


class DWPose:
    """Both sessions, loaded once and used for every image."""

    def __init__(self, detector: Path, pose: Path, device: str = "auto", threads: int | None = None,
                 det_score: float = 0.3, nms_iou: float = 0.45, bbox_padding: float = 1.25,
                 param: str = "device"):
        providers = select_providers(device, param)  # once: one warning, not one per model
        self.det = open_session(detector, providers, device, threads, param)
        self.det_hw = fixed_input_hw(self.det, detector)
        self.pose = open_session(pose, providers, device, threads, param)
        h, w = fixed_input_hw(self.pose, pose)
        self.pose_wh = (w, h)
        outs = [o.name for o in self.pose.get_outputs()]
        # The public export names its outputs; an export that does not still
        # has x before y, as mmpose's head returns them.
        self.pose_outputs = ["simcc_x", "simcc_y"] if {"simcc_x", "simcc_y"} <= set(outs) else outs[:2]
        k = self.pose.get_outputs()[outs.index(self.pose_outputs[0])].shape[1]
        if isinstance(k, int) and k != KEYPOINTS:
            raise ValueError(f"{pose}: {k} keypoints; expected {KEYPOINTS} (COCO-WholeBody, as DW-LL)")
        self.det_score, self.nms_iou, self.bbox_padding = det_score, nms_iou, bbox_padding

    def detect(self, img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
        """People: (n, 4) boxes in image pixels, (n,) scores."""
        # RGB, as DWPose's own annotator feeds YOLOX (its training used BGR;
        # we keep to the reference pipeline the poses are compared with).
        x, factors = dec.letterbox(img, self.det_hw)
        raw = self.det.run(None, {self.det.get_inputs()[0].name: x})[0]
        return dec.person_boxes(raw, self.det_hw, factors, self.det_score, self.nms_iou)

    def estimate(self, img: Image.Image, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(133, 2) keypoints in image pixels and (133,) confidences of the person in `box`."""
        centre, size = dec.box_to_crop(box, self.pose_wh, self.bbox_padding)
        m = dec.crop_affine(centre, size, self.pose_wh)
        x = dec.normalise(dec.warp(img, m, self.pose_wh))
        sx, sy = self.pose.run(self.pose_outputs, {self.pose.get_inputs()[0].name: x})
        xy, conf = dec.simcc_decode(sx[0], sy[0], self.pose_wh)
        return dec.apply_affine(dec.invert_affine(m), xy), conf

    def __call__(self, img: Image.Image) -> PoseResult:
        boxes, scores = self.detect(img)
        main = dec.largest(boxes)
        if main < 0:
            return PoseResult(boxes, scores, -1, np.zeros((KEYPOINTS, 2)), np.zeros(KEYPOINTS))
        xy, conf = self.estimate(img, boxes[main])
        if xy.shape != (KEYPOINTS, 2):
            raise ValueError(f"pose model gave {xy.shape[0]} keypoints; expected {KEYPOINTS}")
        return PoseResult(boxes, scores, main, xy, conf)

"""Tiny random-weight stand-ins for DWPose's two ONNX models, with the public
models' input and output names and shapes, so the real loading and decoding
code runs on them. Their outputs mean nothing.

    python -m models.encoders.tiny_dwpose models/tiny/dwpose

- detector `yolox.onnx`: "images" 1x3x640x640 (0..255) → "output" 1x8400x85,
  the raw YOLOX head (box offsets and log sizes, then sigmoid objectness and
  80 class scores). Its objectness is biased low: on small (~256 px) sample
  figures it stays under DWPose's score threshold (0.3), the "no person" path,
  and 0.02 finds a few boxes per image; on ~1 MP figures (sharper particle
  noise after the letterbox) it passes 0.3 in about 4 images of 10 (measured,
  40 figures), so the tiny profile shows both paths.
- pose `dw-ll.onnx`: "input" 1x3x256x192 → "simcc_x" 1x133x384 and
  "simcc_y" 1x133x512 (the smaller DW variant's shapes; split ratio 2).
"""
from __future__ import annotations

import argparse
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from models.hub import mark_tiny

DETECTOR_FILE = "yolox.onnx"
POSE_FILE = "dw-ll.onnx"  # the name profiles/tiny.yaml points at
CLASSES = 80
KEYPOINTS = 133


class TinyYOLOX(nn.Module):
    """Three feature levels at strides 8/16/32, one 1x1 head each."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 8, stride=8)  # 640 → 80
        self.down1 = nn.Conv2d(width, width, 2, stride=2)  # 80 → 40
        self.down2 = nn.Conv2d(width, width, 2, stride=2)  # 40 → 20
        self.heads = nn.ModuleList(nn.Conv2d(width, 5 + CLASSES, 1) for _ in range(3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        f1 = torch.relu(self.stem(images / 255.0))
        f2 = torch.relu(self.down1(f1))
        f3 = torch.relu(self.down2(f2))
        outs = []
        for f, head in zip((f1, f2, f3), self.heads):
            o = head(f).flatten(2).transpose(1, 2)  # (1, h*w, 85), row-major cells
            outs.append(torch.cat([o[..., :4], torch.sigmoid(o[..., 4:])], -1))
        return torch.cat(outs, 1)  # (1, 8400, 85)


class TinySimCC(nn.Module):
    """A strided conv, pooled to 4x3, one feature vector per keypoint, two SimCC heads."""

    def __init__(self, input_hw: tuple[int, int] = (256, 192), split: float = 2.0, width: int = 8):
        super().__init__()
        h, w = input_hw
        self.stem = nn.Conv2d(3, width, 16, stride=16)  # 256x192 → 16x12
        self.pool = nn.AvgPool2d((h // 16 // 4, w // 16 // 3))  # → 4x3
        self.per_kpt = nn.Linear(width * 12, KEYPOINTS * 8)
        self.x = nn.Linear(8, int(w * split))
        self.y = nn.Linear(8, int(h * split))

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.pool(torch.relu(self.stem(input))).flatten(1)  # (1, 96)
        t = self.per_kpt(f).reshape(-1, KEYPOINTS, 8)  # (1, 133, 8)
        return self.x(t), self.y(t)


def _export(model: nn.Module, example: torch.Tensor, path: Path, inputs: list[str], outputs: list[str]) -> None:
    # Written beside the target, then renamed: a half-written .onnx must never be loaded.
    tmp = path.with_name(f".{path.name}.tmp")
    model.eval()
    # The TorchScript exporter (dynamo=False) is deliberate: the dynamo one needs
    # onnxscript, which this environment does not have. Its deprecation notice is noise.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (example,), str(tmp), input_names=inputs, output_names=outputs,
                          opset_version=17, dynamo=False)
    os.replace(tmp, path)


def build_tiny_dwpose(folder: Path) -> tuple[Path, Path]:
    """Write the tiny detector and pose model into `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG
        torch.manual_seed(0)
        det = TinyYOLOX()
        with torch.no_grad():
            # Objectness that varies with the image (x20) but is mostly below
            # DWPose's 0.3 (scores up to ~0.1 on small sample figures), so a
            # threshold of 0.02 is what finds a few "people" there.
            for head in det.heads:
                head.weight[4] *= 20.0
                head.bias[4] = -6.0
        pose = TinySimCC()
    det_path, pose_path = folder / DETECTOR_FILE, folder / POSE_FILE
    _export(det, torch.zeros(1, 3, 640, 640), det_path, ["images"], ["output"])
    _export(pose, torch.zeros(1, 3, 256, 192), pose_path, ["input"], ["simcc_x", "simcc_y"])
    mark_tiny(folder, "DWPose (YOLOX detector + SimCC whole-body pose)")
    return det_path, pose_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    det, pose = build_tiny_dwpose(ap.parse_args(argv).folder)
    print(f"tiny DWPose: {det} and {pose}")


if __name__ == "__main__":
    main()

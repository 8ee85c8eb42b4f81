"""DINOv3 ViT: a bucketed image → its CLS vector and its patch grid.

The image goes in at its own resolution (bucket sides are multiples of 16, so
no resize), normalised here with numpy/torch: transformers 5 ships the DINOv3
image processor for torchvision only, and torchvision breaks on CPU machines.
`build_tiny_dinov3` writes a tiny random-weight model for tests and the
CPU-only profile.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.hub import mark_tiny

log = logging.getLogger("niche.models.dinov3")

DEFAULT_MODEL = "facebook/dinov3-vitl16-pretrain-lvd1689m"
ALLOW_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json"]
# The statistics DINOv3 was trained with (its preprocessor_config.json).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: np.ndarray, device: str = "cpu"):
    """(N, H, W, 3) uint8 RGB → (N, 3, H, W) float32 tensor on `device`: /255, then ImageNet mean/std.

    The bytes travel as uint8 and become floats on the device: a quarter of the
    transfer, and the GPU, not one CPU core, does the arithmetic.
    """
    import torch

    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) uint8 RGB, got {images.shape} {images.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).contiguous().float()
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return x.mul_(1.0 / (255.0 * std)).sub_(mean / std)  # == (x / 255 - mean) / std


def split_tokens(hidden, num_registers: int, grid_h: int, grid_w: int):
    """last_hidden_state (B, 1 + R + h·w, D) → CLS (B, D), patches (B, h, w, D).

    DINOv3ViTEmbeddings concatenates [CLS, registers, patches], the patches in
    row-major order of the conv output; the registers are scratch tokens with no
    place in the image, so they are dropped.
    """
    b, n, d = hidden.shape
    if n != 1 + num_registers + grid_h * grid_w:
        raise ValueError(f"expected 1 + {num_registers} + {grid_h}×{grid_w} tokens, got {n}")
    return hidden[:, 0], hidden[:, 1 + num_registers:].reshape(b, grid_h, grid_w, d)


class DINOv3Encoder:
    """DINOv3ViTModel on one device, in bf16 or fp32."""

    def __init__(self, path: Path, dtype, device: str):
        from transformers import DINOv3ViTModel

        self.model = DINOv3ViTModel.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
        cfg = self.model.config
        self.patch_size = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        self.num_registers = getattr(cfg, "num_register_tokens", 0)
        self.dim = cfg.hidden_size
        self.device = device
        log.info("DINOv3 %s: hidden %d, patch %d, %d registers, %s on %s",
                 path, self.dim, self.patch_size, self.num_registers, dtype, device)

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, H, W, 3) uint8, one size → CLS (N, D) and patches (N, H/p, W/p, D), float32."""
        import torch

        n, h, w, _ = images.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"image {w}x{h} is not a multiple of the model's patch size {p}")
        pixels = normalize(images, self.device)
        with torch.inference_mode():
            hidden = self.model(pixel_values=pixels).last_hidden_state
        cls, patches = split_tokens(hidden.float(), self.num_registers, h // p, w // p)
        return cls.cpu().numpy(), patches.cpu().numpy()


def build_tiny_dinov3(folder: Path) -> Path:
    """Write a tiny random-weight DINOv3 ViT/16 with 4 register tokens to `folder`."""
    import torch
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    folder = Path(folder)
    config = DINOv3ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, patch_size=16, num_register_tokens=4)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DINOv3ViTModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    mark_tiny(folder, "DINOv3")
    return folder

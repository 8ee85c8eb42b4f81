"""Tiny NanoDiT models and random conditioning for the tests (test_nanodit, test_flow_matching,
and the tests that need a checkpoint whose output depends on its inputs).

A fresh model is adaLN-zero with a zero output layer, so its output ignores its inputs:
`perturbed` / `nudged` add seeded noise to every parameter.
"""
from __future__ import annotations

import pytest
import torch

from models.nanodit import Conditioning, NanoDiT

TEXT_DIM, DINO_DIM, JOINTS = 8, 16, 133
SIZE = (32, 48)


def tiny(**overrides) -> NanoDiT:
    torch.manual_seed(0)
    kw = dict(text_dim=TEXT_DIM, dino_dim=DINO_DIM, repa_hidden=32)
    return NanoDiT.preset("tiny", **{**kw, **overrides}).eval()


def perturbed(model: NanoDiT, std: float = 0.1, seed: int = 1) -> NanoDiT:
    """Add seeded noise to every parameter, so zero-initialised gates and outputs come alive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def make_cond(B: int = 2, dino_hw: tuple[int, int] = (2, 3), L: int = 5, pad: int = 2, seed: int = 0,
              keep: torch.Tensor | None = None) -> Conditioning:
    """Random conditioning; the last `pad` T5 tokens are padding; every joint confident (0.5..1)."""
    g = torch.Generator().manual_seed(seed)
    t5_mask = torch.ones(B, L, dtype=torch.bool)
    if pad:
        t5_mask[:, -pad:] = False
    pose = torch.cat([torch.rand(B, JOINTS, 2, generator=g), 0.5 + 0.5 * torch.rand(B, JOINTS, 1, generator=g)],
                     dim=-1)
    return Conditioning(
        t5=torch.randn(B, L, TEXT_DIM, generator=g),
        t5_mask=t5_mask,
        dino_cls=torch.randn(B, DINO_DIM, generator=g),
        dino_patches=torch.randn(B, *dino_hw, DINO_DIM, generator=g),
        pose=pose,
        keep=torch.ones(B, 4, dtype=torch.bool) if keep is None else keep,
    )


def make_x(B: int = 2, size: tuple[int, int] = (32, 48), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, *size, generator=g) * 2 - 1, torch.rand(B, generator=g) * 0.8 + 0.1


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


SAME, DIFFERENT = 1e-6, 1e-4   # "unchanged" and "clearly changed" thresholds on max |Δ|


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors this small run fastest on one thread, and a busy CI box does not stall them."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(one_thread) -> NanoDiT:
    return perturbed(tiny())


def nudged(seed: int, **config) -> NanoDiT:
    """The tiny preset built from seed 0 with every weight nudged by noise of `seed` (std 0.1)."""
    torch.manual_seed(0)
    return perturbed(NanoDiT.preset("tiny", **config), std=0.1, seed=seed)

"""Build the tiny random-weight models of the `tiny` profile.

    python -m tasks.profile tiny     # builds them (models/tiny/), then points params.yaml at them

Each is the real architecture at toy size, saved in the real format and loaded
back through the very code that loads the real model. Deterministic (seeded), a
few MB in all, a few seconds on a CPU; a folder already built is kept. Every
folder carries NICHE_TINY_RANDOM_WEIGHTS.txt so nobody mistakes one for a model.
"""
from __future__ import annotations

import logging
from pathlib import Path

from models.hub import TINY_MARKER

log = logging.getLogger("niche.models")


def _builders():
    # Imported here: each pulls in transformers/torch/onnx.
    from models.encoders.dinov3 import build_tiny_dinov3
    from models.encoders.gemma import build_tiny_gemma3
    from models.encoders.instruct import build_tiny_qwen2
    from models.sdxl.pipeline import build_tiny_sdxl
    from models.encoders.t5 import build_tiny_t5
    from models.encoders.tiny_dwpose import build_tiny_dwpose

    return {"gemma3": build_tiny_gemma3, "t5": build_tiny_t5,
            "dinov3": build_tiny_dinov3, "dwpose": build_tiny_dwpose, "sdxl": build_tiny_sdxl,
            "qwen2": build_tiny_qwen2}


def build_all(root: Path, t5_corpus: list[str]) -> Path:
    """Every tiny model under `root`; the T5 tokenizer is trained on `t5_corpus` (the caller's
    captions: tasks.sample.corpus for the demo's)."""
    for name, build in _builders().items():
        folder = root / name
        if (folder / TINY_MARKER).is_file():
            continue
        log.info("building tiny %s in %s", name, folder)
        build(folder, t5_corpus) if name == "t5" else build(folder)
    return root


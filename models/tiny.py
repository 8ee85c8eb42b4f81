"""Build the tiny random-weight models of the `tiny` profile.

    python -m models.tiny [models/tiny]

Each is the real architecture at toy size, saved in the real format and loaded
back through the very code that loads the real model. Deterministic (seeded), a
few MB in all, a few seconds on a CPU; a folder already built is kept. Every
folder carries NICHE_TINY_RANDOM_WEIGHTS.txt so nobody mistakes one for a model.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from models.hub import TINY_MARKER

log = logging.getLogger("niche.models")


def _builders():
    # Imported here: each pulls in transformers/torch/onnx.
    from models.dinov3 import build_tiny_dinov3
    from models.gemma import build_tiny_gemma3
    from models.sdxl import build_tiny_sdxl
    from models.t5 import build_tiny_t5
    from models.tiny_dwpose import build_tiny_dwpose

    return {"gemma3": build_tiny_gemma3, "t5": build_tiny_t5,
            "dinov3": build_tiny_dinov3, "dwpose": build_tiny_dwpose, "sdxl": build_tiny_sdxl}


def build_all(root: Path = Path("models/tiny")) -> Path:
    for name, build in _builders().items():
        folder = root / name
        if (folder / TINY_MARKER).is_file():
            continue
        log.info("building tiny %s in %s", name, folder)
        build(folder)
    return root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", nargs="?", type=Path, default=Path("models/tiny"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(f"tiny models in {build_all(args.root)}/")


if __name__ == "__main__":
    main()

"""Thumbnails: what the curation page's grid shows. The candidates stage writes one beside each
render (`<key>.thumb.jpg`, in its store), so a page of a thousand candidates opens without
decoding a thousand full-size PNGs; anything else (the dataset's own images) is scaled by
the server on demand and kept in its memory only.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

from tasks.core.store import Store

THUMB_WIDTH = 256  # the grid's cards are 170 px: sharp on a 1.5x display
THUMB_EXT = ".thumb.jpg"


def thumbnail(src: Path | bytes, width: int = THUMB_WIDTH) -> bytes:
    """A JPEG no wider or taller than `width`, of an image file or its bytes."""
    from PIL import Image

    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
        im.draft("RGB", (width, width))  # JPEG sources: decode at a fraction of the size
        im = im.convert("RGB")
        im.thumbnail((width, width))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def thumb_of(png: Path) -> Path:
    """The stage's thumbnail of a rendered PNG (`ab/<key>.png` -> `ab/<key>.thumb.jpg`)."""
    return png.with_name(png.stem + THUMB_EXT)


def ensure_thumbs(store_dir: Path, keys: Iterable[str], ext: str = ".png") -> int:
    """Write the missing thumbnails of `keys` (renders in `store_dir`); returns how many. A
    thumbnail is a function of its render's bytes, so one written is never rewritten."""
    renders, thumbs = Store(store_dir, ext, layout="loose"), Store(store_dir, THUMB_EXT, layout="loose")
    n = 0
    for key in keys:
        if not thumbs.has(key) and renders.has(key):
            thumbs.write_bytes(key, thumbnail(renders.path(key)))
            n += 1
    return n

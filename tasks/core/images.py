"""Decode any accepted image file into upright 8-bit RGB, or say why not.

Ingest and bucket both go through `decode`, so what ingest accepted is exactly
what bucket can read. Odd-but-valid images are converted, never rejected:
alpha and palette transparency are composited on white (the figures in these
datasets sit on white, and black would invent a frame), 16-bit is scaled down
rather than clipped, CMYK is converted, and EXIF orientation is applied.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


# ingest.max_pixels' default: a larger image is a likely decompression bomb.
DEFAULT_MAX_PIXELS = 100_000_000


class ImageRejected(Exception):
    """A file that cannot be used; `code` is a stable reason for the quarantine table."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class Decoded:
    image: Image.Image  # mode "RGB", upright
    format: str
    mode: str  # the file's own mode, before conversion
    orientation: int  # EXIF orientation tag, 1 when absent


def decode(data: bytes, max_pixels: int) -> Decoded:
    if not data:
        raise ImageRejected("empty", "zero-byte file")
    # PIL's own bomb guard (a warning at its limit, an error at twice it) is
    # replaced by ours: one configured limit, checked from the header before
    # any pixel is decoded, with a message that names the parameter.
    Image.MAX_IMAGE_PIXELS = None
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageRejected("not_image", "not a recognised image format") from None
    except Exception as e:  # noqa: BLE001 — any parser failure means unusable bytes
        raise ImageRejected("corrupt", f"cannot parse header: {e}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise ImageRejected("too_many_pixels",
                            f"{w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} "
                            "(ingest.max_pixels; a likely decompression bomb)")
    fmt, mode = im.format or "unknown", im.mode
    try:
        im.load()
    except Exception as e:  # noqa: BLE001
        raise ImageRejected("corrupt", f"cannot decode pixels ({type(e).__name__}: {e})") from None
    orientation = int(im.getexif().get(0x0112, 1) or 1)
    try:
        upright = ImageOps.exif_transpose(im)
        rgb = to_rgb(upright)
    except Exception as e:  # noqa: BLE001
        raise ImageRejected("unsupported_mode", f"cannot convert mode {mode} to RGB: {e}") from None
    return Decoded(rgb, fmt, mode, orientation)


def to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        return to_rgb(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit greyscale: PIL's I -> L conversion clips at 255, which turns a
        # 16-bit image almost white; scale the range instead.
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max(initial=0) > 255 else a
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if a.max(initial=0) <= 1.0 else a
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([g, g, g], axis=-1), "RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV, RGBX: PIL's own conversions are right here.
    return im.convert("RGB")


@dataclass(frozen=True)
class BucketedImage:
    """A bucketed PNG as it travels to a model worker: its bytes (read by the driver, so the
    worker needs no shared filesystem), its path for messages, and the size the bucket promised."""

    path: str
    data: bytes
    width: int
    height: int


def read_bucketed(store, key: str, width: int, height: int) -> BucketedImage:
    """On the driver: the item's bytes from the bucket stage's Store, or an ItemError naming it."""
    from tasks.core.stage import ItemError
    from tasks.core.store import StoreError

    path = f"{store.root}/{store.relpath(key)}"
    try:
        return BucketedImage(path, store.read_bytes(key), width, height)
    except FileNotFoundError:
        raise ItemError(f"bucketed image {path} is missing; run the bucket stage again") from None
    except (OSError, StoreError) as e:
        raise ItemError(f"bucketed image {path} is unreadable ({e}); run the bucket stage again") from None


def decode_bucketed(img: BucketedImage) -> np.ndarray:
    """In the worker: (H, W, 3) uint8, refusing anything but what the bucket stage wrote."""
    from tasks.core.stage import ItemError

    try:
        with Image.open(io.BytesIO(img.data)) as im:
            im.load()
            mode, size, arr = im.mode, im.size, np.asarray(im)
    except (OSError, ValueError) as e:
        raise ItemError(f"bucketed image {img.path} is unreadable ({why(e)}); run the bucket stage again") from None
    if mode != "RGB" or size != (img.width, img.height):
        raise ItemError(f"bucketed image {img.path} is {mode} {size[0]}x{size[1]}, "
                        f"expected RGB {img.width}x{img.height}")
    return arr


def why(e: Exception) -> str:
    # PIL names the buffer it could not identify (`<_io.BytesIO object at 0x...>`): an address
    # differs from process to process, and the reason must read the same wherever it was made.
    if isinstance(e, UnidentifiedImageError):
        return "not an image format PIL can identify"
    return str(e)

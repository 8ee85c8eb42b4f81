"""Real photographs that ship inside scikit-image, plus the odd files users have.

`write_photos` saves the bundled photos in the formats and modes that trip
pipelines up (RGBA, palette with transparency, 16-bit grey, CMYK, an EXIF
rotation, a large image). `write_problems` writes files that must be refused —
each with the reason ingest is expected to give, so tests can check them all.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# file name -> caption (None: no sidecar). Descriptions are of the real photos.
PHOTOS = {
    "astronaut.png": "a woman astronaut in a white suit holding a helmet, an American flag behind her",
    "chelsea.jpg": "a tabby cat with green eyes looking to the side",
    "coffee.jpg": "a cup of coffee on a saucer with a spoon, on a red table",
    "hubble_deep_field_exif.jpg": "distant galaxies scattered on a black sky",
    "retina.png": "a colour photograph of the back of a human eye, blood vessels branching",
    "immunohistochemistry.png": None,
    "camera.png": "a black and white photo of a man with a camera on a tripod",
    "camera_16bit.png": None,
    "astronaut_cmyk.jpg": None,
    "astronaut_palette.png": None,
    "logo.png": "the scikit-image logo, a snake on a transparent background",
    "moon.png": None,
}

# file name -> the quarantine reason ingest must give it
PROBLEMS = {
    "empty.png": "empty",
    "truncated.jpg": "corrupt",
    "truncated.png": "corrupt",
    "not_an_image.jpg": "not_image",
    "bomb.png": "too_many_pixels",
    "tiny.png": "too_small",
    "escape.png": "symlink_outside",
    "lonely.txt": "orphan_caption",
    "bad_caption.txt": "caption_not_utf8",
}


def _save(img: Image.Image, path: Path, **kw) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format=kw.pop("format", None) or _fmt(path), **kw)
    os.replace(tmp, path)


def _fmt(path: Path) -> str:
    return {".png": "PNG", ".jpg": "JPEG"}[path.suffix]


def write_photos(out: Path) -> list[Path]:
    import skimage.data as sk  # imported here: only the generator needs it

    out.mkdir(parents=True, exist_ok=True)
    astro = Image.fromarray(sk.astronaut())
    camera = sk.camera()
    logo = Image.fromarray(sk.logo(), "RGBA")
    # The logo is 500 px; pad it with transparency so it passes min_side and
    # shows the alpha-on-white conversion rather than a size rejection.
    padded = Image.new("RGBA", (640, 640), (0, 0, 0, 0))
    padded.paste(logo, (70, 70))
    hubble = Image.fromarray(sk.hubble_deep_field())
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display": pixels stored on their side
    palette = astro.quantize(64)
    palette.info["transparency"] = 0

    items = {
        "astronaut.png": (astro, {}),
        "chelsea.jpg": (Image.fromarray(sk.chelsea()), {"quality": 95}),
        "coffee.jpg": (Image.fromarray(sk.coffee()), {"quality": 95}),
        "hubble_deep_field_exif.jpg": (hubble.transpose(Image.Transpose.ROTATE_90),
                                       {"quality": 95, "exif": exif.tobytes()}),
        "retina.png": (Image.fromarray(sk.retina()), {}),
        "immunohistochemistry.png": (Image.fromarray(sk.immunohistochemistry()), {}),
        "camera.png": (Image.fromarray(camera, "L"), {}),
        "camera_16bit.png": (Image.fromarray(camera.astype(np.uint16) * 257), {}),
        "astronaut_cmyk.jpg": (astro.convert("CMYK"), {"quality": 95}),
        "astronaut_palette.png": (palette, {"transparency": 0}),
        "logo.png": (padded, {}),
        "moon.png": (Image.fromarray(sk.moon(), "L"), {}),
    }
    paths = []
    for name, (img, kw) in items.items():
        p = out / name
        if not p.exists():
            _save(img, p, **kw)
        caption = PHOTOS[name]
        if caption is not None and not p.with_suffix(".txt").exists():
            p.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        paths.append(p)
    return paths


def _bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height pixels, all black, in a few hundred KB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" * (1 + (width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_problems(out: Path, good_image: Path) -> dict[str, str]:
    """Write the files of PROBLEMS into `out` (plus a duplicate of `good_image`
    and a good image whose caption is not UTF-8). Returns path -> expected reason."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.new("RGB", (800, 800), (200, 30, 30)).save(buf, "JPEG", quality=90)
    jpg = buf.getvalue()
    buf = io.BytesIO()
    Image.effect_noise((800, 800), 60).convert("RGB").save(buf, "PNG")
    png = buf.getvalue()
    files = {
        "empty.png": b"",
        "truncated.jpg": jpg[: len(jpg) // 2],
        "truncated.png": png[: len(png) // 2],
        "not_an_image.jpg": b"This is a shopping list, not a picture.\n" * 20,
        "bomb.png": _bomb_png(20_000, 20_000),
        "lonely.txt": b"a caption whose image was deleted\n",
        "bad_caption.txt": "une figure assise, caf\xe9".encode("latin-1"),
    }
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), "white").save(buf, "PNG")
    files["tiny.png"] = buf.getvalue()
    for name, data in files.items():
        (out / name).write_bytes(data)
    # The image beside bad_caption.txt is fine and must be kept, without a caption.
    Image.new("RGB", (768, 640), (240, 240, 240)).save(out / "bad_caption.png", "PNG")
    escape = out / "escape.png"
    if not escape.is_symlink():
        # Points at a real file outside every source folder: this module.
        escape.symlink_to(Path(__file__).resolve())
    dup = out / f"copy_of_{good_image.name}"
    dup.write_bytes(good_image.read_bytes())
    expected = {(out / n).as_posix(): r for n, r in PROBLEMS.items()}
    expected[dup.as_posix()] = "duplicate"
    return expected

import io

import numpy as np
import pytest
from PIL import Image

from tasks.core.images import ImageRejected, decode
from tasks.sample.photos import _bomb_png

LIMIT = 100_000_000


def _bytes(img, fmt="PNG", **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_alpha_is_composited_on_white():
    a = np.zeros((600, 600, 4), np.uint8)
    a[:, :300] = (255, 0, 0, 255)  # opaque red left half, transparent right half
    d = decode(_bytes(Image.fromarray(a, "RGBA")), LIMIT)
    px = np.asarray(d.image)
    assert d.mode == "RGBA" and d.image.mode == "RGB"
    assert tuple(px[10, 10]) == (255, 0, 0) and tuple(px[10, 500]) == (255, 255, 255)


def test_palette_transparency_becomes_white():
    img = Image.new("P", (600, 600), 1)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    img.paste(0, (0, 0, 300, 600))
    d = decode(_bytes(img, transparency=0), LIMIT)
    px = np.asarray(d.image)
    assert tuple(px[5, 5]) == (255, 255, 255) and tuple(px[5, 500]) == (0, 0, 255)


def test_16bit_grey_is_scaled_not_clipped():
    a = np.tile(np.linspace(0, 65535, 600).astype(np.uint16), (600, 1))
    d = decode(_bytes(Image.fromarray(a)), LIMIT)
    px = np.asarray(d.image)[..., 0]
    assert px[0, 0] == 0 and px[0, -1] == 255
    assert 120 <= px[0, 300] <= 135  # mid-grey, where clipping would give 255


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("RGB", (600, 600), (200, 40, 40)).convert("CMYK")
    d = decode(_bytes(img, "JPEG", quality=95), LIMIT)
    r, g, b = np.asarray(d.image).reshape(-1, 3).mean(0)
    assert d.mode == "CMYK" and r > 150 and g < 90 and b < 90


def test_exif_orientation_is_applied():
    upright = np.full((600, 900, 3), 255, np.uint8)
    upright[:50, :50] = 0  # a black mark at the top-left of the upright image
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # on its side
    exif = Image.Exif()
    exif[0x0112] = 6
    d = decode(_bytes(stored, "JPEG", quality=95, exif=exif.tobytes()), LIMIT)
    assert d.orientation == 6 and d.image.size == (900, 600)
    px = np.asarray(d.image)
    assert px[:40, :40].mean() < 40 and px[-40:, -40:].mean() > 215


@pytest.mark.parametrize("data, code", [
    (b"", "empty"),
    (b"GIF89a is what I claim but I am text" * 10, "not_image"),
    (b"just some text\n" * 50, "not_image"),
])
def test_unusable_bytes_are_rejected_with_a_code(data, code):
    with pytest.raises(ImageRejected) as e:
        decode(data, LIMIT)
    assert e.value.code == code


def test_truncated_files_are_corrupt():
    for fmt in ("JPEG", "PNG"):
        data = _bytes(Image.effect_noise((700, 700), 50).convert("RGB"), fmt)
        with pytest.raises(ImageRejected) as e:
            decode(data[: len(data) // 2], LIMIT)
        assert e.value.code == "corrupt", fmt


def test_bomb_is_refused_from_the_header_with_the_parameter_named():
    with pytest.raises(ImageRejected, match="ingest.max_pixels") as e:
        decode(_bomb_png(12_000, 12_000), LIMIT)
    assert e.value.code == "too_many_pixels"

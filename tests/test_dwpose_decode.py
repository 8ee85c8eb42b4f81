"""DWPose's pre/post-processing (models/encoders/dwpose_decode.py), checked against known
geometry and against the sample generator's true keypoints."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.encoders import dwpose_decode as dec
from tasks.core import manifest
from tasks.bucket import BucketParams, bucket
from tasks.ingest import IngestParams, ingest
from tasks.sample.__main__ import make_sample

SMALL_BUCKETS = ((256, 256), (320, 192), (192, 320))


# ---------------------------------------------------------------- letterbox ---

@pytest.mark.parametrize("input_hw", [(640, 640), (416, 640)])
def test_letterbox_keeps_aspect_pads_with_114_and_maps_back(input_hw):
    img = np.full((192, 320, 3), 255, np.uint8)
    img[50:90, 200:260] = (255, 0, 0)  # a red block at x 200..260, y 50..90
    x, (sx, sy) = dec.letterbox(Image.fromarray(img), input_hw)
    h, w = input_hw
    assert x.shape == (1, 3, h, w) and x.dtype == np.float32
    r = min(h / 192, w / 320)
    nh, nw = int(192 * r), int(320 * r)
    assert (sx, sy) == pytest.approx((nw / 320, nh / 192))
    assert np.all(x[0, :, nh:, :] == 114) and np.all(x[0, :, :, nw:] == 114)  # pad right and bottom
    red = (x[0, 0] > 200) & (x[0, 1] < 60)  # channel 0 is red: RGB order
    ys, xs = np.nonzero(red)
    # Block edges in letterbox pixels, back to image pixels.
    assert xs.min() / sx == pytest.approx(200, abs=1) and (xs.max() + 1) / sx == pytest.approx(260, abs=1)
    assert ys.min() / sy == pytest.approx(50, abs=1) and (ys.max() + 1) / sy == pytest.approx(90, abs=1)


# ------------------------------------------------------------ YOLOX + NMS ---

def _encode(raw, box, score, cls=0, stride=32, shift=(0, 0), input_hw=(640, 640)):
    """Write one anchor of a raw YOLOX output predicting `box` (letterbox xyxy)."""
    h, w = input_hw
    offset = sum((h // s) * (w // s) for s in dec.STRIDES if s < stride)
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    gx, gy = int(cx // stride) + shift[0], int(cy // stride) + shift[1]
    row = raw[0, offset + gy * (w // stride) + gx]
    assert not row.any(), "two boxes encoded on one anchor"
    row[0], row[1] = cx / stride - gx, cy / stride - gy
    row[2], row[3] = math.log((box[2] - box[0]) / stride), math.log((box[3] - box[1]) / stride)
    row[4], row[5 + cls] = math.sqrt(score), math.sqrt(score)  # objectness x class score = score


def test_yolox_grid_matches_the_public_output_length():
    grid, stride = dec.yolox_grid((640, 640))
    assert grid.shape == (8400, 2) and stride.shape == (8400, 1)
    assert tuple(grid[6400]) == (0, 0) and stride[6400, 0] == 16  # 80*80 stride-8 cells first
    assert tuple(grid[81]) == (1, 1)  # row-major: index = y * 80 + x


def test_yolox_decode_nms_gives_two_people_in_image_pixels():
    # A 320x192 bucket letterboxes at ratio 2: image box (x1, y1, x2, y2) * 2.
    big, small = np.array([40.0, 20, 200, 180]), np.array([230.0, 60, 290, 170])
    raw = np.zeros((1, 8400, 85), np.float32)
    _encode(raw, big * 2, 0.90)
    _encode(raw, big * 2 + [6, -4, 6, 2], 0.80, stride=16)  # duplicates of the big one
    _encode(raw, big * 2 + [-4, 4, 0, 6], 0.70, stride=32, shift=(1, 0))
    _encode(raw, small * 2, 0.60, stride=16)
    _encode(raw, np.array([20.0, 400, 120, 500]), 0.95, cls=2)  # a car: not a person
    _encode(raw, np.array([500.0, 20, 600, 200]), 0.25, stride=8)  # a person under the threshold
    _, factors = dec.letterbox(Image.new("RGB", (320, 192)), (640, 640))

    boxes, scores = dec.person_boxes(raw, (640, 640), factors, score_thr=0.3, iou=0.45)
    assert len(boxes) == 2
    np.testing.assert_allclose(boxes[0], big, atol=1.0)
    np.testing.assert_allclose(boxes[1], small, atol=1.0)
    np.testing.assert_allclose(scores, [0.90, 0.60], atol=1e-5)
    assert dec.largest(boxes) == 0

    # The duplicates are there: a looser NMS keeps them; a lower threshold adds the faint one.
    assert len(dec.person_boxes(raw, (640, 640), factors, 0.3, iou=0.99)[0]) == 4
    assert len(dec.person_boxes(raw, (640, 640), factors, 0.2, iou=0.45)[0]) == 3
    assert dec.largest(np.zeros((0, 4))) == -1


def test_largest_is_by_area_not_score():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 50, 40], [0, 0, 30, 30]], np.float32)
    assert dec.largest(boxes) == 1


def test_yolox_decode_refuses_an_output_of_the_wrong_size():
    with pytest.raises(ValueError, match="8400"):
        dec.yolox_decode(np.zeros((1, 2100, 85), np.float32), (640, 640))


# ------------------------------------------------------------- affine crop ---

def test_crop_window_has_the_model_aspect_and_holds_the_padded_box():
    centre, size = dec.box_to_crop(np.array([100, 20, 160, 100]), (192, 256), padding=1.25)
    assert tuple(centre) == (130, 60)
    assert size[0] / size[1] == pytest.approx(192 / 256)
    assert size[1] == pytest.approx(80 * 1.25) and size[0] >= 60 * 1.25  # tall box: height decides
    m = dec.crop_affine(centre, size, (192, 256))
    corners = np.array([centre - size / 2, centre + size / 2])
    np.testing.assert_allclose(dec.apply_affine(m, corners), [[0, 0], [192, 256]], atol=1e-9)
    pts = np.array([[3.0, 4.0], [150.5, 70.25]])
    np.testing.assert_allclose(dec.apply_affine(dec.invert_affine(m), dec.apply_affine(m, pts)), pts)


@pytest.mark.parametrize("box, out_wh", [((100, 20, 160, 100), (192, 256)),   # enlarged ~2.5x
                                         ((0, 0, 200, 150), (96, 128))])       # shrunk ~2.6x
def test_affine_crop_puts_a_spot_where_the_map_says(box, out_wh):
    # A smooth spot centred on pixel (120, 40), i.e. at (120.5, 40.5) in continuous
    # coordinates; smooth so that point sampling, even when shrinking, keeps its centre.
    yy, xx = np.mgrid[0:150, 0:200] + 0.5
    spot = np.exp(-((xx - 120.5) ** 2 + (yy - 40.5) ** 2) / (2 * 4.0 ** 2)).astype(np.float32)
    centre, size = dec.box_to_crop(np.array(box, float), out_wh, 1.25)
    m = dec.crop_affine(centre, size, out_wh)
    crop = np.asarray(Image.fromarray(spot, "F").transform(
        out_wh, Image.Transform.AFFINE, tuple(dec.invert_affine(m).ravel()), resample=Image.Resampling.BILINEAR))
    cy, cx = np.mgrid[0:out_wh[1], 0:out_wh[0]] + 0.5
    centroid = np.array([(cx * crop).sum(), (cy * crop).sum()]) / crop.sum()
    np.testing.assert_allclose(centroid, dec.apply_affine(m, [[120.5, 40.5]])[0], atol=0.1)

    # The RGB warp the model gets: white inside the image, black (OpenCV's border) outside.
    rgb = np.asarray(dec.warp(Image.new("RGB", (200, 150), (255, 255, 255)), m, out_wh))
    assert rgb.shape == (out_wh[1], out_wh[0], 3)
    inside = np.all(centre - size / 2 >= 0) and np.all(centre + size / 2 <= [200, 150])
    assert rgb[0, 0].tolist() == ([255] * 3 if inside else [0] * 3)
    assert rgb[out_wh[1] // 2, out_wh[0] // 2].tolist() == [255] * 3


def test_normalise_is_rgb_imagenet():
    x = dec.normalise(Image.new("RGB", (4, 2), (124, 116, 104)))
    assert x.shape == (1, 3, 2, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, :, 0, 0], (np.array([124, 116, 104]) - dec.MEAN) / dec.STD, rtol=1e-6)


def test_normalised_keypoints_span_minus_one_to_one():
    out = dec.normalised_keypoints(np.array([[0.0, 0.0], [320.0, 192.0], [160.0, 96.0]]),
                                   np.array([0.1, 0.5, 0.9]), 320, 192)
    assert out.dtype == np.float16 and out.shape == (3, 3)
    np.testing.assert_allclose(out.astype(np.float32), [[-1, -1, 0.1], [1, 1, 0.5], [0, 0, 0.9]], atol=1e-3)


# ------------------------------------------------ SimCC vs the true poses ---

@pytest.fixture
def figures(chdir):
    make_sample(Path("data/raw"), figures=3, seed=0, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    bucket(BucketParams(buckets=SMALL_BUCKETS), workers=2)
    paths = {r["id"]: r["path"] for r in manifest.read_table(manifest.MANIFEST_DIR / "ingest.parquet",
                                                             manifest.INGEST).to_pylist()}
    out = []
    for r in manifest.read_table(manifest.MANIFEST_DIR / "bucket.parquet", manifest.BUCKET).to_pylist():
        src = Path(paths[r["id"]])
        truth = json.loads(src.with_name(src.stem + ".pose.json").read_text())
        xy = np.array(truth["keypoints"])[:, :2]
        out.append(((xy - [r["left"], r["top"]]) * r["scale"], r))
    return out


def _gaussians(pos: np.ndarray, length: int, peak: float, sigma: float = 2.0) -> np.ndarray:
    bins = np.arange(length)[None, :]
    return peak * np.exp(-((bins - pos[:, None]) ** 2) / (2 * sigma ** 2))


@pytest.mark.parametrize("input_wh", [(192, 256), (288, 384)])
def test_simcc_decoding_recovers_the_true_keypoints(figures, input_wh):
    assert len(figures) == 3
    for xy, row in figures:
        assert xy.shape == (133, 2)
        box = np.concatenate([xy.min(0), xy.max(0)])  # a person box around the true pose
        centre, size = dec.box_to_crop(box, input_wh, 1.25)
        m = dec.crop_affine(centre, size, input_wh)
        in_crop = dec.apply_affine(m, xy)
        assert np.all(in_crop >= 0) and np.all(in_crop <= input_wh)
        # The model's bins: split ratio 2, pixel centres on integers (OpenCV).
        ratio = 2
        simcc_x = _gaussians((in_crop[:, 0] - 0.5) * ratio, input_wh[0] * ratio, peak=0.8)
        simcc_y = _gaussians((in_crop[:, 1] - 0.5) * ratio, input_wh[1] * ratio, peak=0.6)
        crop_xy, conf = dec.simcc_decode(simcc_x[None], simcc_y[None], input_wh)
        back = dec.apply_affine(dec.invert_affine(m), crop_xy)
        err = np.abs(back - xy).max()
        # Within a pixel, and within what the bins allow: argmax lands on the
        # nearest bin, half a bin from the truth, in bucket pixels.
        bound = min(1.0, 0.5 / ratio * size[0] / input_wh[0])
        assert err <= bound + 1e-6, f"{row['bucket']}: keypoints off by up to {err:.2f} px (bound {bound:.2f})"
        assert conf.shape == (133,) and np.all(np.abs(conf - 0.7) < 0.05)  # mean of 0.8 and 0.6

"""DWPose's pre- and post-processing, in numpy + PIL (no OpenCV).

The detector side follows YOLOX as DWPose runs it: letterbox (resize keeping the
aspect, pad with 114 at the right and bottom), raw-output decoding over the
stride 8/16/32 grids, score = objectness x class score, NMS. The pose side
follows RTMPose's top-down recipe: box → centre and size padded by 1.25 and
widened to the model's aspect, an affine crop, ImageNet normalisation, SimCC
argmax decoding, and back through the inverse affine.

Coordinates are continuous pixel coordinates everywhere (PIL's convention:
pixel i covers [i, i+1), its centre is i + 0.5), which is also the convention of
the bucket manifest (bucket_xy = (src_xy - (left, top)) * scale). The pose model
was trained with mmpose/OpenCV, whose pixel centres sit on integers; that half
pixel is added in exactly one place, `simcc_decode`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

# RTMPose / DW-LL input normalisation (ImageNet statistics, 0..255 RGB).
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
PAD_VALUE = 114  # YOLOX's letterbox grey
STRIDES = (8, 16, 32)
PERSON = 0  # COCO class index of "person" in YOLOX's 80 class scores


# ---------------------------------------------------------------- detector ---

def _resample(img: Image.Image, size: tuple[int, int], inverse: np.ndarray, fill=0) -> Image.Image:
    """Bilinear point sampling through `inverse` (2x3, output → input, continuous coords).

    Point sampling, not PIL's antialiased resize, because that is what OpenCV's
    INTER_LINEAR (the models' training-time resize and warp) does.
    """
    return img.transform(size, Image.Transform.AFFINE, tuple(inverse.ravel().tolist()),
                         resample=Image.Resampling.BILINEAR, fillcolor=fill)


def letterbox(img: Image.Image, input_hw: tuple[int, int]) -> tuple[np.ndarray, tuple[float, float]]:
    """(1, 3, H, W) float32 in 0..255 (RGB, not normalised, as YOLOX takes it) and
    the (sx, sy) factors from image pixels to letterbox pixels.

    The two factors differ by a rounding of the resized size; boxes are mapped
    back with both, so nothing drifts by the truncation.
    """
    h, w = input_hw
    r = min(h / img.height, w / img.width)
    nw, nh = max(1, int(img.width * r)), max(1, int(img.height * r))
    sx, sy = nw / img.width, nh / img.height
    resized = _resample(img.convert("RGB"), (nw, nh), np.array([[1 / sx, 0, 0], [0, 1 / sy, 0]]))
    canvas = np.full((h, w, 3), PAD_VALUE, np.uint8)
    canvas[:nh, :nw] = np.asarray(resized)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1)[None], np.float32), (sx, sy)


def yolox_grid(input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 2) cell indices (x, y) and (N, 1) strides, in the head's output order:
    stride 8 first, row-major within a level. 8400 rows for 640 x 640."""
    h, w = input_hw
    grids, strides = [], []
    for s in STRIDES:
        xv, yv = np.meshgrid(np.arange(w // s), np.arange(h // s))
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        strides.append(np.full((grids[-1].shape[0], 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def yolox_decode(raw: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Raw (1, N, 5 + C) output → (N, 4) xyxy boxes in letterbox pixels, (N,) person scores.

    Each row is (dx, dy, log w, log h, objectness, class scores...), the last two
    already through a sigmoid in the exported model; the box centre is
    (cell + d) * stride and its size exp(log size) * stride.
    """
    pred = np.asarray(raw, np.float32).reshape(-1, raw.shape[-1])
    grid, stride = yolox_grid(input_hw)
    if pred.shape[0] != grid.shape[0] or pred.shape[1] < 5 + PERSON + 1:
        raise ValueError(f"detector output {tuple(raw.shape)} does not fit YOLOX on a {input_hw[1]}x{input_hw[0]} "
                         f"input (expected (1, {grid.shape[0]}, 85))")
    centre = (pred[:, :2] + grid) * stride
    with np.errstate(over="ignore"):  # a wild log size is inf here, dropped below
        size = np.exp(pred[:, 2:4]) * stride
    boxes = np.concatenate([centre - size / 2, centre + size / 2], 1)
    scores = pred[:, 4] * pred[:, 5 + PERSON]
    scores[~np.isfinite(boxes).all(1)] = 0.0
    return boxes, scores


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, best score first."""
    order = np.argsort(-scores, kind="stable")
    area = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(i)
        lo = np.maximum(boxes[i, :2], boxes[rest, :2])
        hi = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
        overlap = inter / np.maximum(area[i] + area[rest] - inter, 1e-9)
        order = rest[overlap <= iou]
    return np.asarray(keep, np.int64)


def person_boxes(raw: np.ndarray, input_hw: tuple[int, int], factors: tuple[float, float],
                 score_thr: float, iou: float) -> tuple[np.ndarray, np.ndarray]:
    """People in image pixels: (n, 4) xyxy boxes and (n,) scores, best first."""
    boxes, scores = yolox_decode(raw, input_hw)
    # An underflowed log size gives an empty box, which no crop can be made of.
    ok = (scores > score_thr) & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores = boxes[ok], scores[ok]
    keep = nms(boxes, scores, iou)
    sx, sy = factors
    return boxes[keep] / np.array([sx, sy, sx, sy], np.float32), scores[keep]


def largest(boxes: np.ndarray) -> int:
    """Index of the largest box: the main person of an image (-1 when none)."""
    if len(boxes) == 0:
        return -1
    return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))


# -------------------------------------------------------------------- pose ---

def box_to_crop(box: np.ndarray, input_wh: tuple[int, int], padding: float = 1.25) -> tuple[np.ndarray, np.ndarray]:
    """(centre, size) of the crop window: the box padded, then widened along one
    axis to the model's aspect so the person is never squashed."""
    x1, y1, x2, y2 = np.asarray(box, np.float64)
    centre = np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    w, h = (x2 - x1) * padding, (y2 - y1) * padding
    aspect = input_wh[0] / input_wh[1]
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    return centre, np.array([w, h])


def crop_affine(centre: np.ndarray, size: np.ndarray, out_wh: tuple[int, int]) -> np.ndarray:
    """2x3 map from image to crop pixels: the window centred at `centre` of
    `size` fills the out_wh crop (one scale: the window already has its aspect)."""
    k = out_wh[0] / size[0]
    return np.array([[k, 0.0, out_wh[0] / 2 - k * centre[0]],
                     [0.0, k, out_wh[1] / 2 - k * centre[1]]])


def invert_affine(m: np.ndarray) -> np.ndarray:
    a = np.linalg.inv(m[:, :2])
    return np.concatenate([a, -a @ m[:, 2:]], 1)


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(K, 2) points through a 2x3 map."""
    return np.asarray(pts, np.float64) @ m[:, :2].T + m[:, 2]


def warp(img: Image.Image, m: np.ndarray, out_wh: tuple[int, int]) -> Image.Image:
    """The crop: output pixel p shows the image at invert(m)(p); outside is black
    (as OpenCV's warpAffine border)."""
    return _resample(img.convert("RGB"), out_wh, invert_affine(m), fill=(0, 0, 0))


def normalise(crop: Image.Image) -> np.ndarray:
    """(1, 3, H, W) float32, RGB, ImageNet mean/std."""
    x = (np.asarray(crop, np.float32) - MEAN) / STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def simcc_decode(simcc_x: np.ndarray, simcc_y: np.ndarray, input_wh: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(K, Lx), (K, Ly) SimCC logits → (K, 2) crop pixels and (K,) confidences.

    The split ratio (bins per input pixel, 2.0 for DW-LL) is read off the
    lengths. Confidence = mean of the two axes' maxima, as DWPose's decoder
    takes it. The model's bins count from pixel centres on integers (OpenCV),
    hence + 0.5 into continuous coordinates.
    """
    simcc_x = np.asarray(simcc_x, np.float32).reshape(-1, simcc_x.shape[-1])
    simcc_y = np.asarray(simcc_y, np.float32).reshape(-1, simcc_y.shape[-1])
    rx, ry = simcc_x.shape[1] / input_wh[0], simcc_y.shape[1] / input_wh[1]
    xs = simcc_x.argmax(1) / rx + 0.5
    ys = simcc_y.argmax(1) / ry + 0.5
    conf = 0.5 * (simcc_x.max(1) + simcc_y.max(1))
    return np.stack([xs, ys], 1), conf


def normalised_keypoints(xy: np.ndarray, conf: np.ndarray, width: int, height: int) -> np.ndarray:
    """(K, 3) float16 [2x/W - 1, 2y/H - 1, conf] relative to the W x H image."""
    out = np.empty((len(xy), 3), np.float32)
    out[:, 0] = 2 * xy[:, 0] / width - 1
    out[:, 1] = 2 * xy[:, 1] / height - 1
    out[:, 2] = conf
    return out.astype(np.float16)

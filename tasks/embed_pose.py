"""Stage `embed_pose`: DWPose whole-body keypoints of the main (largest) person
in each bucketed image, 133 x [x_norm, y_norm, conf] with x_norm = 2x/W - 1.

An image with nobody in it is not a failure: it gets all-zero keypoints and
n_people = 0, and the manifest says so. The key holds the bucketed image's key,
both models' keys and every parameter that changes the output; the device and
the thread count do not (they change speed, not the answer).

    python -m tasks.embed_pose        # reads params.yaml:embed_pose
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from models.encoders.dwpose import KEYPOINTS, DWPose, PoseResult, resolve_onnx
from models.encoders.dwpose_decode import normalised_keypoints
from tasks.core import manifest
from tasks.bucket import STORE as BUCKET_STORE
from tasks.core.executors import default_workers
from tasks.core.runner import run_batches
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key, read_tensors, write_tensors

log = logging.getLogger("niche.embed_pose")

VERSION = 1  # bump when the tensors written for the same key would change
STORE = Path("data/derived/embed_pose")

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),  # "WxH": what x_norm, y_norm are relative to
    pa.field("key", pa.string()),  # null when the item failed
    pa.field("file", pa.string()),  # path of the item in the store
    pa.field("n_people", pa.int32()),  # people found; 0 = no person (keypoints all zero)
    pa.field("det_score", pa.float32()),  # the main person's detector score; null when none
    pa.field("pose_conf", pa.float32()),  # mean keypoint confidence of the main person
    pa.field("error", pa.string()),  # why it failed, null when it did not
])


@dataclass(frozen=True)
class EmbedPoseParams:
    # A local .onnx file, or `org/repo/file.onnx` inside a hub repo (from the hub cache).
    detector: str = "yzd-v/DWPose/yolox_l.onnx"
    pose: str = "yzd-v/DWPose/dw-ll_ucoco_384.onnx"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA if onnxruntime has it, else CPU (warned)
    det_score: float = 0.3  # person score (objectness x class) a box must exceed
    nms_iou: float = 0.45  # boxes overlapping a better one by more than this are dropped
    bbox_padding: float = 1.25  # the pose crop is the person box enlarged by this

    def validate(self) -> None:
        for name in ("detector", "pose"):
            v = getattr(self, name)
            if not v.lower().endswith(".onnx"):
                raise ValueError(f"embed_pose.{name}: expected a local .onnx file or a file in a hub "
                                 f"repo like 'yzd-v/DWPose/yolox_l.onnx', got {v!r}")
        if not 0.0 <= self.det_score < 1.0:
            raise ValueError(f"embed_pose.det_score: expected 0 <= value < 1, got {self.det_score}")
        if not 0.0 < self.nms_iou <= 1.0:
            raise ValueError(f"embed_pose.nms_iou: expected 0 < value <= 1, got {self.nms_iou}")
        if not 1.0 <= self.bbox_padding <= 4.0:
            # Below 1 the crop would cut into the detected person.
            raise ValueError(f"embed_pose.bbox_padding: expected 1 <= value <= 4, got {self.bbox_padding}")


def _item(result: PoseResult, width: int, height: int) -> tuple[dict, dict]:
    """(tensors, metadata) of one image: keypoints relative to its bucket."""
    n = len(result.boxes)
    if result.main < 0:
        pose = np.zeros((KEYPOINTS, 3), np.float16)
        box = np.zeros(4, np.float32)
        score = conf = 0.0
    else:
        pose = normalised_keypoints(result.keypoints, result.conf, width, height)
        b = result.boxes[result.main]
        box = (2 * b / np.array([width, height, width, height]) - 1).astype(np.float32)
        score, conf = float(result.scores[result.main]), float(np.mean(result.conf))
    tensors = {"pose": pose, "box": box, "n_people": np.array(n, np.int32)}
    meta = {"n_people": str(n), "det_score": f"{score:.6g}", "pose_conf": f"{conf:.6g}",
            "size": f"{width}x{height}"}
    return tensors, meta


def embed_pose(p: EmbedPoseParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
               store_dir: Path = STORE, workers: int | None = None,
               bucket_store: Path = BUCKET_STORE) -> Report:
    """Pose of the main person in every bucketed image (`bucket_store` holds them)."""
    images = manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
    # Rejects never reach the NanoDiT shards: their poses would be wasted work.
    images = [r for r in images if r["split"] != "rejected"]
    det = resolve_onnx(p.detector, "embed_pose.detector")
    pose = resolve_onnx(p.pose, "embed_pose.pose")
    params = {"det_score": p.det_score, "nms_iou": p.nms_iou, "bbox_padding": p.bbox_padding}
    model_key = f"detector={det.key()};pose={pose.key()}"
    store = Store(store_dir, ".safetensors")

    rows, work, by_id, upstream = [], [], {}, {}
    for r in images:
        row = dict(id=r["id"], split=r["split"], bucket=r["bucket"], key=None, file=None,
                   n_people=None, det_score=None, pose_conf=None, error=None)
        rows.append(row)
        if r["error"] is not None or r["key"] is None:
            upstream[r["id"]] = f"bucket failed: {r['error']}"
            continue
        key = item_key("embed_pose", VERSION, [r["key"]], params, model=model_key)
        row.update(key=key, file=store.relpath(key))
        by_id[r["id"]] = r
        work.append((r["id"], key))

    # The sessions load only when something is missing, and before the loop: a
    # missing CUDA or a broken .onnx is one clear error, not one per image.
    model = None
    if any(not store.has(k) for _, k in work):
        model = DWPose(det.path, pose.path, device=p.device, threads=workers or default_workers(),
                       det_score=p.det_score, nms_iou=p.nms_iou, bbox_padding=p.bbox_padding,
                       param="embed_pose.device")

    def compute(batch: list[tuple[str, str]]) -> dict[str, str]:
        errors = {}
        for item_id, key in batch:
            r = by_id[item_id]
            try:
                with Image.open(bucket_store / r["file"]) as f:
                    img = f.convert("RGB")
            except (OSError, ValueError) as e:
                errors[item_id] = f"bucketed image {r['file']} unreadable: {e}"
                continue
            if img.size != (r["width"], r["height"]):
                errors[item_id] = (f"bucketed image {r['file']} is {img.width}x{img.height}, "
                                   f"the manifest says {r['bucket']}; run bucket again")
                continue
            tensors, meta = _item(model(img), r["width"], r["height"])
            write_tensors(store, key, tensors, meta)
        return errors

    report = run_batches("embed_pose", work, store, compute, batch_size=1)
    report.total += len(upstream)
    report.failed += len(upstream)
    report.failures.update(upstream)

    counts = {"no_person": 0, "one_person": 0, "several_people": 0}
    for row in rows:
        if row["id"] in report.failures:
            row.update(key=None, file=None, error=report.failures[row["id"]])
            continue
        tensors, meta = read_tensors(store, row["key"])
        n = int(tensors["n_people"])
        row.update(n_people=n, det_score=float(meta["det_score"]) if n else None,
                   pose_conf=float(meta["pose_conf"]) if n else None)
        counts["no_person" if n == 0 else "one_person" if n == 1 else "several_people"] += 1
    manifest.write_table(rows, SCHEMA, out_dir / "embed_pose.parquet", sort_by="id")
    if counts["no_person"]:
        log.info("embed_pose: no person found in %d of %d images (kept, with zero keypoints and n_people 0)",
                 counts["no_person"], sum(counts.values()))
    report.extra = counts
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("embed_pose", EmbedPoseParams, embed_pose, __doc__, argv)


if __name__ == "__main__":
    main()

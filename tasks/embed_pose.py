"""Stage `embed_pose`: DWPose whole-body keypoints of the main (largest) person
in each bucketed image, 133 x [x_norm, y_norm, conf] with x_norm = 2x/W - 1.

An image with nobody in it is not a failure: it gets all-zero keypoints and
n_people = 0, and the manifest says so. The key holds the bucketed image's key,
both models' keys and every parameter that changes the output; the device and
the thread count do not (they change speed, not the answer).

    python -m tasks.embed_pose        # reads params.yaml:embed_pose
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from PIL import Image

from models.encoders.dwpose import KEYPOINTS, DWPose, PoseResult, resolve_onnx
from models.encoders.dwpose_decode import normalised_keypoints
from models.hub import ResolvedModel, SetupError
from tasks.bucket import STORE as BUCKET_STORE
from tasks.bucket import bucket_store as open_bucket_store
from tasks.core import manifest
from tasks.core.executors import default_workers, model_executor
from tasks.core.images import BucketedImage, read_bucketed, why
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_model
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key, read_tensors, tensor_bytes
from tasks.core.workers import Failed, Result, Worker, where

log = logging.getLogger("niche.embed_pose")

VERSION = 1  # bump when the tensors written for the same key would change
STORE = Path("data/derived/embed_pose")
# Images per batch sent to a worker. DWPose takes one image at a time, so this changes no byte:
# it only saves round trips to a Ray actor.
BATCH_SIZE = 8

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


def resolve_onnx_here(r: ResolvedModel, param: str) -> ResolvedModel:
    """`r` (resolved on the driver) resolved again on this machine — a Ray worker's, which may be
    another host with its own hub cache — refusing other weights (models.hub.resolve_here's rule,
    for the single .onnx files DWPose is named by)."""
    here = resolve_onnx(r.id, param)
    if here.key() != r.key():
        raise SetupError(f"{param}: on {where()} {r.id!r} is {here.key()}, but the driver resolved "
                         f"{r.key()}; give every node the same files or revision")
    return here


class PoseWorker(Worker):
    """DWPose (two ONNX Runtime sessions) on whichever machine runs it: bucketed PNG bytes in,
    safetensors bytes out. Picklable until setup(): settings only."""

    def __init__(self, detector: ResolvedModel, pose: ResolvedModel, device: str, threads: int | None,
                 det_score: float, nms_iou: float, bbox_padding: float):
        self.detector, self.pose, self.device, self.threads = detector, pose, device, threads
        self.det_score, self.nms_iou, self.bbox_padding = det_score, nms_iou, bbox_padding
        self.model: DWPose | None = None

    def setup(self) -> str:
        # Before any image: a missing CUDA or a broken .onnx is one clear error, not one per image.
        det = resolve_onnx_here(self.detector, "embed_pose.detector")
        pose = resolve_onnx_here(self.pose, "embed_pose.pose")
        self.model = DWPose(det.path, pose.path, device=self.device, threads=self.threads,
                            det_score=self.det_score, nms_iou=self.nms_iou, bbox_padding=self.bbox_padding,
                            param="embed_pose.device")
        return (f"DWPose {self.detector.key()} + {self.pose.key()} on "
                f"{self.model.det.get_providers()[0]} ({where()})")

    def run(self, images: list[BucketedImage]) -> list[Result]:
        out: list[Result] = []
        for img in images:
            im = _open(img)
            if isinstance(im, Failed):
                out.append(im)
                continue
            tensors, meta = _item(self.model(im), img.width, img.height)
            out.append(tensor_bytes(tensors, meta))
        return out


def _open(img: BucketedImage) -> Image.Image | Failed:
    """The bucketed PNG as RGB, at the size the manifest promised."""
    try:
        with Image.open(io.BytesIO(img.data)) as f:
            im = f.convert("RGB")
    except (OSError, ValueError) as e:
        return Failed(f"bucketed image {img.path} unreadable: {why(e)}")
    if im.size != (img.width, img.height):
        return Failed(f"bucketed image {img.path} is {im.width}x{im.height}, "
                      f"the manifest says {img.width}x{img.height}; run bucket again")
    return im


def embed_pose(p: EmbedPoseParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
               store_dir: Path = STORE, workers: int | None = None,
               bucket_store: Path = BUCKET_STORE, params_file: Path = PARAMS_FILE) -> Report:
    """Pose of the main person in every bucketed image (`bucket_store` holds them); where the
    models run (this process or a Ray cluster) is params.yaml's `executor`. `workers`: onnxruntime
    threads in this process (default: every core)."""
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

    images = open_bucket_store(bucket_store)

    def read_input(item_id: str) -> BucketedImage:
        r = by_id[item_id]
        return read_bucketed(images, r["key"], r["width"], r["height"])

    with model_executor(params_file) as executor:
        device, threads = p.device, workers or default_workers()
        # A fully cached run joins no cluster (and run_model returns before loading anything).
        if executor.name == "ray" and any(not store.has(k) for _, k in work):
            # `auto` keeps its meaning on Ray: CUDA where onnxruntime has it (a GPU actor's own
            # GPU), else the CPU, warned; actors given no GPU use the CPU without trying CUDA.
            if p.device == "auto" and executor.device() == "cpu":
                device = "cpu"
            threads = max(1, int(executor.shape()[2]))  # the actor's CPUs, not its whole node's
        worker = PoseWorker(det, pose, device, threads, p.det_score, p.nms_iou, p.bbox_padding)
        report = run_model("embed_pose", work, store, worker, read_input, BATCH_SIZE, executor=executor)
    report.total += len(upstream)
    report.failed += len(upstream)
    report.failures.update(upstream)

    counts = {"no_person": 0, "one_person": 0, "several_people": 0}
    known = manifest.previous(out_dir / "embed_pose.parquet", ["n_people", "det_score", "pose_conf"])
    for row in rows:
        if row["id"] in report.failures:
            row.update(key=None, file=None, error=report.failures[row["id"]])
            continue
        if (old := known.get(row["key"])) is not None and old["n_people"] is not None:
            row.update(n_people=old["n_people"], det_score=old["det_score"], pose_conf=old["pose_conf"])
        else:
            tensors, meta = read_tensors(store, row["key"])
            n = int(tensors["n_people"])
            row.update(n_people=n, det_score=float(meta["det_score"]) if n else None,
                       pose_conf=float(meta["pose_conf"]) if n else None)
        n = row["n_people"]
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

"""The embed_pose stage end to end: tiny random-weight ONNX models (built here,
loaded through models.hub like a user's real ones) in real onnxruntime sessions."""
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest

from models.encoders import dwpose_decode as dec
from models.encoders.dwpose import CUDA, DeviceUnavailable
from models.hub import TINY_MARKER, ModelMissing
from models.encoders.tiny_dwpose import build_tiny_dwpose
from tasks.core import manifest
from tasks.bucket import BucketParams, bucket
from tasks.embed_pose import STORE, EmbedPoseParams, embed_pose, main
from tasks.ingest import IngestParams, ingest
from tasks.core.params import ParamsError, from_dict
from tasks.sample.__main__ import make_sample
from tasks.core.store import Store, read_tensors
from tests.storekit import replace_item, store_of

SMALL_BUCKETS = ((256, 256), (320, 192), (192, 320))
CPU_WARNING = "DWPose runs on the CPU"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_dwpose(tmp_path_factory.mktemp("tiny") / "dwpose")


@pytest.fixture
def bucketed(chdir):
    make_sample(Path("data/raw"), figures=3, seed=0, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    bucket(BucketParams(buckets=SMALL_BUCKETS), workers=2)
    return chdir


def _params(tiny, **kw) -> EmbedPoseParams:
    return EmbedPoseParams(detector=str(tiny[0]), pose=str(tiny[1]), **kw)


def _rows():
    return pq.read_table("data/manifest/embed_pose.parquet").to_pylist()


def test_tiny_models_have_the_public_io_and_are_deterministic(tiny, tmp_path):
    det, pose = tiny
    assert (det.parent / TINY_MARKER).is_file()
    assert det.stat().st_size < 2 << 20 and pose.stat().st_size < 2 << 20
    s = ort.InferenceSession(str(det), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in s.get_inputs()] == [("images", [1, 3, 640, 640])]
    assert [(o.name, o.shape) for o in s.get_outputs()] == [("output", [1, 8400, 85])]
    s = ort.InferenceSession(str(pose), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in s.get_inputs()] == [("input", [1, 3, 256, 192])]
    assert [(o.name, o.shape) for o in s.get_outputs()] == [("simcc_x", [1, 133, 384]), ("simcc_y", [1, 133, 512])]
    again = build_tiny_dwpose(tmp_path / "again")
    for a, b in zip(tiny, again):
        assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_stage_end_to_end(bucketed, tiny, caplog):
    caplog.set_level(logging.INFO)
    report = embed_pose(_params(tiny), workers=2)
    assert (report.total, report.computed, report.failed) == (3, 3, 0)
    assert CPU_WARNING in caplog.text and CUDA in caplog.text  # the CPU fall-back is said, with why
    assert report.extra == {"no_person": 3, "one_person": 0, "several_people": 0}

    rows = _rows()
    bucket_rows = {r["id"]: r for r in manifest.read_table(Path("data/manifest/bucket.parquet"),
                                                           manifest.BUCKET).to_pylist()}
    assert [r["id"] for r in rows] == sorted(bucket_rows)
    store = Store(STORE, ".safetensors")
    first_keys = set()
    for r in rows:
        # The tiny detector stays under DWPose's 0.3: "nobody here", recorded, not failed.
        assert r["error"] is None and r["n_people"] == 0 and r["det_score"] is None
        assert r["bucket"] == bucket_rows[r["id"]]["bucket"] and r["file"] == store.relpath(r["key"])
        tensors, meta = read_tensors(store, r["key"])
        assert tensors["pose"].shape == (133, 3) and tensors["pose"].dtype == np.float16
        assert not tensors["pose"].any() and int(tensors["n_people"]) == 0 and meta["n_people"] == "0"
        first_keys.add(r["key"])

    # A re-run computes nothing and does not even open the models.
    caplog.clear()
    again = embed_pose(_params(tiny), workers=2)
    assert (again.computed, again.reused) == (0, 3)
    assert CPU_WARNING not in caplog.text
    assert _rows() == rows

    # A threshold the tiny detector passes: every item recomputed, people found, keypoints decoded.
    report = embed_pose(_params(tiny, det_score=0.02), workers=2)
    assert (report.computed, report.reused) == (3, 0)
    rows = _rows()
    assert not first_keys & {r["key"] for r in rows}
    found = [r for r in rows if r["n_people"] > 0]
    assert found, "the tiny detector found nobody at 0.02"
    for r in found:
        tensors, meta = read_tensors(store, r["key"])
        assert int(tensors["n_people"]) == r["n_people"] and r["det_score"] > 0.02
        pose = tensors["pose"].astype(np.float32)
        assert np.isfinite(pose).all() and (pose[:, 2] != 0).any()
        # Every keypoint lies in the crop window of the main person's box (SimCC bins span the crop).
        w, h = bucket_rows[r["id"]]["width"], bucket_rows[r["id"]]["height"]
        box = (tensors["box"] + 1) / 2 * np.array([w, h, w, h])
        centre, size = dec.box_to_crop(box, (192, 256), 1.25)
        xy = (pose[:, :2] + 1) / 2 * np.array([w, h])
        assert np.all(xy >= centre - size / 2 - 1) and np.all(xy <= centre + size / 2 + 1)
    assert report.extra["several_people"] + report.extra["one_person"] == len(found)

    # Back to the first threshold: the earlier items are still there.
    assert embed_pose(_params(tiny), workers=2).reused == 3
    # Again: the counts come from the last table (a key names one content), no item is read back.
    table = Path("data/manifest/embed_pose.parquet")
    before = table.read_bytes()

    def not_read(*a, **k):
        raise AssertionError("an item was read back although the last table holds its key")

    import tasks.embed_pose as stage

    real, stage.read_tensors = stage.read_tensors, not_read
    try:
        assert embed_pose(_params(tiny), workers=2).reused == 3
    finally:
        stage.read_tensors = real
    assert table.read_bytes() == before


def test_bad_inputs_are_listed_and_the_rest_goes_on(bucketed, tiny):
    rows = manifest.read_table(Path("data/manifest/bucket.parquet"), manifest.BUCKET).to_pylist()
    rows[0].update(key=None, file=None, error="corrupt: cannot decode")  # failed upstream
    replace_item("data/derived/bucket", rows[1]["key"], b"not a png")  # damaged on disk
    manifest.write_table(rows, manifest.BUCKET, Path("data/manifest/bucket.parquet"), sort_by="id")

    report = embed_pose(_params(tiny, device="cpu"), workers=2)
    assert (report.total, report.computed, report.failed) == (3, 1, 2)
    out = {r["id"]: r for r in _rows()}
    assert out[rows[0]["id"]]["error"] == "bucket failed: corrupt: cannot decode"
    assert "unreadable" in out[rows[1]["id"]]["error"] and out[rows[1]["id"]]["key"] is None
    assert out[rows[2]["id"]]["error"] is None and out[rows[2]["id"]]["n_people"] == 0


def test_explicit_cpu_is_not_warned(bucketed, tiny, caplog):
    embed_pose(_params(tiny, device="cpu"), workers=2)
    assert CPU_WARNING not in caplog.text


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this machine has CUDA")
def test_cuda_asked_for_but_missing_is_refused(bucketed, tiny):
    with pytest.raises(DeviceUnavailable, match="embed_pose.device.*onnxruntime-gpu"):
        embed_pose(_params(tiny, device="cuda"), workers=2)


def test_missing_models_name_their_param(bucketed, tiny, monkeypatch, tmp_path):
    import huggingface_hub.constants

    # An empty hub cache, whatever this machine has downloaded.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("NICHE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelMissing, match=r"embed_pose\.detector.*yzd-v/DWPose.*hf download"):
        embed_pose(EmbedPoseParams(), workers=2)  # the real defaults
    with pytest.raises(ModelMissing, match=r"embed_pose\.pose"):
        embed_pose(EmbedPoseParams(detector=str(tiny[0]), pose="/nowhere/pose.onnx"), workers=2)
    Path("weights.onnx").mkdir()
    with pytest.raises(ModelMissing, match=r"embed_pose\.detector.*folder"):
        embed_pose(EmbedPoseParams(detector="weights.onnx", pose=str(tiny[1])), workers=2)


def test_default_params_load_the_files_from_the_hub_cache(bucketed, tiny, monkeypatch, tmp_path):
    """The real defaults, `yzd-v/DWPose/<file>.onnx`, resolved from a hub cache laid
    out as `hf download` leaves it (the tiny models under the public file names)."""
    import shutil

    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snap = cache / "models--yzd-v--DWPose" / "snapshots" / ("c0ffee" * 6 + "0000")
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(snap.name)
    shutil.copy(tiny[0], snap / "yolox_l.onnx")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("NICHE_ALLOW_DOWNLOAD", raising=False)
    # Only the detector is there: the pose model is named as missing, with how to get it.
    with pytest.raises(ModelMissing, match=r"embed_pose\.pose: dw-ll_ucoco_384\.onnx is not in .*hf download"):
        embed_pose(EmbedPoseParams(), workers=2)
    shutil.copy(tiny[1], snap / "dw-ll_ucoco_384.onnx")
    report = embed_pose(EmbedPoseParams(), workers=2)
    assert (report.computed, report.failed) == (3, 0)
    tensors, _ = read_tensors(Store(STORE, ".safetensors"), _rows()[0]["key"])
    assert tensors["pose"].shape == (133, 3)


@pytest.mark.parametrize("raw, key", [
    ({"det_score": 1.5}, "embed_pose.det_score"),
    ({"nms_iou": 0.0}, "embed_pose.nms_iou"),
    ({"bbox_padding": 0.8}, "embed_pose.bbox_padding"),
    ({"detector": "yzd-v/DWPose"}, "embed_pose.detector"),
    ({"pose": "pose.bin"}, "embed_pose.pose"),
    ({"device": "gpu"}, "embed_pose.device"),
    ({"det_score": "high"}, "embed_pose.det_score"),
    ({"threshold": 0.3}, "embed_pose.threshold"),
])
def test_bad_params_are_refused_by_name(raw, key):
    with pytest.raises((ParamsError, ValueError), match=key.replace(".", r"\.")):
        from_dict(EmbedPoseParams, raw, "embed_pose")


def test_command_line_writes_metrics(bucketed, tiny):
    Path("params.yaml").write_text(json.dumps({"embed_pose": {
        "detector": str(tiny[0]), "pose": str(tiny[1]), "device": "cpu"}}))
    main(["--params", "params.yaml", "--workers", "2"])
    metrics = json.loads(Path("metrics/embed_pose.json").read_text())
    details = json.loads(Path("metrics/embed_pose.details.json").read_text())
    assert (metrics["total"], metrics["computed"], details["no_person"]) == (3, 3, 3)


def test_worker_pickles_and_clean_runs_are_byte_identical(bucketed, tiny):
    """The stores' bytes depend on the inputs only: a second clean run, and a PoseWorker that went
    through pickle (as to a Ray actor) before its setup, give the very same files."""
    import pickle
    import shutil
    from dataclasses import replace

    from models.encoders.dwpose import resolve_onnx
    from models.hub import SetupError
    from tasks.core.images import read_bucketed
    from tasks.embed_pose import PoseWorker

    p = _params(tiny, det_score=0.02, device="cpu")
    assert embed_pose(p, workers=2).computed == 3
    store = Store(STORE, ".safetensors")
    first = {r["key"]: store.read_bytes(r["key"]) for r in _rows()}
    shutil.rmtree(STORE)
    assert embed_pose(p, workers=2).computed == 3
    store = Store(STORE, ".safetensors")
    assert {r["key"]: store.read_bytes(r["key"]) for r in _rows()} == first

    det, pose = resolve_onnx(str(tiny[0]), "d"), resolve_onnx(str(tiny[1]), "p")
    worker = pickle.loads(pickle.dumps(PoseWorker(det, pose, "cpu", 1, 0.02, 0.45, 1.25)))
    worker.setup()
    src = {r["id"]: r for r in manifest.read_table(Path("data/manifest/bucket.parquet"), manifest.BUCKET).to_pylist()}
    rows = _rows()
    bucketed = store_of("data/derived/bucket")
    images = [read_bucketed(bucketed, src[r["id"]]["key"], src[r["id"]]["width"], src[r["id"]]["height"])
              for r in rows]
    assert worker.run(images) == [first[r["key"]] for r in rows]

    # A node whose file is not the driver's is refused at setup, naming the param.
    other = PoseWorker(det, replace(pose, revision="local-0000"), "cpu", 1, 0.02, 0.45, 1.25)
    with pytest.raises(SetupError, match=r"embed_pose\.pose: .*driver resolved"):
        other.setup()

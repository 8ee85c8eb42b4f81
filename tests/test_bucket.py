import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.bucket import DEFAULT_BUCKETS, BucketParams, bucket, cover_crop, nearest_bucket, render
from tasks.ingest import IngestParams, ingest
from tasks.sample.__main__ import make_sample
from tasks.core.store import Store
from tests.storekit import item_bytes, unpack_to_the_old_layout

M = Path("data/manifest")
STORE = Path("data/derived/bucket")


def _rows():
    return pq.read_table(M / "bucket.parquet").to_pylist()


@pytest.mark.parametrize("size, expected", [
    ((1000, 1000), (1024, 1024)),
    ((1500, 1000), (1216, 832)),   # 1.5 → 1.46
    ((1000, 1500), (832, 1216)),
    ((1700, 1000), (1280, 768)),   # 1.7 → 1.67
    ((4000, 1000), (1344, 704)),   # very wide → the widest bucket
    ((500, 2000), (704, 1344)),
])
def test_nearest_bucket(size, expected):
    assert nearest_bucket(*size, DEFAULT_BUCKETS) == expected


def test_cover_crop_fills_the_bucket_and_keeps_the_centre():
    src = np.full((900, 1600, 3), 255, np.uint8)
    src[440:460, 790:810] = 0  # a black square at the centre
    src[:, :100] = 0  # a black band at the far left, which the crop must cut away
    out = np.asarray(render(Image.fromarray(src), 1024, 1024, "lanczos"))
    assert out.shape == (1024, 1024, 3) and out.dtype == np.uint8
    assert out[500:524, 500:524].mean() < 60  # centre mark, scaled by 1024/900
    assert out[:, :20].mean() > 250  # left band cropped off
    scale, left, top = cover_crop(1600, 900, 1024, 1024)
    assert scale == pytest.approx(1024 / 900) and left == pytest.approx(350.0) and top == 0.0


@pytest.fixture
def ingested(chdir):
    make_sample(Path("data/raw"), figures=6, seed=0, photos=True, bad_examples=False)
    ingest(IngestParams(), workers=2)
    return chdir


def test_every_sample_is_stored_at_its_bucket(ingested):
    report = bucket(BucketParams(), workers=2)
    rows = _rows()
    assert report.computed == len(rows) and report.failed == 0
    for r in rows:
        img = Image.open(io.BytesIO(item_bytes(STORE, r["key"])))
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (r["width"], r["height"]) and r["bucket"] == f"{r['width']}x{r['height']}"
    assert len({r["bucket"] for r in rows}) >= 3  # the figures come in several shapes
    assert json.loads(report.write(Path("metrics")).read_text())["computed"] == len(rows)


def test_true_keypoints_land_on_the_figure_after_bucketing(ingested):
    bucket(BucketParams(), workers=2)
    ids = {r["path"]: r["id"] for r in pq.read_table(M / "ingest.parquet").to_pylist()}
    rows = {r["id"]: r for r in _rows()}
    checked = 0
    for truth in sorted(Path("data/raw/figures").glob("*.pose.json")):
        image = next(p for p in truth.parent.glob(truth.name.replace(".pose.json", ".*"))
                     if p.suffix in (".png", ".jpg"))
        r = rows[ids[image.as_posix()]]
        kp = np.array(json.loads(truth.read_text())["keypoints"])[:, :2]
        xy = (kp - [r["left"], r["top"]]) * r["scale"]
        px = np.asarray(Image.open(io.BytesIO(item_bytes(STORE, r["key"]))).convert("L"), np.float32)
        inside = (xy[:, 0] >= 0) & (xy[:, 0] < r["width"]) & (xy[:, 1] >= 0) & (xy[:, 1] < r["height"])
        # Body joints (0-16) inside the crop sit on particles: dark pixels nearby.
        for x, y in xy[:17][inside[:17]]:
            x, y = int(x), int(y)
            patch = px[max(0, y - 25): y + 25, max(0, x - 25): x + 25]
            assert patch.min() < 128, (image, x, y)
            checked += 1
    assert checked >= 50


def test_changing_the_filter_recomputes_everything_and_rerun_nothing(ingested):
    first = bucket(BucketParams(), workers=2)
    assert bucket(BucketParams(), workers=2).computed == 0
    other = bucket(BucketParams(resample="bicubic"), workers=2)
    assert other.computed == first.total and other.reused == 0
    # Going back is free: the store keeps every key.
    assert bucket(BucketParams(), workers=2).computed == 0


def test_adding_a_bucket_recomputes_only_images_that_move(ingested):
    base = bucket(BucketParams(), workers=2)
    before = {r["id"]: r["bucket"] for r in _rows()}
    more = BucketParams(buckets=DEFAULT_BUCKETS + ((1408, 704),))
    r = bucket(more, workers=2)
    after = {r["id"]: r["bucket"] for r in _rows()}
    moved = sum(before[i] != after[i] for i in before)
    assert r.computed == moved and r.reused == base.total - moved


def test_sigkill_midway_then_rerun_finishes_and_reuses(ingested):
    """A bucket run killed at an arbitrary moment leaves its items in a pack it never sealed:
    nobody reads them as done, and the re-run keeps every whole one (a torn last one is cut)."""
    from tasks.core import packs

    env = {**os.environ, "NICHE_WORKERS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    Path("params.yaml").write_text("bucket: {}\n")
    proc = subprocess.Popen([sys.executable, "-m", "tasks.bucket"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def written() -> int:
        return sum(len(packs.scan_records(p)[0]) for p in packs.open_packs(STORE / "packs"))

    t0 = time.monotonic()
    while written() < 3 and time.monotonic() - t0 < 60:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = written()
    total = len(pq.read_table(M / "ingest.parquet"))
    assert 3 <= done < total, "the kill must land mid-way"
    assert not (M / "bucket.parquet").exists()
    store = Store(STORE, ".png")
    assert store.keys() == set()  # an open pack is nobody's to read
    assert store.remove_stale_temps() == 1
    for key in store.keys():  # every kept item is whole
        Image.open(io.BytesIO(store.read_bytes(key))).load()
    assert len(store.keys()) == done
    rerun = bucket(BucketParams(), workers=2)
    assert rerun.reused == done and rerun.computed == total - done and rerun.failed == 0
    assert not list(STORE.rglob("*.tmp"))
    assert len(_rows()) == total


def test_a_store_of_the_old_layout_is_used_as_it_is_and_packed_without_recomputing(ingested, monkeypatch):
    first = bucket(BucketParams(), workers=2)
    items = unpack_to_the_old_layout(STORE, ".png")
    assert len(list(STORE.glob("??/*.png"))) == first.computed and not (STORE / "packs").exists()

    import tasks.bucket as stage

    def no_work(*a, **k):
        raise AssertionError("an item of the old store was computed again")

    monkeypatch.setattr(stage, "bucket_png", no_work)
    again = bucket(BucketParams(), workers=2)
    assert (again.computed, again.reused, again.failed) == (0, first.total, 0)
    assert not list(STORE.glob("??/*.png"))  # moved into packs at the end of the run
    packed = Store(STORE, ".png")
    assert {k: packed.read_bytes(k) for k in packed.keys()} == items


def test_crop_box_never_leaves_the_image_through_float_error():
    # 832x1216 into 240x272 gave left = -5.7e-14, which PIL refuses.
    scale, left, top = cover_crop(832, 1216, 240, 272)
    assert left >= 0 and top >= 0
    out = render(Image.new("RGB", (832, 1216), "white"), 240, 272, "lanczos")
    assert out.size == (240, 272)


def test_the_worker_pickles_and_makes_the_thread_paths_bytes(ingested):
    """On Ray, bucket's items go to a BucketWorker (raw bytes read on the driver, PNG bytes back;
    tests/test_ray_executor.py runs it on a real cluster): it must pickle before its setup, as
    for an actor, and give the threads' bytes."""
    import pickle

    import tasks.bucket as stage
    from tasks.core.stage import ItemError
    from tasks.core.workers import Failed

    def store_bytes():
        return {r["key"]: item_bytes(STORE, r["key"]) for r in _rows() if r["error"] is None}

    assert bucket(BucketParams(), workers=2).failed == 0
    threads = store_bytes()

    worker = pickle.loads(pickle.dumps(stage.BucketWorker("lanczos")))
    worker.setup()
    src = {s["id"]: s for s in pq.read_table(M / "ingest.parquet").to_pylist()}
    rows = _rows()
    raws = [stage.RawImage(src[r["id"]]["path"], stage.read_raw(Path(src[r["id"]]["path"]), r["id"]),
                           src[r["id"]]["width"], src[r["id"]]["height"], r["width"], r["height"]) for r in rows]
    bad = stage.RawImage("x.png", b"not an image", 10, 10, 256, 256)
    out = worker.run(raws[:2] + [bad])
    assert out[:2] == [threads[r["key"]] for r in rows[:2]]
    assert out[2] == Failed("ImageRejected: not_image: not a recognised image format")
    with pytest.raises(ItemError, match="nowhere.png is missing"):
        stage.read_raw(Path("nowhere.png"), "0" * 64)
    with pytest.raises(ItemError, match="changed since ingest"):
        stage.read_raw(Path(raws[0].path), "0" * 64)

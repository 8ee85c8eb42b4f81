"""latents on the tiny SDXL VAE (random weights, built from configs, loaded like the real one)."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.hub import resolve
from models.sdxl.pipeline import load_vae
from tasks import latents as stage
from tasks.core import manifest
from tasks.bucket import STORE as BUCKET_STORE
from tasks.bucket import BucketParams
from tasks.latents import LatentMismatch, LatentsParams, encoded_size, latents, read_latent
from tasks.core.params import ParamsError, from_dict
from tasks.core.store import ItemRef, Store
from tests.storekit import item_bytes, replace_item, store_of, unpack_to_the_old_layout
from tests.conftest import BIN, bucketed_sample, run

M = Path("data/manifest")
# Multiples of 64 at half scale: three encoded sizes, 128x128, 256x128 and 128x256.
SMALL = BucketParams(buckets=((256, 256), (512, 256), (256, 512)))


def latent(key: str) -> ItemRef:
    return ItemRef(str(stage.STORE), ".safetensors", key)


@pytest.fixture(scope="module")
def vae_dir(tiny_models) -> Path:
    return tiny_models / "sdxl"


@pytest.fixture
def bucketed(chdir) -> Path:
    bucketed_sample(SMALL, figures=6)
    return chdir


def params(vae_dir: Path, **kw) -> LatentsParams:
    return LatentsParams(model=str(vae_dir), image_scale=kw.pop("image_scale", 0.5), **kw)


def rows() -> list[dict]:
    return pq.read_table(M / "latents.parquet").to_pylist()


def encode_by_hand(vae, png: Path, size: tuple[int, int]) -> torch.Tensor:
    img = Image.open(png).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.inference_mode():
        return vae.encode(x).latent_dist.mean[0]


def test_encoded_size_is_scaled_and_rounded_to_64():
    assert encoded_size(1024, 1024, 1.0) == (1024, 1024)
    assert encoded_size(1344, 704, 1.0) == (1344, 704)
    assert encoded_size(1344, 704, 0.125) == (192, 64)  # 168 -> 192, 88 -> 64
    assert encoded_size(256, 256, 0.01) == (64, 64)  # never below one 8x8 latent


def test_each_sample_gets_its_own_latent(bucketed, vae_dir):
    report = latents(params(vae_dir, batch_size=2), workers=2)
    assert (report.total, report.computed, report.failed) == (6, 6, 0)
    assert report.extra["tiny_model"] is True and report.extra["failures"] == {}
    src = {s["id"]: s for s in manifest.read_table(M / "bucket.parquet", manifest.BUCKET).to_pylist()}
    orig = {s["id"]: s for s in manifest.read_table(M / "ingest.parquet", manifest.INGEST).to_pylist()}
    got = rows()
    assert [r["id"] for r in got] == sorted(src)
    vae = load_vae(resolve(str(vae_dir), "x"), "x", torch.float32)
    one_per_size = {}
    for r in got:
        s = src[r["id"]]
        assert r["error"] is None and r["bucket"] == s["bucket"] and r["split"] == s["split"]
        assert (r["width"], r["height"]) == (s["width"] // 2, s["height"] // 2)
        assert (r["latent_width"], r["latent_height"]) == (r["width"] // 8, r["height"] // 8)
        assert (r["orig_width"], r["orig_height"]) == (orig[r["id"]]["width"], orig[r["id"]]["height"])
        assert (r["crop_left"], r["crop_top"]) == (round(s["left"] * s["scale"] / 2), round(s["top"] * s["scale"] / 2))
        item = read_latent(latent(r["key"]), r["id"])
        for name in ("mean", "std"):
            assert item[name].dtype == np.float16 and item[name].shape == (4, r["height"] // 8, r["width"] // 8)
        assert (item["std"] > 0).all()
        meta = item["meta"]
        assert meta["id"] == r["id"] and (meta["width"], meta["height"]) == (r["width"], r["height"])
        assert meta["bucket"] == r["bucket"] and meta["dtype"] == "float32"
        assert meta["scaling_factor"] == pytest.approx(0.13025) and "/vae@local-" in meta["vae"]
        one_per_size.setdefault((r["width"], r["height"]), (r, item))
    assert len(one_per_size) == 3
    crops = [(r["crop_left"], r["crop_top"]) for r in got]
    assert any(c != (0, 0) for c in crops)  # some sample really was cropped

    for (w, h), (r, item) in one_per_size.items():
        mean = torch.from_numpy(item["mean"].astype(np.float32))
        # It is this sample's image (resized from its own bucketed PNG), not a neighbour's.
        ref = encode_by_hand(vae, io.BytesIO(item_bytes(BUCKET_STORE, src[r["id"]]["key"])), (w, h))
        np.testing.assert_allclose(mean.numpy(), ref.numpy(), rtol=1e-2, atol=1e-2)
        with torch.inference_mode():
            decoded = vae.decode(mean[None]).sample
        assert decoded.shape == (1, 3, h, w)

    wrong = next(x["id"] for x in got if x["id"] != got[0]["id"])
    with pytest.raises(LatentMismatch, match=f"{got[0]['id']}.*{wrong}"):
        read_latent(latent(got[0]["key"]), wrong)


def test_rerun_reuses_and_dtype_or_scale_recompute(bucketed, vae_dir, monkeypatch):
    assert latents(params(vae_dir), workers=2).computed == 6
    fp32 = {r["id"]: r["key"] for r in rows()}

    def not_loaded(*a, **k):
        raise AssertionError("the VAE was loaded although every item was cached")

    with monkeypatch.context() as m:
        m.setattr(stage.sdxl, "load_vae", not_loaded)
        again = latents(params(vae_dir), workers=2)
    assert (again.computed, again.reused) == (0, 6)

    bf16 = latents(params(vae_dir, dtype="bfloat16"), workers=2)
    assert (bf16.computed, bf16.reused) == (6, 0)
    for r in rows():
        assert r["key"] != fp32[r["id"]]
        a = read_latent(latent(r["key"]), r["id"])
        b = read_latent(latent(fp32[r["id"]]), r["id"])
        assert a["meta"]["dtype"] == "bfloat16"
        diff = np.abs(a["mean"].astype(np.float32) - b["mean"].astype(np.float32))
        assert 0 < diff.max() < 0.25  # bf16 rounding of the same VAE

    quarter = latents(params(vae_dir, image_scale=0.25), workers=2)
    assert (quarter.computed, quarter.reused) == (6, 0)
    assert {(r["width"], r["height"]) for r in rows()} == {(64, 64), (128, 64), (64, 128)}
    back = latents(params(vae_dir), workers=2)  # the store persists: going back costs nothing
    assert (back.computed, back.reused) == (0, 6)
    assert {r["id"]: r["key"] for r in rows()} == fp32


def test_a_latents_store_of_the_old_layout_is_used_without_loading_the_vae(bucketed, vae_dir, monkeypatch):
    first = latents(params(vae_dir), workers=2)
    items = unpack_to_the_old_layout(stage.STORE, ".safetensors")

    def not_loaded(*a, **k):
        raise AssertionError("the VAE was loaded although the old store holds every item")

    monkeypatch.setattr(stage.sdxl, "load_vae", not_loaded)
    again = latents(params(vae_dir), workers=2)
    assert (again.computed, again.reused) == (0, first.computed)
    assert not list(stage.STORE.glob("??/*")) and Store(stage.STORE, ".safetensors").keys() == set(items)
    assert all(read_latent(latent(r["key"]), r["id"])["meta"]["id"] == r["id"] for r in rows())


def test_bad_items_fail_alone_and_splits_filter(bucketed, vae_dir):
    src = manifest.read_table(M / "bucket.parquet", manifest.BUCKET).to_pylist()
    src[0].update(key=None, file=None, error="x.png changed since ingest (sha256 differs); run ingest again")
    src[1]["split"] = "holdout"  # not configured below: no row at all
    src[2]["split"] = "rejected"
    manifest.write_table(src, manifest.BUCKET, M / "bucket.parquet", sort_by="id")
    replace_item(BUCKET_STORE, src[3]["key"], b"this is not a PNG")
    report = latents(params(vae_dir, splits=("train", "rejected")), workers=2)
    assert (report.total, report.computed, report.failed) == (5, 3, 2)
    got = {r["id"]: r for r in rows()}
    assert src[1]["id"] not in got and got[src[2]["id"]]["split"] == "rejected"
    assert got[src[2]["id"]]["error"] is None and got[src[2]["id"]]["key"]
    assert got[src[0]["id"]]["error"] == f"no bucketed image ({src[0]['error']})"
    bad = got[src[3]["id"]]
    assert bad["key"] is None and bad["file"] is None
    assert src[3]["file"] in bad["error"] and "unreadable" in bad["error"]
    assert report.details()["failures"][src[3]["id"]] == bad["error"]
    assert all(got[s["id"]]["error"] is None for s in src[4:])


def test_params_are_checked_by_name():
    for raw, key in [({"dtype": "float16"}, "latents.dtype"), ({"image_scale": 0.0}, "latents.image_scale"),
                     ({"image_scale": 1.5}, "latents.image_scale"), ({"batch_size": 0}, "latents.batch_size"),
                     ({"splits": []}, "latents.splits"), ({"device": "tpu"}, "latents.device"),
                     ({"scale": 0.5}, "latents.scale")]:
        with pytest.raises((ValueError, ParamsError), match=key.replace(".", r"\.")):
            from_dict(LatentsParams, raw, "latents")
    with pytest.raises(ValueError, match="overflows"):
        LatentsParams(dtype="float16").validate()  # type: ignore[arg-type]


def test_dvc_repro_latents_then_status_is_clean(tiny_repo):
    out = run([str(BIN / "dvc"), "repro", "latents"], tiny_repo).stdout
    assert "Running stage 'latents'" in out
    metrics = json.loads((tiny_repo / "metrics/latents.json").read_text())
    details = json.loads((tiny_repo / "metrics/latents.details.json").read_text())
    table = pq.read_table(tiny_repo / M / "latents.parquet").to_pylist()
    assert metrics["computed"] == len(table) > 0 and metrics["failed"] == 0 and details["tiny_model"] is True
    assert all(r["width"] <= 192 and r["width"] % 64 == 0 and r["height"] % 64 == 0 for r in table)  # 1/8 scale
    assert "up to date" in run([str(BIN / "dvc"), "status", "latents"], tiny_repo).stdout
    again = run([str(BIN / "dvc"), "repro", "latents"], tiny_repo).stdout
    assert "Running stage" not in again


def test_worker_pickles_and_clean_runs_are_byte_identical(bucketed, vae_dir):
    """The store's bytes depend on the inputs only: a second clean run, and a LatentWorker that
    went through pickle (as to a Ray actor) before its setup, give the very same files."""
    import pickle
    import shutil

    from tasks.core.images import read_bucketed

    assert latents(params(vae_dir, batch_size=1), workers=2).computed == 6
    store = Store(stage.STORE, ".safetensors")
    first = {r["key"]: store.read_bytes(r["key"]) for r in rows()}
    shutil.rmtree(stage.STORE)
    assert latents(params(vae_dir, batch_size=1), workers=1).computed == 6
    store = Store(stage.STORE, ".safetensors")
    assert {r["key"]: store.read_bytes(r["key"]) for r in rows()} == first

    resolved = resolve(str(vae_dir), "latents.model", allow_patterns=stage.VAE_ALLOW)
    worker = pickle.loads(pickle.dumps(
        stage.LatentWorker(resolved, stage.vae_key(resolved), "float32", "cpu", 1)))
    worker.setup()
    src = {s["id"]: s for s in manifest.read_table(M / "bucket.parquet", manifest.BUCKET).to_pylist()}
    r = rows()[0]
    s = src[r["id"]]
    item = stage.LatentInput(r["id"], r["bucket"], r["width"], r["height"],
                             read_bucketed(store_of(BUCKET_STORE), s["key"], s["width"], s["height"]))
    assert worker.run([item]) == [first[r["key"]]]

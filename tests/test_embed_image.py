"""embed_image on a tiny random-weight DINOv3 built here and loaded like a real one."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from models.encoders.dinov3 import build_tiny_dinov3
from models.hub import ModelMissing
from tasks import embed_image as stage
from tasks.core import manifest
from tasks.bucket import STORE as BUCKET_STORE
from tasks.bucket import BucketParams
from tasks.embed_image import EmbedImageParams, embed_image
from tasks.core.params import from_dict
from tasks.core.store import Store, read_tensors
from tests.conftest import bucketed_sample
from tests.storekit import item_bytes, remove_item, replace_item

M = Path("data/manifest")
SMALL = BucketParams(buckets=((256, 256), (320, 192), (192, 320)))
REGISTERS = 4


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> Path:
    return build_tiny_dinov3(tmp_path_factory.mktemp("models") / "dinov3")


@pytest.fixture
def bucketed(chdir) -> Path:
    bucketed_sample(SMALL, figures=6)
    return chdir


def rows(out: Path = M) -> list[dict]:
    return pq.read_table(out / "embed_image.parquet").to_pylist()


def item(row: dict, store_dir: Path = stage.STORE) -> dict:
    return read_tensors(Store(store_dir, ".safetensors"), row["key"])[0]


def by_hand(model_dir: Path, png) -> np.ndarray:
    """last_hidden_state (1 + R + h·w, D) of the saved model on one image, normalised in numpy."""
    from transformers import DINOv3ViTModel

    x = np.asarray(Image.open(png).convert("RGB"), dtype=np.float32) / 255.0
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    model = DINOv3ViTModel.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        return model(pixel_values=torch.from_numpy(x.transpose(2, 0, 1)[None].copy())).last_hidden_state[0].numpy()


def test_cls_and_patch_grid_per_bucket(bucketed, tiny_dino):
    report = embed_image(EmbedImageParams(model=str(tiny_dino), batch_size=4), workers=2)
    assert (report.total, report.computed, report.failed) == (6, 6, 0)
    assert report.extra["tiny_model"] is True
    src = {r["id"]: r for r in manifest.read_table(M / "bucket.parquet", manifest.BUCKET).to_pylist()}
    got = rows()
    assert [r["id"] for r in got] == sorted(src)
    seen = {}
    for r in got:
        s = src[r["id"]]
        assert r["bucket"] == s["bucket"] and r["error"] is None
        assert (r["grid_h"], r["grid_w"]) == (s["height"] // 16, s["width"] // 16)
        t = item(r)
        assert t["cls"].dtype == np.float16 and t["cls"].shape == (64,)
        assert t["patches"].dtype == np.float16 and t["patches"].shape == (s["height"] // 16, s["width"] // 16, 64)
        seen.setdefault(r["bucket"], (r, s))
    assert len(seen) >= 2  # at least two sizes went through
    for r, s in seen.values():
        t, h, w = item(r), s["height"] // 16, s["width"] // 16
        ref = by_hand(tiny_dino, io.BytesIO(item_bytes(BUCKET_STORE, s["key"])))
        assert ref.shape == (1 + REGISTERS + h * w, 64)
        np.testing.assert_allclose(t["cls"].astype(np.float32), ref[0], rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(t["patches"].astype(np.float32), ref[1 + REGISTERS:].reshape(h, w, 64),
                                   rtol=2e-3, atol=2e-3)
        # Not the registers: keeping them would have shifted every patch by four tokens.
        flat = t["patches"].astype(np.float32).reshape(h * w, 64)
        assert not np.allclose(flat[:REGISTERS], ref[1:1 + REGISTERS], atol=0.05)
        assert np.abs(flat[:REGISTERS] - ref[1:1 + REGISTERS]).max() > 0.1


def test_a_batch_equals_each_image_alone(bucketed, tiny_dino):
    embed_image(EmbedImageParams(model=str(tiny_dino), batch_size=1), out_dir=Path("one"), store_dir=Path("s1"))
    embed_image(EmbedImageParams(model=str(tiny_dino), batch_size=4), out_dir=Path("four"), store_dir=Path("s4"))
    per_bucket = {}
    for r in rows(Path("four")):
        per_bucket[r["bucket"]] = per_bucket.get(r["bucket"], 0) + 1
    assert max(per_bucket.values()) >= 2  # some batch really held several images
    assert [r["key"] for r in rows(Path("one"))] == [r["key"] for r in rows(Path("four"))]
    for r in rows(Path("one")):
        a, b = item(r, Path("s1")), item(r, Path("s4"))
        for name in ("cls", "patches"):
            np.testing.assert_allclose(a[name].astype(np.float32), b[name].astype(np.float32), rtol=1e-3, atol=1e-3)


def test_rerun_computes_nothing_and_dtype_recomputes_everything(bucketed, tiny_dino, monkeypatch):
    first = embed_image(EmbedImageParams(model=str(tiny_dino)), workers=2)
    assert first.computed == 6
    fp32 = {r["id"]: r["key"] for r in rows()}

    class NotLoaded:
        def __init__(self, *a, **k):
            raise AssertionError("the model was loaded although every item was cached")

    with monkeypatch.context() as m:
        m.setattr(stage.dinov3, "DINOv3Encoder", NotLoaded)
        again = embed_image(EmbedImageParams(model=str(tiny_dino)), workers=2)
        # On a CPU "auto" is float32: naming it explicitly is the same items.
        explicit = embed_image(EmbedImageParams(model=str(tiny_dino), dtype="float32"), workers=2)
    assert (again.computed, again.reused) == (0, 6) and (explicit.computed, explicit.reused) == (0, 6)

    bf16 = embed_image(EmbedImageParams(model=str(tiny_dino), dtype="bfloat16"), workers=2)
    assert (bf16.computed, bf16.reused) == (6, 0)
    for r in rows():
        assert r["key"] != fp32[r["id"]]
        a = item(r)["cls"].astype(np.float32)
        b = read_tensors(Store(stage.STORE, ".safetensors"), fp32[r["id"]])[0]["cls"].astype(np.float32)
        assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.25  # bf16 rounding, same model


def test_bad_inputs_are_listed_and_the_rest_goes_on(bucketed, tiny_dino):
    src = manifest.read_table(M / "bucket.parquet", manifest.BUCKET).to_pylist()
    src[0].update(key=None, file=None, error="x.png changed since ingest (sha256 differs); run ingest again")
    manifest.write_table(src, manifest.BUCKET, M / "bucket.parquet", sort_by="id")
    remove_item(BUCKET_STORE, src[1]["key"])
    small = io.BytesIO()
    Image.new("RGB", (64, 64)).save(small, format="PNG")
    replace_item(BUCKET_STORE, src[2]["key"], small.getvalue())  # not its bucket's size
    report = embed_image(EmbedImageParams(model=str(tiny_dino)), workers=2)
    assert (report.total, report.computed, report.failed) == (6, 3, 3)
    got = {r["id"]: r for r in rows()}
    assert got[src[0]["id"]]["error"] == f"no bucketed image ({src[0]['error']})"
    assert "missing; run the bucket stage again" in got[src[1]["id"]]["error"]
    assert "64x64, expected RGB" in got[src[2]["id"]]["error"]
    assert all(got[s["id"]]["key"] is None for s in src[:3])
    assert all(got[s["id"]]["error"] is None and got[s["id"]]["key"] for s in src[3:])


def test_params_and_a_missing_model(bucketed):
    for raw, key in [({"dtype": "float16"}, "embed_image.dtype"), ({"batch_size": 0}, "embed_image.batch_size"),
                     ({"size": 224}, "embed_image.size")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            from_dict(EmbedImageParams, raw, "embed_image")
    with pytest.raises(ModelMissing, match=r"embed_image\.model.*no-such/dinov3"):
        embed_image(EmbedImageParams(model="no-such/dinov3"), workers=2)

"""The shard stage on real upstream items: eight figures through ingest → bucket →
caption (sidecar) → embed_text / embed_image / embed_pose with the tiny models,
then every tar read back member by member, by tarfile and by webdataset."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from models.hub import SetupError
from tasks import caption as caption_stage
from tasks import embed_image, embed_pose, embed_text
from tasks.core import manifest
from tasks.data import shard_format as fmt
from tasks.bucket import STORE as BUCKET_STORE
from tasks.bucket import BucketParams, bucket
from tasks.embed_image import EmbedImageParams
from tasks.embed_pose import EmbedPoseParams
from tasks.embed_text import EmbedTextParams
from tasks.ingest import IngestParams, ingest
from tasks.core.params import ParamsError, from_dict
from tasks.sample.__main__ import make_sample
from tasks.sample.particles import write_particle_dataset
from tasks.shard import INDEX, SHARDS, ShardParams, main, shard
from tasks.core.store import Store, read_tensors
from tests.storekit import item_bytes

M = Path("data/manifest")
S = Path("data/shards")
SMALL = BucketParams(buckets=((256, 256), (320, 192), (192, 320)))
ORDER = ("image.png", "t5.npy", "dino_cls.npy", "dino_patches.npy", "dino_scale.npy", "pose.npy", "json")


def upstream(models: Path, buckets: BucketParams = SMALL) -> None:
    ingest(IngestParams(holdout_count=2, holdout_max_fraction=0.25), workers=2)  # both splits
    bucket(buckets, workers=2)
    caption_stage.caption(caption_stage.CaptionParams(backend="sidecar"))
    embed_text.embed_text(EmbedTextParams(model=str(models / "t5")))
    embed_image.embed_image(EmbedImageParams(model=str(models / "dinov3")), workers=2)
    embed_pose.embed_pose(EmbedPoseParams(detector=str(models / "dwpose" / "yolox.onnx"),
                                          pose=str(models / "dwpose" / "dw-ll.onnx")), workers=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models) -> Path:
    root = tmp_path_factory.mktemp("shard")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        make_sample(Path("data/raw"), figures=8, photos=False, bad_examples=False)
        upstream(tiny_models)
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def data(built, chdir) -> Path:
    shutil.copytree(built / "data", chdir / "data")
    return chdir


def index() -> dict[str, dict]:
    return {r["id"]: r for r in manifest.read_table(S / "index.parquet", INDEX).to_pylist()}


def shards_table() -> list[dict]:
    return manifest.read_table(S / "shards.parquet", SHARDS).to_pylist()


def tars(out: Path = S) -> dict[str, tuple[str, int]]:
    """{path: (sha256, mtime_ns)} of every tar on disk."""
    return {p.relative_to(out).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(out.glob("*/*/*.tar"))}


def upstream_item(sid: str) -> dict:
    rows = {name: {r["id"]: r for r in manifest.read_table(M / f"{name}.parquet", schema).to_pylist()}[sid]
            for name, schema in (("bucket", manifest.BUCKET), ("caption", caption_stage.SCHEMA),
                                 ("embed_text", embed_text.SCHEMA), ("embed_image", embed_image.SCHEMA),
                                 ("embed_pose", embed_pose.SCHEMA))}
    item = {"rows": rows, "png": item_bytes(BUCKET_STORE, rows["bucket"]["key"])}
    for mod in (embed_text, embed_image, embed_pose):
        item.update(read_tensors(Store(mod.STORE, ".safetensors"), rows[mod.__name__.split(".")[-1]]["key"])[0])
    return item


def members(path: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes]]]:
    """{id: [(header, data)] in tar order}, checking the deterministic header fields."""
    out: dict[str, list] = {}
    with tarfile.open(path) as tar:
        for ti in tar.getmembers():
            assert (ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode) == (0, 0, 0, "", "", 0o644)
            out.setdefault(ti.name.split(".", 1)[0], []).append((ti, tar.extractfile(ti).read()))
    return out


def mean2x2(x: np.ndarray) -> np.ndarray:
    h, w, d = x.shape
    return x.astype(np.float32).reshape(h // 2, 2, w // 2, 2, d).mean(axis=(1, 3))


def test_members_decode_to_the_upstream_items(data):
    report = shard(ShardParams(), workers=2)
    assert (report.total, report.computed, report.reused, report.failed) == (8, 8, 0, 0)
    idx = index()
    assert len(idx) == 8 and all(r["shard"] and r["error"] is None for r in idx.values())
    assert {r["split"] for r in idx.values()} == {"train", "holdout"}
    table = shards_table()
    assert sorted(r["shard"] for r in table) == sorted(tars())
    for r in table:  # the recorded sha256 and size are the file's
        f = S / r["shard"]
        assert r["sha256"] == hashlib.sha256(f.read_bytes()).hexdigest() and r["bytes"] == f.stat().st_size
        assert r["shard"].startswith(f"{r['split']}/{r['bucket']}/shard-")
        assert r["samples"] == sum(1 for x in idx.values() if x["shard"] == r["shard"])
    people = []
    for sid, row in idx.items():
        got = members(S / row["shard"])[sid]
        assert [ti.name for ti, _ in got] == [f"{sid}.{ext}" for ext in ORDER]
        m = {ti.name.split(".", 1)[1]: data for ti, data in got}
        up = upstream_item(sid)
        b = up["rows"]["bucket"]
        assert m["image.png"] == up["png"]  # verbatim
        img = Image.open(io.BytesIO(m["image.png"]))
        assert (img.mode, img.size) == ("RGB", (b["width"], b["height"]))
        t5 = np.load(io.BytesIO(m["t5.npy"]))
        assert t5.dtype == np.float16 and np.array_equal(t5, up["hidden"])
        assert len(t5) == up["rows"]["embed_text"]["length"]
        cls = np.load(io.BytesIO(m["dino_cls.npy"]))
        assert cls.dtype == np.float16 and np.array_equal(cls, up["cls"])
        q, scale = np.load(io.BytesIO(m["dino_patches.npy"])), np.load(io.BytesIO(m["dino_scale.npy"]))
        h, w = b["height"] // 32, b["width"] // 32
        assert q.dtype == np.int8 and q.shape == (h, w, cls.shape[0])
        assert scale.dtype == np.float16 and scale.shape == (h, w)
        ref = mean2x2(up["patches"])
        err = np.abs(fmt.dequantize(q, scale) - ref)
        step = scale.astype(np.float32)[..., None]
        assert (err <= 0.5 * step + 1e-3 * np.abs(ref).max(axis=-1, keepdims=True)).all()
        assert np.abs(q).max() == 127  # the scale uses the full int8 range
        pose = np.load(io.BytesIO(m["pose.npy"]))
        assert pose.dtype == np.float16 and np.array_equal(pose, up["pose"])
        meta = json.loads(m["json"].decode("utf-8"))
        assert meta == {"format": 1, "id": sid, "caption": up["rows"]["caption"]["text"], "bucket": b["bucket"],
                        "width": b["width"], "height": b["height"], "split": b["split"],
                        "source": meta["source"], "n_people": up["rows"]["embed_pose"]["n_people"],
                        "t5_length": len(t5), "patch_pool": 2, "patch_dtype": "int8",
                        "keys": {s: up["rows"][s]["key"] for s in
                                 ("bucket", "caption", "embed_text", "embed_image", "embed_pose")}}
        assert meta["source"].startswith("data/raw/figures/figure_")
        assert hashlib.sha256(Path(meta["source"]).read_bytes()).hexdigest() == sid
        people.append(meta["n_people"])
        # The index points at the sample's first header and spans all its members.
        first, last = got[0][0], got[-1][0]
        assert row["offset"] == first.offset
        assert row["bytes"] == last.offset_data + -(-last.size // 512) * 512 - first.offset
        with open(S / row["shard"], "rb") as f:
            f.seek(row["offset"])
            assert tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape").name == f"{sid}.image.png"
    assert 0 in people  # nobody in the picture is not a missing modality


def test_webdataset_and_tarfile_read_every_sample(data):
    shard(ShardParams(), workers=2)
    urls = [str(S / r["shard"]) for r in shards_table()]
    seen = {}
    for s in wds.WebDataset(urls, shardshuffle=False).decode():
        assert set(s) - {"__key__", "__url__", "__local_path__"} == set(ORDER)
        assert isinstance(s["t5.npy"], np.ndarray) and isinstance(s["json"], dict)
        assert s["dino_patches.npy"].dtype == np.int8 and s["pose.npy"].shape == (133, 3)
        seen[s["__key__"]] = s
    assert sorted(seen) == sorted(index())
    # Plain decode() leaves PNG bytes alone; an image spec decodes them.
    rgb = next(iter(wds.WebDataset(urls[:1], shardshuffle=False).decode("rgb8")))
    assert rgb["image.png"].dtype == np.uint8 and rgb["image.png"].shape[2] == 3
    names = [n for u in urls for n in tarfile.open(u).getnames()]
    assert len(names) == 8 * len(ORDER)


@pytest.mark.parametrize("pool", [1, 2])
def test_float16_patches_are_exact(data, pool):
    shard(ShardParams(patch_pool=pool, patch_dtype="float16"), workers=2)
    for sid, row in index().items():
        m = {ti.name.split(".", 1)[1]: d for ti, d in members(S / row["shard"])[sid]}
        assert "dino_scale.npy" not in m and json.loads(m["json"])["patch_pool"] == pool
        patches, ref = np.load(io.BytesIO(m["dino_patches.npy"])), upstream_item(sid)["patches"]
        assert patches.dtype == np.float16
        expected = ref if pool == 1 else mean2x2(ref).astype(np.float16)
        assert np.array_equal(patches, expected)


def test_rerun_rewrites_nothing_and_a_new_sample_rewrites_one_shard(data, tiny_models):
    first = shard(ShardParams(min_shards=1), workers=2)
    shard(ShardParams(), out_dir=Path("d4"), workers=2)  # min_shards 4 binds in every group here
    before, before4 = tars(), tars(Path("d4"))
    again = shard(ShardParams(min_shards=1), workers=2)
    assert again.extra["shards"] == {**first.extra["shards"], "written": 0, "unchanged": len(before)}
    assert (again.computed, again.reused) == (0, 8)
    assert tars() == before  # same bytes, same mtimes: not rewritten
    # Written once, replaced never written into: DVC leaves the tars linked to its cache when the
    # stage re-runs instead of copying them all (tasks/core/storelinks.py).
    from tasks.core.store import STORE_MARKER, STORE_MARKER_TEXT

    assert (Path("data/shards") / STORE_MARKER).read_text() == STORE_MARKER_TEXT

    old = index()
    write_particle_dataset(Path("data/raw/figures"), 1, seed=0, start=8)
    upstream(tiny_models)
    report = shard(ShardParams(min_shards=1), workers=2)
    after, idx = tars(), index()
    (new,) = set(idx) - set(old)
    assert all(idx[i]["split"] == r["split"] for i, r in old.items())
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    assert changed == {idx[new]["shard"]}  # every other shard: same bytes, same mtime
    assert report.extra["shards"]["written"] == 1
    assert report.computed == sum(r["shard"] == idx[new]["shard"] for r in idx.values())

    # Where the group must grow to more shards (min_shards), one shard splits in two;
    # the other groups are untouched.
    report = shard(ShardParams(), out_dir=Path("d4"), workers=2)
    after4 = tars(Path("d4"))
    changed = {p for p in before4.keys() | after4.keys() if before4.get(p) != after4.get(p)}
    group = f"{idx[new]['split']}/{idx[new]['bucket']}/"
    assert all(p.startswith(group) for p in changed) and 1 <= len(changed) <= 3
    assert report.extra["shards"]["written"] <= 2 and report.extra["shards"]["deleted"] <= 1


def test_a_sample_without_caption_is_left_out_and_listed(data, tiny_models, caplog):
    raw = Path("data/raw/figures/figure_00003.png")
    sid = hashlib.sha256(raw.read_bytes()).hexdigest()
    raw.with_suffix(".txt").unlink()
    upstream(tiny_models)
    report = shard(ShardParams(), workers=2)
    row = index()[sid]
    assert row["shard"] is None and row["offset"] is None and row["error"].startswith("caption: ")
    assert "sidecar" in row["error"] and sid in caplog.text and "caption" in caplog.text
    assert (report.failed, report.extra["excluded_by"], report.extra["samples"]) == (1, {"caption": 1}, 7)
    assert not any(sid in members(S / r["shard"]) for r in shards_table())


def test_min_shards_and_caps(data):
    for n in (2, 4):
        groups = shard(ShardParams(min_shards=n), workers=2).extra["per_group"]
        assert any(g["samples"] < n for g in groups.values()) and any(g["samples"] > 1 for g in groups.values())
        for g in groups.values():
            assert g["shards"] == min(n, g["samples"])  # as many as asked, never an empty one
        assert all(r["samples"] >= 1 for r in shards_table())
    shard(ShardParams(max_samples=2, min_shards=1), workers=2)
    table = shards_table()
    assert max(r["samples"] for r in table) == 2
    for key, g in groups.items():
        assert sum(r["split"] + "/" + r["bucket"] == key for r in table) >= math.ceil(g["samples"] / 2)
    one = min(r["bytes"] for r in index().values())
    cap = fmt.shard_size(2 * one) - 1  # no two samples fit
    report = shard(ShardParams(max_bytes=cap, min_shards=1), workers=2)
    assert all(r["samples"] == 1 for r in shards_table()) and report.extra["shards"]["deleted"] > 0
    assert sorted(r["shard"] for r in shards_table()) == sorted(tars())  # the others are gone
    for r in shards_table():
        assert r["sha256"] == hashlib.sha256((S / r["shard"]).read_bytes()).hexdigest()


def test_bytes_per_modality(data):
    report = shard(ShardParams(), workers=2)
    got, idx = report.extra["bytes_per_sample"], index()
    parts = ("image", "t5", "dino_cls", "dino_patches", "pose", "json", "tar")
    assert abs(sum(got[k] for k in parts) - got["total"]) <= len(parts)
    sizes = {k: [] for k in ("image.png", "t5.npy", "dino_patches.npy")}
    for sid, row in idx.items():
        m = {ti.name.split(".", 1)[1]: d for ti, d in members(S / row["shard"])[sid]}
        sizes["image.png"].append(len(m["image.png"]))
        sizes["t5.npy"].append(len(m["t5.npy"]))
        sizes["dino_patches.npy"].append(len(m["dino_patches.npy"]) + len(m["dino_scale.npy"]))
    assert got["image"] == round(np.mean(sizes["image.png"])) and got["t5"] == round(np.mean(sizes["t5.npy"]))
    assert got["dino_patches"] == round(np.mean(sizes["dino_patches.npy"]))
    # The total at 1 MP from the files themselves: each shard's bytes over its samples.
    per_mp = []
    for r in shards_table():
        inside = [x for x in idx.values() if x["shard"] == r["shard"]]
        shared = (r["bytes"] - sum(x["bytes"] for x in inside)) / len(inside)
        for x in inside:
            w, h = map(int, x["bucket"].split("x"))
            per_mp.append((x["bytes"] + shared) * 1048576 / (w * h))
    assert report.extra["total_1mp_mb"] == pytest.approx(np.mean(per_mp) / 1e6, abs=1e-3)
    assert 0 < report.extra["vs_prx_tg"] < 1 and report.extra["prx_tg_1mp_mb"] > report.extra["total_1mp_mb"]
    assert report.extra["dims"] == {"t5": [64], "dino": [64]}


def test_killed_mid_way_then_run_again(data, monkeypatch):
    clean = shard(ShardParams(), out_dir=Path("clean"), workers=1)
    table = manifest.read_table(Path("clean/shards.parquet"), SHARDS).to_pylist()
    expected = {r["shard"]: r["sha256"] for r in table}
    real, calls = fmt.write_tar, []

    def dies(path, *args):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt("killed")
        return real(path, *args)

    shard(ShardParams(), workers=1)
    monkeypatch.setattr(fmt, "write_tar", dies)  # a float16 run that dies after two shards
    with pytest.raises(KeyboardInterrupt):
        shard(ShardParams(patch_dtype="float16"), workers=1)
    monkeypatch.setattr(fmt, "write_tar", real)
    tmp = next(S.glob("*/*/")) / ".shard-000000.tar.0123456789ab.tmp"
    tmp.write_bytes(b"half")  # what a SIGKILL inside a write leaves
    report = shard(ShardParams(), workers=1)
    assert {r["shard"]: r["sha256"] for r in shards_table()} == expected
    assert {p: s for p, (s, _) in tars().items()} == expected and not tmp.exists()
    assert report.extra["shards"]["written"] >= 2 and report.extra["samples"] == clean.extra["samples"]


def test_patch_pool_must_divide_the_grid(data, tiny_models):
    upstream(tiny_models, BucketParams(buckets=((208, 208),)))  # 13 x 13 patches
    with pytest.raises(SetupError, match="shard.patch_pool"):
        shard(ShardParams(), workers=2)
    assert shard(ShardParams(patch_pool=1), workers=2).extra["samples"] == 8


def test_params_are_checked_by_name(data):
    for raw, name in (({"patch_pool": 3}, "shard.patch_pool"), ({"patch_dtype": "bf16"}, "shard.patch_dtype"),
                      ({"max_bytes": 0}, "shard.max_bytes"), ({"max_sample": 5}, "shard.max_sample"),
                      ({"min_shards": "4"}, "shard.min_shards")):
        with pytest.raises((ParamsError, ValueError), match=name):
            from_dict(ShardParams, raw, "shard")
    Path("params.yaml").write_text("shard:\n  min_shards: 2\n  patch_dtype: float16\n", encoding="utf-8")
    main(["--workers", "1"])
    metrics = json.loads(Path("metrics/shard.json").read_text())  # the DVC metric: the counts only
    assert set(metrics) == {"total", "computed", "reused", "failed", "seconds"} and metrics["total"] == 8
    metrics = json.loads(Path("metrics/shard.details.json").read_text())  # the rest beside it
    assert metrics["patch_dtype"] == "float16" and metrics["total_1mp_mb"] > 0
    assert set(metrics["bytes_per_sample"]) == {"image", "t5", "dino_cls", "dino_patches", "pose", "json",
                                                "tar", "total"}

"""The training loader on local shards built by tests/shardkit.py (FORMAT of the shard stage)."""
from __future__ import annotations

import io
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
import webdataset as wds

from tasks.data.loader import FLIP_PERMUTATION, ShardError, ShardLoader, flip_sample, interleave
from tasks.sample import skeleton
from tests.shardkit import garble_member, write_dataset, truncate_in_member

COUNTS = {"64x48": 44, "48x64": 20, "32x32": 12}  # shards of 8: every bucket ends with a short shard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = write_dataset(root, COUNTS, shard_size=8, holdout={"64x48": 6}, seed=1)
    return root, samples


def train_ids(samples: dict) -> set[str]:
    return {i for i, s in samples.items() if s["split"] == "train"}


def take(loader: ShardLoader, n: int | None = None) -> list[list[str]]:
    """The ids of the next n batches (across epochs), or of the rest of the current epoch."""
    out = []
    while n is None or len(out) < n:
        for b in loader:
            out.append(b["ids"])
            if n is not None and len(out) == n:
                break
        if n is None:
            break
    return out


# ------------------------------------------------------------------ the shards themselves
def test_shard_is_readable_by_webdataset_and_tarfile(data):
    root, samples = data
    url = str(root / "train" / "64x48" / "shard-000000.tar")
    got = list(wds.WebDataset(url, shardshuffle=False))
    assert len(got) == 8
    first = got[0]
    assert {"__key__", "image.png", "t5.npy", "dino_cls.npy", "dino_patches.npy", "dino_scale.npy",
            "pose.npy", "json"} <= set(first)
    assert first["__key__"] in samples and len(first["__key__"]) == 64
    with tarfile.open(url, "r|") as tar:
        names = [m.name for m in tar]
    key = first["__key__"]
    assert names[:7] == [f"{key}.{e}" for e in ("image.png", "t5.npy", "dino_cls.npy", "dino_patches.npy",
                                                "dino_scale.npy", "pose.npy", "json")]


# ------------------------------------------------------------------ flip
def test_flip_permutation_swaps_left_and_right():
    P = FLIP_PERMUTATION
    assert P.shape == (133,) and (P[P] == np.arange(133)).all()  # an involution
    names = skeleton.KEYPOINT_NAMES
    assert names[P[names.index("left_wrist")]] == "right_wrist"
    for i, n in enumerate(names):  # body, feet and hands: exactly left_* <-> right_*
        if n.startswith(("left_", "right_")):
            other = n.replace("left_", "R_").replace("right_", "left_").replace("R_", "right_")
            assert names[P[i]] == other, n
        elif not n.startswith("face_"):
            assert P[i] == i, n
    assert (P[91:112] == np.arange(112, 133)).all() and (P[112:133] == np.arange(91, 112)).all()
    # face: the 68 iBUG points of the sample figures' (symmetric) face, mirrored, land on their partners
    face = skeleton._FACE_TEMPLATE[:68]
    assert np.allclose(face[P[23:91] - 23], face * [-1, 1, 1])


def test_flip_sample_keeps_modalities_consistent():
    rng = np.random.default_rng(0)
    H, W = 48, 64
    pose = np.zeros((133, 3), np.float16)
    col, row = 10, 20  # the left wrist's pixel; x_norm = 2x/W - 1 at the pixel centre
    pose[9] = [2 * (col + 0.5) / W - 1, 2 * (row + 0.5) / H - 1, 1.0]
    image = np.zeros((H, W, 3), np.uint8)
    image[row, col] = 255
    s = {"image": image, "pose": pose, "dino_patches": rng.integers(-127, 128, (3, 4, 8), dtype=np.int8),
         "dino_scale": rng.random((3, 4)).astype(np.float16), "t5": rng.random((5, 8)).astype(np.float16)}
    f = flip_sample(s)
    r, c = np.argwhere(f["image"][..., 0] == 255)[0]
    # the mirrored person's left wrist looks like a right wrist, at the mirrored pixel
    assert f["pose"][9, 2] == 0 and f["pose"][10, 2] == 1
    assert round((float(f["pose"][10, 0]) + 1) * W / 2 - 0.5) == c == W - 1 - col and r == row
    assert (f["dino_patches"] == s["dino_patches"][:, ::-1]).all()
    assert (f["dino_scale"] == s["dino_scale"][:, ::-1]).all()
    assert f["t5"] is s["t5"]  # text is not flipped (a known limitation: "left" in a caption stays "left")
    g = flip_sample(f)
    for k in ("image", "pose", "dino_patches", "dino_scale"):
        assert (g[k] == s[k]).all(), k


def test_loader_flip_is_consistent_per_sample(data):
    root, _ = data
    with ShardLoader(root, batch_size=4, num_workers=0, seed=3) as plain, \
            ShardLoader(root, batch_size=4, num_workers=0, seed=3, flip=1.0) as flipped:
        for a, b in zip(plain, flipped):
            assert a["ids"] == b["ids"] and b["flipped"].all() and not a["flipped"].any()
            assert torch.equal(b["image"], a["image"].flip(-1))
            assert torch.equal(b["dino_patches"], a["dino_patches"].flip(2))  # (B, h, w, D): along w
            P = torch.as_tensor(FLIP_PERMUTATION)
            assert torch.equal(b["pose"][:, :, 0], -a["pose"][:, P, 0])
            assert torch.equal(b["pose"][:, :, 1:], a["pose"][:, P, 1:])
            for k in ("t5", "t5_mask", "dino_cls"):
                assert torch.equal(a[k], b[k]), k
            assert a["captions"] == b["captions"]
    with ShardLoader(root, batch_size=4, num_workers=0, seed=3, flip=0.5) as half:
        share = torch.cat([b["flipped"] for b in half]).float().mean()
    assert 0.3 < share < 0.7


# ------------------------------------------------------------------ one epoch
def test_one_epoch_is_every_train_sample_once_in_bucket_batches(data):
    root, samples = data
    seen = []
    with ShardLoader(root, batch_size=4, num_workers=2, seed=0) as loader:
        n = len(loader)
        batches = list(loader)
        assert loader.stats()["samples"] == sum(COUNTS.values()) and loader.epoch == 1
    assert len(batches) == n
    for b in batches:
        B = len(b["ids"])
        w, h = map(int, b["bucket"].split("x"))
        assert {samples[i]["bucket"] for i in b["ids"]} == {b["bucket"]}
        assert b["image"].shape == (B, 3, h, w) and b["image"].dtype == torch.uint8
        assert b["dino_patches"].shape == (B, h // 16, w // 16, 16)
        assert b["dino_patches"].dtype == torch.float16
        assert b["t5"].dtype == torch.float16 and b["t5_mask"].dtype == torch.bool
        assert b["pose"].shape == (B, 133, 3) and b["dino_cls"].shape == (B, 16)
        for j, sid in enumerate(b["ids"]):
            s = samples[sid]
            n_tok = s["t5"].shape[0]
            assert torch.equal(b["image"][j], torch.from_numpy(s["image"]).permute(2, 0, 1))
            assert torch.equal(b["t5"][j, :n_tok], torch.from_numpy(s["t5"]))
            assert not b["t5"][j, n_tok:].any()
            assert b["t5_mask"][j].sum() == n_tok and b["t5_mask"][j, :n_tok].all()
            scale = s["dino_scale"][..., None].astype(np.float32)
            deq = (s["dino_patches"].astype(np.float32) * scale).astype(np.float16)
            assert torch.equal(b["dino_patches"][j], torch.from_numpy(deq))
            assert torch.equal(b["pose"][j], torch.from_numpy(s["pose"]))
            assert b["captions"][j] == s["caption"]
        seen += b["ids"]
    assert len(seen) == len(set(seen)) and set(seen) == train_ids(samples)


def test_holdout_split(data):
    root, samples = data
    with ShardLoader(root, split="holdout", batch_size=4, num_workers=0) as loader:
        ids = sum(take(loader), [])
    assert sorted(ids) == sorted(i for i, s in samples.items() if s["split"] == "holdout")


def test_buckets_are_drawn_in_proportion(tmp_path):
    write_dataset(tmp_path, {"16x16": 300, "32x16": 100}, shard_size=20, seed=2)
    for seed in range(3):
        with ShardLoader(tmp_path, batch_size=5, num_workers=2, seed=seed) as loader:
            buckets = [b["bucket"] for b in loader]
        assert buckets.count("16x16") == 60 and buckets.count("32x16") == 20
        for part in (buckets[:40], buckets[40:]):  # each half of the epoch holds about a quarter of 32x16
            assert 6 <= part.count("32x16") <= 14, (seed, buckets)


def test_same_seed_same_epoch_other_seed_or_epoch_differs(data):
    root, _ = data
    runs = []
    for seed in (0, 0, 1):
        with ShardLoader(root, batch_size=4, num_workers=2, seed=seed) as loader:
            runs.append(take(loader) + take(loader))  # two epochs
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
    n = len(runs[0]) // 2
    assert runs[0][:n] != runs[0][n:]  # the next epoch is another order


# ------------------------------------------------------------------ resume
@pytest.mark.parametrize("k", [0, 1, 6, 18, 19, 23])
def test_resume_continues_exactly(data, k):
    root, samples = data
    kw = dict(batch_size=4, num_workers=2, seed=5, flip=0.5, shuffle_buffer=10)
    with ShardLoader(root, **kw) as loader:
        n = len(loader)
        assert n == 19  # 11 + 5 + 3, every worker/bucket stream ends with a short batch or none
        whole = take(loader, 2 * n)
    with ShardLoader(root, **kw) as first:
        head = take(first, k)
        state = first.state_dict()
    assert state["epoch"] == k // n and state["batches"] == k % n or (k == n and state["batches"] == n)
    with ShardLoader(root, **kw) as second:
        second.load_state_dict(state)
        tail = take(second, 2 * n - k)
    assert head + tail == whole
    for e in range(2):
        ids = sum(whole[e * n:(e + 1) * n], [])
        assert len(ids) == len(set(ids)) and set(ids) == train_ids(samples)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_resume_with_three_workers_some_idle(data):
    """Rounds where a worker has finished, and a rank whose workers outnumber its shards of a bucket."""
    root, _ = data
    kw = dict(batch_size=4, num_workers=3, seed=11, rank=1, world_size=2, shuffle_buffer=5)
    with ShardLoader(root, **kw) as loader:
        n = len(loader)
        whole = take(loader, n + 3)
    for k in (1, 2, 5, n - 2, n + 1):
        with ShardLoader(root, **kw) as first:
            head = take(first, k)
            state = first.state_dict()
        with ShardLoader(root, **kw) as second:
            second.load_state_dict(state)
            assert head + take(second, n + 3 - k) == whole, k


def test_resume_gives_identical_tensors(data):
    root, _ = data
    kw = dict(batch_size=4, num_workers=2, seed=7, flip=0.5)
    with ShardLoader(root, **kw) as a:
        take(a, 5)
        state = a.state_dict()
        nxt = next(iter(a))
    with ShardLoader(root, **kw) as b:
        b.load_state_dict(state)
        again = next(iter(b))
    for key in ("image", "t5", "t5_mask", "dino_cls", "dino_patches", "pose", "flipped"):
        assert torch.equal(nxt[key], again[key]), key
    assert nxt["ids"] == again["ids"]


def test_state_is_refused_by_a_loader_with_other_settings(data):
    root, _ = data
    with ShardLoader(root, batch_size=4, num_workers=0) as a:
        state = a.state_dict()
    with ShardLoader(root, batch_size=8, num_workers=0) as b:
        with pytest.raises(ValueError, match="batch_size"):
            b.load_state_dict(state)


# ------------------------------------------------------------------ ranks
def test_ranks_split_every_sample_to_exactly_one_rank(data):
    root, samples = data
    for epoch in (0, 1):
        per_rank = []
        for rank in (0, 1):
            with ShardLoader(root, batch_size=4, num_workers=2, seed=0, rank=rank, world_size=2) as loader:
                loader.set_epoch(epoch)
                n, per = len(loader), loader.batches_per_rank()
                batches = take(loader)
                assert len(batches) == n == per[rank]
                per_rank.append(sum(batches, []))
        a, b = map(set, per_rank)
        assert not a & b and a | b == train_ids(samples)
        assert len(a) + len(b) == sum(len(r) for r in per_rank)


def test_interleave_matches_torch_round_robin():
    assert interleave([2, 4, 1]) == [0, 1, 2, 0, 1, 1, 1]
    assert interleave([0, 2]) == [1, 1]


# ------------------------------------------------------------------ errors
def keys_in(path) -> list[str]:
    with tarfile.open(path) as tar:
        return [m.name.split(".")[0] for m in tar if m.name.endswith(".json")]


def corrupt_copy(src, dst):
    """A copy with one shard cut inside its 4th sample's t5.npy, and another shard's 3rd sample's
    dino_patches.npy garbled; returns (the cut shard's keys in order, the garbled sample's key)."""
    shutil.copytree(src, dst)
    cut, garbled = dst / "train/64x48/shard-000001.tar", dst / "train/48x64/shard-000000.tar"
    order, bad = keys_in(cut), keys_in(garbled)[2]
    truncate_in_member(cut, f"{order[3]}.t5.npy")
    garble_member(garbled, f"{bad}.dino_patches.npy")
    return order, bad


def test_corrupt_shard_error_names_shard_and_member(data, tmp_path):
    root, samples = data
    order, bad = corrupt_copy(root, tmp_path / "c")
    for workers in (0, 2):
        with ShardLoader(tmp_path / "c", batch_size=4, num_workers=workers) as loader:
            with pytest.raises(ShardError) as err:
                list(loader)
        msg = str(err.value)
        assert ("train/64x48/shard-000001.tar" in msg and f"{order[3]}.t5.npy" in msg) or \
               ("train/48x64/shard-000000.tar" in msg and f"{bad}.dino_patches.npy" in msg), msg


def test_skip_policy_counts_and_reports(data, tmp_path, caplog):
    root, samples = data
    order, bad = corrupt_copy(root, tmp_path / "c")
    lost = set(order[3:]) | {bad}  # the cut shard's rest, and the garbled sample
    kw = dict(batch_size=4, num_workers=2, seed=0, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="niche.loader"):
        with ShardLoader(tmp_path / "c", **kw) as loader:
            whole = take(loader)
            stats = loader.stats()
    ids = sum(whole, [])
    assert set(ids) == train_ids(samples) - lost and len(ids) == len(set(ids))
    assert stats["samples_skipped"] == len(lost) and stats["errors"] == 2
    assert any(f"{order[3]}.t5.npy" in e for e in stats["recent_errors"])
    assert any(f"{bad}.dino_patches.npy" in e for e in stats["recent_errors"])
    assert "train/64x48/shard-000001.tar" in caplog.text and "skipped 5 sample(s)" in caplog.text
    # resume over the damage: the same sequence, nothing counted twice
    with ShardLoader(tmp_path / "c", **kw) as first:
        head = take(first, 7)
        state = first.state_dict()
    with ShardLoader(tmp_path / "c", **kw) as second:
        second.load_state_dict(state)
        tail = take(second)
        assert second.stats()["samples_skipped"] == len(lost)
    assert [b for b in head + tail if b] == [b for b in whole if b]
    # batches of one: a batch whose sample is lost is planned and counted, not yielded
    with ShardLoader(tmp_path / "c", **dict(kw, batch_size=1)) as ones:
        n = len(ones)
        assert len(take(ones)) == n - len(lost) and ones.state_dict()["epoch"] == 1


def test_bad_parameters_are_refused(data, tmp_path):
    root, _ = data
    with pytest.raises(ValueError, match="flip"):
        ShardLoader(root, flip=1.5)
    with pytest.raises(ValueError, match="rank"):
        ShardLoader(root, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shards.parquet"):
        ShardLoader(tmp_path)
    with pytest.raises(ValueError, match="split"):
        ShardLoader(root, split="nope")


# ------------------------------------------------------------------ the real shard stage
def test_reads_what_the_shard_stage_writes(tiny_models, chdir):
    """Figures through the real stages (tiny models) and tasks/shard.py, then one epoch of each split."""
    from pathlib import Path

    import pyarrow.parquet as pq
    from PIL import Image

    from tasks import caption, embed_image, embed_pose, embed_text
    from tasks.bucket import STORE, BucketParams, bucket
    from tests.storekit import item_bytes
    from tasks.ingest import IngestParams, ingest
    from tasks.sample.__main__ import make_sample
    from tasks.shard import ShardParams, shard

    make_sample(Path("data/raw"), figures=10, photos=False, bad_examples=False)
    ingest(IngestParams(holdout_count=2, holdout_max_fraction=0.25), workers=2)
    bucket(BucketParams(buckets=((256, 256), (320, 192), (192, 320))), workers=2)
    caption.caption(caption.CaptionParams(backend="sidecar"))
    embed_text.embed_text(embed_text.EmbedTextParams(model=str(tiny_models / "t5")))
    embed_image.embed_image(embed_image.EmbedImageParams(model=str(tiny_models / "dinov3")), workers=2)
    dw = tiny_models / "dwpose"
    pose = embed_pose.EmbedPoseParams(detector=str(dw / "yolox.onnx"), pose=str(dw / "dw-ll.onnx"))
    embed_pose.embed_pose(pose, workers=2)
    shard(ShardParams(max_samples=3, min_shards=1, patch_pool=2), workers=2)
    index = [r for r in pq.read_table("data/shards/index.parquet").to_pylist() if r["shard"]]
    captions = {r["id"]: r["text"] for r in pq.read_table("data/manifest/caption.parquet").to_pylist()}
    png = {r["id"]: item_bytes(STORE, r["key"]) for r in pq.read_table("data/manifest/bucket.parquet").to_pylist()}
    for split in ("train", "holdout"):
        with ShardLoader("data/shards", split=split, batch_size=2, num_workers=2, flip=0.5) as loader:
            ids = []
            for b in loader:
                w, h = map(int, b["bucket"].split("x"))
                assert b["dino_patches"].shape[1:3] == (h // 32, w // 32)  # 2x2-pooled DINOv3 grid
                for j, sid in enumerate(b["ids"]):
                    image = torch.from_numpy(np.array(Image.open(io.BytesIO(png[sid])).convert("RGB"))).permute(2, 0, 1)
                    assert torch.equal(b["image"][j], image.flip(-1) if b["flipped"][j] else image)
                    assert b["captions"][j] == captions[sid]
                ids += b["ids"]
        assert sorted(ids) == sorted(r["id"] for r in index if r["split"] == split)

"""Images a curator rejected: ingest marks them split "rejected" (folders and a
list file), the holdout ignores them, bucket keeps them for the negative SDXL
LoRA, and the NanoDiT side (caption, embeddings, shards) never sees them."""
from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.hub import SetupError
from tasks import caption as caption_stage
from tasks import embed_image, embed_pose, embed_text, ingest as ingest_stage
from tasks.bucket import BucketParams, bucket
from tasks.ingest import IngestParams, ingest
from tasks.core.params import from_dict
from tests.storekit import store_of
from tasks.sample.__main__ import main as sample_main
from tasks.sample.__main__ import make_sample
from tasks.sample.rejects import write_rejects
from tasks.shard import ShardParams, shard

M = Path("data/manifest")
SMALL = BucketParams(buckets=((256, 256), (320, 192), (192, 320)))


def _rows(name: str, folder: Path = M) -> list[dict]:
    return pq.read_table(folder / f"{name}.parquet").to_pylist()


def _by_path() -> dict[str, dict]:
    return {r["path"]: r for r in _rows("ingest")}


def _figure(i: int) -> str:
    return next(p.as_posix() for p in Path("data/raw/figures").glob(f"figure_{i:05d}.*") if p.suffix != ".txt"
                and not p.name.endswith(".pose.json"))


@pytest.fixture
def dataset(chdir) -> dict[str, str]:
    return make_sample(Path("data/raw"), figures=6, seed=0, photos=False, bad_examples=True, rejects=4)


def test_rejects_get_their_split_and_a_corrupt_one_is_quarantined(dataset):
    report = ingest(IngestParams(holdout_count=25, holdout_max_fraction=0.5), workers=2)
    rows = _by_path()
    rejected = {p for p, r in rows.items() if r["split"] == "rejected"}
    assert rejected == {f"data/raw/rejected/reject_{i:05d}.{'jpg' if i % 3 == 1 else 'png'}" for i in range(4)}
    quarantine = {r["path"]: r for r in _rows("quarantine")}
    broken = "data/raw/rejected/broken_reject.png"
    assert dataset[broken] == "corrupt" and quarantine[broken]["reason"] == "corrupt"
    assert broken not in rows  # a corrupt reject is not a reject: nothing downstream sees it
    # Holdout: a share of the 7 approved images (6 figures + problems/bad_caption.png), never a reject.
    approved = [r for r in rows.values() if r["split"] != "rejected"]
    holdout = [r for r in approved if r["split"] == "holdout"]
    assert len(approved) == 7 and len(holdout) == int(7 * 0.5) == 3  # of all 11 samples it would be 5
    assert report.extra["rejected"] == 4 and report.extra["holdout"] == 3 and report.extra["train"] == 4
    assert report.extra["samples"] == 11 and report.extra["approved_and_rejected"] == 0


def test_adding_rejects_moves_no_approved_image_between_splits(chdir):
    make_sample(Path("data/raw"), figures=12, photos=False, bad_examples=False)
    p = IngestParams(holdout_count=3, holdout_max_fraction=0.5)
    ingest(p, workers=2)
    before = {r["id"]: r["split"] for r in _rows("ingest")}
    write_rejects("data/raw/rejected", 30)  # 2.5x the approved ones
    ingest(p, workers=2)
    after = {r["id"]: r["split"] for r in _rows("ingest")}
    assert {i: s for i, s in after.items() if s != "rejected"} == before
    assert sum(s == "rejected" for s in after.values()) == 30


def test_rejected_list_marks_files_anywhere_and_warns_on_missing_ones(dataset, caplog):
    lst = Path("data/raw/rejected_list.txt")  # inside the source, so DVC sees its edits
    lst.write_text(f"# rejected on review\n\n{_figure(1)}\n  ./{_figure(2)}  \n"
                   "data/raw/figures/gone.png\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="niche.ingest"):
        report = ingest(IngestParams(rejected_list=lst.as_posix()), workers=2)
    rows = _by_path()
    assert rows[_figure(1)]["split"] == rows[_figure(2)]["split"] == "rejected"
    assert rows[_figure(0)]["split"] != "rejected"
    assert report.extra["rejected"] == 4 + 2  # the folder's and the list's
    assert any("data/raw/figures/gone.png" in m and "ingest.rejected_list" in m for m in caplog.messages)
    # The list is no image and no orphan caption: it is not an input at all.
    assert lst.as_posix() not in rows and lst.as_posix() not in {r["path"] for r in _rows("quarantine")}


def test_a_missing_rejected_list_is_refused_naming_the_key(dataset, tmp_path):
    with pytest.raises(SetupError, match=r"ingest\.rejected_list: nope\.txt"):
        ingest(IngestParams(rejected_list="nope.txt"), workers=2)
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  rejected_list: nope.txt\n")
    with pytest.raises(SystemExit) as e:  # the command: one line, no traceback
        ingest_stage.main(["--params", str(params)])
    assert "ingest.rejected_list" in str(e.value.code)


def test_the_same_bytes_approved_and_rejected_stay_approved(dataset, caplog):
    # The approved copy sorts after the rejected one, so path order alone would pick the reject.
    Path("data/raw/zz_kept").mkdir()
    shutil.copy("data/raw/rejected/reject_00000.png", "data/raw/zz_kept/keeper.png")
    with caplog.at_level(logging.WARNING, logger="niche.ingest"):
        report = ingest(IngestParams(), workers=2)
    rows = _by_path()
    kept = rows["data/raw/zz_kept/keeper.png"]
    assert kept["split"] in ("train", "holdout")
    assert kept["duplicates"] == ["data/raw/rejected/reject_00000.png"]
    assert "data/raw/rejected/reject_00000.png" not in rows
    q = {r["path"]: r for r in _rows("quarantine")}["data/raw/rejected/reject_00000.png"]
    assert q["reason"] == "duplicate" and "data/raw/zz_kept/keeper.png" in q["detail"]
    assert report.extra["rejected"] == 3 and report.extra["approved_and_rejected"] == 1
    assert any("data/raw/zz_kept/keeper.png" in m and "data/raw/rejected/reject_00000.png" in m
               for m in caplog.messages)


def test_a_rejected_folder_outside_the_sources_is_walked_too(chdir, caplog):
    make_sample(Path("data/raw"), figures=3, photos=False, bad_examples=False)
    write_rejects("elsewhere/rejects", 2)
    with caplog.at_level(logging.WARNING, logger="niche.ingest"):
        ingest(IngestParams(rejected=("elsewhere/rejects", "data/raw/not_there")), workers=2)
    rejected = [r for r in _rows("ingest") if r["split"] == "rejected"]
    assert sorted(r["path"] for r in rejected) == ["elsewhere/rejects/reject_00000.png",
                                                   "elsewhere/rejects/reject_00001.jpg"]
    assert {r["source"] for r in rejected} == {"elsewhere/rejects"}
    # A missing folder the user named is worth a warning; the default one is not.
    assert any("ingest.rejected[1]" in m and "data/raw/not_there" in m for m in caplog.messages)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="niche.ingest"):
        ingest(IngestParams(), workers=2)
    assert not [m for m in caplog.messages if "ingest.rejected" in m]
    assert all(r["split"] != "rejected" for r in _rows("ingest"))


def test_a_rejected_folder_holding_a_source_is_refused():
    with pytest.raises(ValueError, match=r"ingest\.rejected\[0\].*contains the source data/raw"):
        from_dict(IngestParams, {"rejected": ["data"]}, "ingest")
    assert from_dict(IngestParams, {"rejected": [], "rejected_list": None}, "ingest").rejected == ()


# ---------------------------------------------------------------- downstream

@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_models) -> tuple[Path, dict]:
    """6 figures + 3 rejects through every stage up to shard, with the tiny models."""
    root = tmp_path_factory.mktemp("rejects")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        make_sample(Path("data/raw"), figures=6, photos=False, bad_examples=False, rejects=3)
        reports = {"ingest": ingest(IngestParams(holdout_count=2, holdout_max_fraction=0.4), workers=2),
                   "bucket": bucket(SMALL, workers=2),
                   "caption": caption_stage.caption(caption_stage.CaptionParams(backend="sidecar")),
                   "embed_text": embed_text.embed_text(embed_text.EmbedTextParams(model=str(tiny_models / "t5"))),
                   "embed_image": embed_image.embed_image(
                       embed_image.EmbedImageParams(model=str(tiny_models / "dinov3")), workers=2),
                   "embed_pose": embed_pose.embed_pose(embed_pose.EmbedPoseParams(
                       detector=str(tiny_models / "dwpose" / "yolox.onnx"),
                       pose=str(tiny_models / "dwpose" / "dw-ll.onnx")), workers=2),
                   "shard": shard(ShardParams(min_shards=1), workers=2)}
    finally:
        os.chdir(cwd)
    return root, reports


def test_bucket_keeps_rejects_and_the_nanodit_stages_skip_them(built):
    root, reports = built
    m = root / M
    rejects = {r["id"] for r in _rows("ingest", m) if r["split"] == "rejected"}
    approved = {r["id"] for r in _rows("ingest", m)} - rejects
    assert len(rejects) == 3 and len(approved) == 6
    buckets = {r["id"]: r for r in _rows("bucket", m)}
    assert set(buckets) == rejects | approved
    assert all(buckets[i]["error"] is None and buckets[i]["split"] == "rejected" for i in rejects)
    assert all(store_of(root / "data/derived/bucket").has(buckets[i]["key"]) for i in rejects)
    assert reports["bucket"].extra["rejected"] == 3
    for stage in ("caption", "embed_text", "embed_image", "embed_pose"):
        assert {r["id"] for r in _rows(stage, m)} == approved, stage
        # Skipped, not failed: their absence costs nothing and flags nothing.
        assert reports[stage].failed == 0 and reports[stage].total == 6, stage
    assert reports["shard"].failed == 0 and reports["shard"].extra["samples"] == 6


def test_shards_never_hold_a_reject(built):
    root, reports = built
    rejects = {r["id"] for r in _rows("ingest", root / M) if r["split"] == "rejected"}
    shards = root / "data/shards"
    index = _rows("index", shards)
    assert len(index) == 6 and not rejects & {r["id"] for r in index}
    assert all(r["shard"] is not None and r["error"] is None for r in index)
    tars = sorted(shards.glob("*/*/shard-*.tar"))
    assert tars and {t.parts[-3] for t in tars} == {"train", "holdout"}
    ids = set()
    for t in tars:
        with tarfile.open(t) as tar:
            for member in tar.getmembers():
                ids.add(member.name.split(".", 1)[0])
                if member.name.endswith(".json"):
                    assert json.loads(tar.extractfile(member).read())["split"] != "rejected"
    assert len(ids) == 6 and not ids & rejects


def test_sample_command_writes_rejects_and_one_corrupt_file(chdir):
    sample_main(["--out", "data/raw", "--figures", "2", "--rejects", "3", "--bad-examples"])
    rejected = sorted(p.name for p in Path("data/raw/rejected").iterdir())
    assert rejected == ["broken_reject.png", "reject_00000.png", "reject_00001.jpg", "reject_00002.png"]
    first = {n: (Path("data/raw/rejected") / n).read_bytes() for n in rejected}
    shutil.rmtree("data/raw/rejected")
    sample_main(["--out", "data/raw", "--figures", "2", "--rejects", "3"])  # the same seed, no bad examples
    again = {p.name: p.read_bytes() for p in Path("data/raw/rejected").iterdir()}
    assert again == {n: b for n, b in first.items() if n != "broken_reject.png"}
    report = ingest(IngestParams(), workers=2)
    assert report.extra["rejected"] == 3

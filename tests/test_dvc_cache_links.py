"""The DVC cache links instead of copying: after `dvc repro` a tracked output and its cache
object are one file on disk (cache.type hardlink, set by flows.scaffold as in this checkout's
.dvc/config), re-runs never touch a cache object, and push / pull into an empty cache links too.

Real scratch repos (flows.scaffold), the two cheapest stages (ingest, bucket) on a few
particle figures."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from flows.scaffold import scaffold
from tasks.sample.particles import write_particle_dataset
from tests.conftest import BIN, run

pytestmark = pytest.mark.slow
FIGURES = 4
OUTS = ("data/derived/bucket", "data/manifest")  # what the two stages track in the cache


def dvc(root: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], root).stdout


def files(root: Path, *dirs: str) -> list[Path]:
    return [p for d in dirs for p in sorted((root / d).rglob("*")) if p.is_file()]


def cache_objects(root: Path) -> dict[str, Path]:
    """{md5: path} of every object in the repo's cache (a .dir object's md5 ends in .dir)."""
    base = root / ".dvc/cache/files/md5"
    return {p.parent.name + p.name: p for p in base.glob("??/*")}


def on_disk(paths: list[Path]) -> int:
    """Bytes the files take on disk, a hardlinked file counted once (as `du` counts)."""
    seen = {}
    for p in paths:
        st = p.stat()
        seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def unique_content(paths: list[Path]) -> int:
    """Bytes of the distinct contents among the files: what one copy of everything needs."""
    return sum({hashlib.md5(p.read_bytes()).hexdigest(): p.stat().st_size for p in paths}.values())


def linked_ratio(root: Path) -> float:
    everything = files(root, *OUTS, ".dvc/cache")
    return on_disk(everything) / unique_content(everything)


def assert_linked(root: Path, out: str) -> None:
    """Every file of directory output `out` is its cache object itself (same inode)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    md5 = next(o["md5"] for s in lock["stages"].values() for o in s.get("outs", []) if o["path"] == out)
    objects = cache_objects(root)
    entries = json.loads(objects[md5].read_text())
    assert entries and len(entries) == len(files(root, out)), (entries, files(root, out))
    for e in entries:
        ws, obj = (root / out / e["relpath"]).stat(), objects[e["md5"]].stat()
        assert (ws.st_ino, ws.st_dev) == (obj.st_ino, obj.st_dev) and ws.st_nlink >= 2, e["relpath"]


def assert_cache_intact(root: Path) -> None:
    """Each cache object's bytes still hash to its name: nothing wrote into one."""
    for md5, p in cache_objects(root).items():
        assert hashlib.md5(p.read_bytes()).hexdigest() == md5.removesuffix(".dir"), p


def repro_bucket(root: Path) -> int:
    """`dvc repro bucket`; the items bucket computed (0 if it did not run)."""
    out = dvc(root, "repro", "bucket")
    if "Running stage 'bucket'" not in out:
        return 0
    return json.loads((root / "metrics/bucket.json").read_text())["computed"]


@pytest.fixture
def built(tmp_path):
    """A scaffolded repo after its first `dvc repro bucket`."""
    root = scaffold(tmp_path / "repo")
    write_particle_dataset(root / "data/raw/figures", FIGURES, seed=0)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    assert dvc(root, "config", "cache.type").strip() == "hardlink"
    assert repro_bucket(root) == FIGURES
    return root


def test_repro_links_outputs_to_the_cache_and_a_rerun_leaves_cache_objects_alone(built):
    root = built
    # Without links this is 2.0: every output file has a twin in the cache.
    assert linked_ratio(root) <= 1.1
    assert_linked(root, "data/derived/bucket")
    assert os.stat(root / "data/manifest/bucket.parquet").st_nlink >= 2
    before = {md5: (p.stat().st_ino, hashlib.sha256(p.read_bytes()).hexdigest())
              for md5, p in cache_objects(root).items()}
    old_items = set(files(root, "data/derived/bucket"))

    doc = yaml.safe_load((root / "params.yaml").read_text())
    # 64 px less each way: every image gets a new key and new bytes (a resampling change
    # alone keeps the bytes of images already at their bucket's size).
    doc["bucket"]["buckets"] = [[w - 64, h - 64] for w, h in doc["bucket"]["buckets"]]
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert repro_bucket(root) == FIGURES

    after = cache_objects(root)
    for md5, (ino, digest) in before.items():
        assert (after[md5].stat().st_ino, hashlib.sha256(after[md5].read_bytes()).hexdigest()) == (ino, digest)
    assert_cache_intact(root)
    # The persisted store keeps the old items beside the new ones, all of them linked (a store is
    # not unprotected before its stage re-runs: tasks/core/storelinks.py, the test below).
    assert old_items < set(files(root, "data/derived/bucket"))
    assert_linked(root, "data/derived/bucket")
    assert linked_ratio(root) <= 1.1


# Run first in the stage's command: what the stage finds when it starts, i.e. after DVC's
# Stage.remove_outs (→ Output.unprotect) and before bucket writes anything.
PROBE = """import json, os, sys
from pathlib import Path
seen = {}
for d in ("data/derived/bucket", "data/manifest", ".dvc/cache"):
    for p in Path(d).rglob("*"):
        if p.is_file():
            st = p.stat()
            seen[str(p)] = [st.st_ino, st.st_nlink, st.st_size]
Path(sys.argv[1]).write_text(json.dumps(seen))
"""


def rerun_probed(root: Path, probe_out: Path, shrink: int) -> dict[str, list[int]]:
    """Every bucket `shrink` px smaller (new keys and bytes for every item), `dvc repro bucket`
    with PROBE run first: {path: [inode, nlink, size]} of store + manifests + cache as the stage
    started."""
    probe = probe_out.with_suffix(".py")
    probe.write_text(PROBE)
    stages = yaml.safe_load((root / "dvc.yaml").read_text())
    stages["stages"]["bucket"]["cmd"] = f"python {probe} {probe_out} && python -m tasks.bucket"
    (root / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    doc = yaml.safe_load((root / "params.yaml").read_text())
    doc["bucket"]["buckets"] = [[w - shrink, h - shrink] for w, h in doc["bucket"]["buckets"]]
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    assert repro_bucket(root) == FIGURES
    return json.loads(probe_out.read_text())


def test_a_rerun_leaves_the_store_linked_and_copies_only_an_unmarked_one(built, tmp_path):
    """DVC unprotects (copies) a persisted out before its stage re-runs; a folder holding the
    Store's marker is left alone (tasks/core/storelinks.py): nothing copied, no disk peak."""
    from tasks.core.store import STORE_MARKER

    root = built
    store = root / "data/derived/bucket"
    assert (store / STORE_MARKER).is_file()
    assert_linked(root, "data/derived/bucket")
    old = {str(p.relative_to(root)): p.stat().st_ino for p in files(root, "data/derived/bucket")}
    assert f"data/derived/bucket/{STORE_MARKER}" in old

    seen = rerun_probed(root, tmp_path / "marked.json", 64)
    # As the stage started, and after it: each old file is still its cache object (same inode).
    assert {p: seen[p][0] for p in old} == old
    assert all(seen[p][1] >= 2 for p in old)
    assert {str(p.relative_to(root)): p.stat().st_ino for p in files(root, "data/derived/bucket")
            if str(p.relative_to(root)) in old} == old
    assert_linked(root, "data/derived/bucket")
    assert_cache_intact(root)
    # No second copy of the store at any point: at the stage's start (where DVC's unprotect had
    # copied it) and after.
    content = unique_content(files(root, *OUTS, ".dvc/cache"))
    at_start = sum({ino: size for ino, _, size in seen.values()}.values())
    assert at_start <= 1.1 * content and linked_ratio(root) <= 1.1, (at_start, content)
    assert "up to date" in dvc(root, "status", "bucket")

    # The same store without its marker gets DVC's own unprotect: copies, then linked back.
    (store / STORE_MARKER).unlink()
    old = {str(p.relative_to(root)): p.stat().st_ino for p in files(root, "data/derived/bucket")}
    seen = rerun_probed(root, tmp_path / "unmarked.json", 128)
    assert all(seen[p][0] != ino and seen[p][1] == 1 for p, ino in old.items()), "the unmarked store was not copied"
    assert (store / STORE_MARKER).is_file()  # bucket wrote it again
    assert_linked(root, "data/derived/bucket")
    assert_cache_intact(root)
    assert "up to date" in dvc(root, "status", "bucket")


def test_push_and_pull_into_an_empty_cache_links_the_same_bytes(built, s3_endpoint, tmp_path):
    import boto3

    root = built
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="niche-links")
    dvc(root, "remote", "add", "-d", "storage", "s3://niche-links/dvc")
    dvc(root, "remote", "modify", "storage", "endpointurl", s3_endpoint)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "dataset v1"], root)
    dvc(root, "push", "-q")
    originals = {p.relative_to(root): p.read_bytes() for p in files(root, *OUTS)}

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    dvc(clone, "config", "--local", "core.site_cache_dir", str(clone / ".dvc" / "site"))
    assert not cache_objects(clone)
    dvc(clone, "pull", "-q", "ingest", "bucket")
    assert {p.relative_to(clone): p.read_bytes() for p in files(clone, *OUTS)} == originals
    assert_linked(clone, "data/derived/bucket")
    assert linked_ratio(clone) <= 1.1
    assert_cache_intact(clone)


def test_the_negative_stage_note_replaces_a_linked_file_instead_of_writing_into_it(chdir, monkeypatch):
    """train_wrong with no rejects rewrites its note over last run's, which is a cache object."""
    from tasks import train_lora
    from tasks.sdxl.data import NoSamples

    # What LoraTrainer raises on a dataset without rejects; the real path is in test_train_lora
    # (it imports peft first: 15 s here).
    def no_rejects(p):
        raise NoSamples("train_wrong.split: no usable sample")

    monkeypatch.setattr(train_lora, "LoraTrainer", no_rejects)
    Path("params.yaml").write_text("train_wrong: {}\n")
    cached = Path("cache-object")
    cached.write_text("the note of an earlier run\n")
    note = Path("runs/sdxl-wrong/checkpoints/NO_SAMPLES.txt")
    note.parent.mkdir(parents=True)
    os.link(cached, note)  # what `dvc repro` leaves with cache.type hardlink
    train_lora.main(["--section", "train_wrong"])
    assert "no usable sample" in note.read_text()
    assert cached.read_text() == "the note of an earlier run\n"

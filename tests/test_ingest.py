import errno
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.ingest import IngestParams, ingest
from tasks.sample.__main__ import make_sample
from tasks.sample.particles import write_particle_dataset
from tests.rawkit import make_odd_entries, no_hang, png

M = Path("data/manifest")


def _rows(name):
    return pq.read_table(M / f"{name}.parquet").to_pylist()


@pytest.fixture
def dataset(chdir):
    expected = make_sample(Path("data/raw"), figures=6, seed=0, photos=True, bad_examples=True)
    return expected


def test_quarantine_names_every_bad_file_with_its_reason(dataset):
    report = ingest(IngestParams(), workers=2)
    quarantine = {r["path"]: r for r in _rows("quarantine")}
    for path, reason in dataset.items():
        assert path in quarantine, f"{path} not quarantined"
        assert quarantine[path]["reason"] == reason, (path, quarantine[path])
        assert quarantine[path]["detail"]
    # Photos under min_side 512 are refused too, and nothing else is.
    too_small = {p for p, r in quarantine.items() if r["reason"] == "too_small"}
    assert too_small == {"data/raw/problems/tiny.png", "data/raw/photos/chelsea.jpg",
                         "data/raw/photos/coffee.jpg"}
    assert set(quarantine) == set(dataset) | too_small
    # Left in place: quarantine lists, never moves or deletes.
    assert all(os.path.lexists(p) for p in quarantine)
    assert report.extra["quarantined"] == len(quarantine)


def test_manifest_rows_describe_each_sample(dataset):
    ingest(IngestParams(), workers=2)
    rows = {r["path"]: r for r in _rows("ingest")}
    fig = rows["data/raw/figures/figure_00000.png"] if "data/raw/figures/figure_00000.png" in rows \
        else rows["data/raw/figures/figure_00000.jpg"]
    assert fig["caption"] and fig["caption_path"].endswith(".txt")
    assert fig["duplicates"] == [p for p, r in dataset.items() if r == "duplicate"]
    modes = {Path(p).name: (r["mode"], r["orientation"]) for p, r in rows.items()}
    assert modes["logo.png"][0] == "RGBA" and modes["astronaut_palette.png"][0] == "P"
    assert modes["camera_16bit.png"][0].startswith("I") and modes["astronaut_cmyk.jpg"][0] == "CMYK"
    hub = rows["data/raw/photos/hubble_deep_field_exif.jpg"]
    assert hub["orientation"] == 6 and (hub["width"], hub["height"]) == (1000, 872)  # upright
    kept = rows["data/raw/problems/bad_caption.png"]
    assert kept["caption"] is None  # its caption file was quarantined, the image kept
    import hashlib
    for p, r in rows.items():
        assert r["id"] == hashlib.sha256(Path(p).read_bytes()).hexdigest()


def test_split_follows_content_not_names(dataset):
    p = IngestParams(holdout_count=3, holdout_max_fraction=0.5)
    ingest(p, workers=2)
    before = {r["id"]: (r["split"], r["path"]) for r in _rows("ingest")}
    assert sum(s == "holdout" for s, _ in before.values()) == 3
    # Rename every figure: ids and splits stay.
    figs = Path("data/raw/figures")
    for f in sorted(figs.iterdir()):
        f.rename(figs / f"renamed_{f.name}")
    ingest(p, workers=2)
    after = {r["id"]: (r["split"], r["path"]) for r in _rows("ingest")}
    assert {i: s for i, (s, _) in after.items()} == {i: s for i, (s, _) in before.items()}
    assert any("renamed_" in path for _, path in after.values())


def test_holdout_is_capped_for_small_datasets(dataset):
    r = ingest(IngestParams(holdout_count=25, holdout_max_fraction=0.1), workers=2)
    assert r.extra["holdout"] == int(r.extra["samples"] * 0.1)


def test_rerun_probes_only_new_files(dataset):
    first = ingest(IngestParams(), workers=2)
    assert first.computed == first.total and first.reused == 0
    again = ingest(IngestParams(), workers=2)
    assert again.computed == 0 and again.reused == first.total
    write_particle_dataset(Path("data/raw/figures"), 2, seed=0, start=6)
    more = ingest(IngestParams(), workers=2)
    assert more.computed == 2 and more.reused == first.total
    # min_side applies to recorded sizes: changing it re-probes nothing.
    assert ingest(IngestParams(min_side=256), workers=2).computed == 0
    assert "data/raw/photos/chelsea.jpg" not in {r["path"] for r in _rows("quarantine")}


def test_metrics_json_holds_the_counts(dataset):
    r = ingest(IngestParams(), workers=2)
    path = r.write(Path("metrics"))
    m, details = json.loads(path.read_text()), json.loads(Path("metrics/ingest.details.json").read_text())
    assert m == {"total": r.total, "computed": r.computed, "reused": r.reused, "failed": r.failed,
                 "seconds": round(r.seconds, 3)}  # the DVC metric: the counts; the rest beside it
    assert details["samples"] == r.extra["samples"] and details["quarantine_by_reason"]["corrupt"] == 2


def test_missing_source_folder_is_named(chdir):
    with pytest.raises(FileNotFoundError, match="data/elsewhere"):
        ingest(IngestParams(sources=("data/elsewhere",)))


# --- Nothing in data/raw stops the stage (see tasks/core/rawfs.py) ---------------------------

@pytest.fixture
def odd_raw(chdir):
    """Two figures, and every entry that is not a readable regular file (tests/rawkit.py)."""
    write_particle_dataset(Path("data/raw/figures"), 2, seed=0)
    return make_odd_entries(Path("data/raw/odd"))


def test_entries_that_are_not_files_are_listed_with_their_reason_never_opened(odd_raw):
    os.mkfifo("data/raw/rejected")  # even where the rejected folder should be: data, not a setting
    with no_hang(60):
        report = ingest(IngestParams(), workers=2)
    quarantine = {r["path"]: r for r in _rows("quarantine")}
    assert {p: r["reason"] for p, r in quarantine.items()} == {**odd_raw, "data/raw/rejected": "not_a_file"}
    assert all(r["detail"] for r in quarantine.values())
    assert "symlink to pipe.png" in quarantine["data/raw/odd/via_pipe.png"]["detail"]
    rows = {r["path"]: r for r in _rows("ingest")}
    # The image beside a FIFO caption is kept, without a caption; the link to its own folder adds nothing.
    assert len(rows) == 3 and "data/raw/odd/with_pipe_caption.png" in rows
    assert rows["data/raw/odd/with_pipe_caption.png"]["caption"] is None
    assert report.extra["quarantined"] == len(odd_raw) + 1


def test_a_folder_that_cannot_be_listed_is_quarantined_unreadable(chdir, monkeypatch, request):
    write_particle_dataset(Path("data/raw/figures"), 1, seed=0)
    locked = Path("data/raw/locked")
    locked.mkdir()
    (locked / "a.png").write_bytes(png())
    if os.geteuid() != 0:
        locked.chmod(0)
        request.addfinalizer(lambda: locked.chmod(0o755))
    else:  # root lists any folder: the permission error is simulated
        real = os.scandir

        def scandir(path="."):
            if Path(path) == locked:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real(path)

        monkeypatch.setattr(os, "scandir", scandir)
    ingest(IngestParams(), workers=2)
    quarantine = {r["path"]: r for r in _rows("quarantine")}
    assert quarantine["data/raw/locked"]["reason"] == "unreadable"
    assert "Permission denied" in quarantine["data/raw/locked"]["detail"]
    assert len(_rows("ingest")) == 1


def test_files_that_vanish_or_change_while_ingest_reads_them_are_listed(chdir, monkeypatch):
    import tasks.ingest as stage

    raw = Path("data/raw")
    raw.mkdir(parents=True)
    for name, color in [("a.png", 1), ("b_same_as_a.png", 1), ("c.png", 2), ("d.png", 3),
                        ("gone_after_listing.png", 4), ("pipe_after_listing.png", 5)]:
        (raw / name).write_bytes(png((color * 40, 0, 0)))
    real_scan, real_id = stage.scan, stage._content_id

    def scan(p):
        out = real_scan(p)
        (raw / "gone_after_listing.png").unlink()       # listed, then gone before it is hashed
        (raw / "pipe_after_listing.png").unlink()       # listed, then swapped for a FIFO: no hang
        os.mkfifo(raw / "pipe_after_listing.png")
        return out

    def content_id(path, *rest):
        out = real_id(path, *rest)
        if path.name == "a.png":                       # hashed, then gone before the probe reads it
            path.unlink()
        if path.name == "c.png":                       # hashed, then rewritten before the probe
            path.write_bytes(png((0, 250, 0)))
        return out

    with monkeypatch.context() as m, no_hang(60):  # (monkeypatch.undo() would undo the chdir too)
        m.setattr(stage, "scan", scan)
        m.setattr(stage, "_content_id", content_id)
        ingest(IngestParams(), workers=2)
    assert {r["path"]: r["reason"] for r in _rows("quarantine")} == {
        "data/raw/gone_after_listing.png": "vanished", "data/raw/pipe_after_listing.png": "not_a_file",
        "data/raw/a.png": "vanished", "data/raw/c.png": "changed"}
    rows = {r["path"]: r for r in _rows("ingest")}
    # a's bytes live on under b's name; c's old bytes were never recorded in the store.
    assert set(rows) == {"data/raw/b_same_as_a.png", "data/raw/d.png"}
    assert rows["data/raw/b_same_as_a.png"]["duplicates"] == []
    assert Path.cwd() == chdir
    ingest(IngestParams(), workers=2)
    assert {r["path"] for r in _rows("ingest")} == {"data/raw/b_same_as_a.png", "data/raw/c.png", "data/raw/d.png"}


def test_a_rerun_hashes_only_files_whose_stat_changed(chdir, monkeypatch):
    """Adding 10 images to 70,000 must not read the 70,000: ids of files whose size, mtime,
    ctime and inode are unchanged come from the last run; an edit is hashed again."""
    import hashlib

    import tasks.ingest as stage

    raw = Path("data/raw")
    raw.mkdir(parents=True)
    for n in range(5):
        (raw / f"{n}.png").write_bytes(png((n * 40, 0, 0)))
    ingest(IngestParams(), workers=2)
    first = {r["path"]: r["id"] for r in _rows("ingest")}
    hashed = []
    real = hashlib.file_digest

    def counting(f, name):
        hashed.append(os.fstat(f.fileno()).st_ino)
        return real(f, name)

    monkeypatch.setattr(stage.hashlib, "file_digest", counting)
    ingest(IngestParams(), workers=2)
    assert hashed == [] and {r["path"]: r["id"] for r in _rows("ingest")} == first
    (raw / "new.png").write_bytes(png((0, 0, 200)))
    (raw / "2.png").write_bytes(png((0, 200, 0)))  # edited in place: new bytes, new mtime
    ingest(IngestParams(), workers=2)
    assert sorted(hashed) == sorted((raw / n).stat().st_ino for n in ("2.png", "new.png"))
    rows = {r["path"]: r["id"] for r in _rows("ingest")}
    assert rows["data/raw/2.png"] == hashlib.sha256((raw / "2.png").read_bytes()).hexdigest() != first["data/raw/2.png"]
    assert {p: i for p, i in rows.items() if p not in ("data/raw/2.png", "data/raw/new.png")} == {
        p: i for p, i in first.items() if p != "data/raw/2.png"}

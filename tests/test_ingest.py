import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.ingest import IngestParams, ingest
from tasks.sample.__main__ import make_sample
from tasks.sample.particles import write_particle_dataset

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
    m = json.loads(path.read_text())
    assert m["computed"] == r.computed and m["samples"] == r.extra["samples"]
    assert m["quarantine_by_reason"]["corrupt"] == 2


def test_missing_source_folder_is_named(chdir):
    with pytest.raises(FileNotFoundError, match="data/elsewhere"):
        ingest(IngestParams(sources=("data/elsewhere",)))

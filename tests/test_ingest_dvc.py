"""Nothing in data/raw stops `dvc repro`, `dvc status` or the flows' in-process DVC, and DVC
still re-runs ingest on every change of a file there (tasks/core/rawfs.py).

Real scratch repos (flows.scaffold), the ingest stage alone, every DVC command under a
timeout: before the fix a FIFO in data/raw made `dvc repro` hang for ever.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.scaffold import scaffold
from tasks.sample.particles import write_particle_dataset
from tests.conftest import BIN, run
from tests.rawkit import make_odd_entries

pytestmark = pytest.mark.slow
TIMEOUT = 120
UP_TO_DATE = "Data and pipelines are up to date"


def dvc(root: Path, *args: str) -> str:
    p = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, f"dvc {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def repro_ingest(root: Path) -> bool:
    """`dvc repro ingest`; True when the stage ran."""
    return "Running stage 'ingest'" in dvc(root, "repro", "ingest")


def quarantine(root: Path) -> dict[str, str]:
    return {r["path"]: r["reason"] for r in pq.read_table(root / "data/manifest/quarantine.parquet").to_pylist()}


def samples(root: Path) -> dict[str, dict]:
    return {r["path"]: r for r in pq.read_table(root / "data/manifest/ingest.parquet").to_pylist()}


def raw_dep(root: Path) -> dict:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    return next(d for d in lock["stages"]["ingest"]["deps"] if d["path"] == "data/raw")


@pytest.fixture
def raw_repo(tmp_path, monkeypatch):
    """A pipeline repo with three figures (image, caption, pose each) in data/raw; cwd is its root."""
    root = scaffold(tmp_path / "repo")
    figures = write_particle_dataset(root / "data/raw/figures", 3, seed=0)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "pipeline"], root)
    monkeypatch.chdir(root)
    return root, figures


def test_dvc_repro_and_status_complete_with_every_odd_entry_in_raw(raw_repo):
    root, _ = raw_repo
    expected = make_odd_entries(Path("data/raw/odd"))
    assert repro_ingest(root)
    assert quarantine(root) == expected
    assert len(samples(root)) == 4  # three figures, and the image beside the FIFO caption
    # DVC hashed exactly the readable regular files: 3 x (image, caption, pose) + that image.
    assert raw_dep(root)["nfiles"] == 10
    assert UP_TO_DATE in dvc(root, "status", "ingest")


def test_dvc_reruns_ingest_when_anything_under_raw_changes(raw_repo):
    root, figures = raw_repo
    make_odd_entries(Path("data/raw/odd"))  # present throughout: skipping them hides no real change
    assert repro_ingest(root)
    assert UP_TO_DATE in dvc(root, "status", "ingest")
    caption = figures[0].with_suffix(".txt")
    changes = {
        "a new image": lambda: write_particle_dataset(root / "data/raw/figures", 1, seed=0, start=3),
        "an edited caption": lambda: caption.write_text("a figure with one arm raised\n"),
        "a deleted image": lambda: figures[1].unlink(),
    }
    for what, change in changes.items():
        change()
        status = dvc(root, "status", "ingest")
        assert "changed deps" in status and "data/raw" in status, (what, status)
        assert repro_ingest(root), what
    assert UP_TO_DATE in dvc(root, "status", "ingest")
    rows = samples(root)
    assert len(rows) == 4 and figures[1].relative_to(root).as_posix() not in rows
    assert rows[figures[0].relative_to(root).as_posix()]["caption"] == "a figure with one arm raised"
    # An entry DVC skips does not count for staleness (tasks/core/rawfs.py, "Limits"): a new
    # FIFO alone leaves ingest fresh, and is listed the next time ingest runs.
    os.mkfifo("data/raw/figures/late.png")
    assert UP_TO_DATE in dvc(root, "status", "ingest")


def test_flows_in_process_dvc_completes_with_odd_entries_in_raw(raw_repo):
    """flows/dvc_stage.reproduce, as the build-dataset flow calls it (Repo(...).reproduce in
    its own process), in a subprocess so that a hang fails the test."""
    root, _ = raw_repo
    expected = make_odd_entries(Path("data/raw/odd"))
    code = ("import logging; from pathlib import Path; from flows.dvc_stage import reproduce; "
            "print('ran', reproduce('ingest', Path('.'), logging.getLogger('test')))")
    p = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ran True" in p.stdout
    assert quarantine(root) == expected
    assert UP_TO_DATE in dvc(root, "status", "ingest")

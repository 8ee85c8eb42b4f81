"""`dvc push` / `dvc pull` of the whole data/ tree through an S3 remote (a real
S3 endpoint: moto_server on 127.0.0.1)."""
from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, run

pytestmark = pytest.mark.slow


def dvc(root: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], root).stdout


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "data").rglob("*")) if p.is_file() and not p.is_symlink()
            and ".gitignore" not in p.name and "derived/ingest" not in p.as_posix()}


def test_push_then_pull_into_a_fresh_clone_restores_the_data_tree(tiny_repo, s3_endpoint, tmp_path):
    import boto3

    root = tiny_repo
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="niche-remote")
    # Raw images are versioned too: `dvc add data/raw`; `dvc repro` keeps it current.
    dvc(root, "add", "-q", "data/raw")
    dvc(root, "repro", "-q", "shard")
    dvc(root, "remote", "add", "-d", "storage", "s3://niche-remote/dvc")
    dvc(root, "remote", "modify", "storage", "endpointurl", s3_endpoint)
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "dataset v1"], root)
    dvc(root, "push", "-q")
    before = digests(root)
    assert any(k.startswith("data/derived/embed_image/") for k in before)
    assert any(k.startswith("data/raw/figures/") for k in before)

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path)
    dvc(clone, "config", "--local", "core.site_cache_dir", str(clone / ".dvc" / "site"))
    dvc(clone, "pull", "-q", "--with-deps", "shard")  # the dataset; train has not run here
    assert digests(clone) == before
    assert "up to date" in dvc(clone, "status", "--with-deps", "shard")
    # Nothing on the remote is credentials: they came from the environment.
    assert "testing" not in (clone / ".dvc" / "config").read_text()
    assert subprocess.run(["git", "grep", "-q", "AWS_SECRET"], cwd=clone).returncode != 0

"""A project for the curation tests: rendered candidates (the real table and store layout),
a dataset under data/raw with a sidecar caption, a hand-rejected image and a quarantined file,
and the manifest tables ingest would have written for them."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.core import manifest
from tasks.curate.tables import CANDIDATES, CANDIDATES_STORE, CANDIDATES_TABLE
from tests.openai_server import free_port

ROOT = Path(__file__).resolve().parents[1]


def png(path: Path, seed: int, size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_project(root: Path, n_candidates: int = 6, words: tuple[str, ...] = ("love", "joy")) -> Path:
    rows = []
    for i in range(n_candidates):
        word = words[i % len(words)]
        template = "particle" if i % 3 else "figure"
        key = hashlib.sha256(f"cand{i}".encode()).hexdigest()
        rel = f"{key[:2]}/{key}.png"
        png(root / CANDIDATES_STORE / rel, i)
        rows.append(dict(id=key, prompt=f"black particles forming {word} number {i}", seed=i % 2, word=word,
                         template=template, generator="sdxl", checkpoint="models/tiny/sdxl", checkpoint_id="c0",
                         key=key, file=rel, width=64, height=64, error=None))
    manifest.write_table(rows, CANDIDATES, root / CANDIDATES_TABLE, sort_by="id")
    raw = root / "data/raw"
    png(raw / "photos/a.png", 100)
    (raw / "photos/a.txt").write_text("a photo of a figure", encoding="utf-8")
    (raw / "photos/a.tags").write_text("1girl, solo", encoding="utf-8")  # ingest's tags sidecar
    png(raw / "photos/b.png", 101)
    png(raw / "rejected/old.png", 102)
    (raw / "photos/broken.png").write_bytes(b"not a png at all")
    quarantine = [dict(path="data/raw/photos/broken.png", reason="corrupt", detail="cannot decode: not a PNG",
                       id=None)]
    manifest.write_table(quarantine, manifest.QUARANTINE, root / "data/manifest/quarantine.parquet", sort_by="path")
    (root / "runs/sdxl").mkdir(parents=True, exist_ok=True)
    (root / "runs/sdxl/sweep.png").write_bytes((raw / "photos/b.png").read_bytes())
    (root / "secret.txt").write_text("outside data and runs", encoding="utf-8")
    return root


class Server:
    """`python -m tasks.curate serve` in its own process group, as a user starts it."""

    def __init__(self, root: Path, port: int | None = None, dest: str = "curated"):
        self.root, self.port, self.dest = root, port or free_port(), dest
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "Server":
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.curate", "serve", "--root", str(self.root),
                                      "--port", str(self.port), "--set", self.dest], cwd=self.root, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the curation server exited: {self.proc.stdout.read().decode(errors='replace')}")
            try:
                urllib.request.urlopen(self.url + "/api/changes?since=0", timeout=2).read()
                return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError("the curation server did not answer")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.kill(signal.SIGTERM)

"""Model stages on a real Ray cluster (`ray start --head` on 127.0.0.1, 2 CPUs, started here):
the stores equal the local executor's byte for byte, only missing keys travel, a worker killed
with SIGKILL costs nothing but time, and an address where nothing answers is a clear error."""
from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.hub import SetupError
from tasks.bucket import STORE as BUCKET_STORE
from tasks.bucket import BucketParams, bucket
from tasks.caption import CaptionParams, caption
from tasks.core.executors import RAY_ADDRESS_ENV
from tasks.core.store import Store
from tests.storekit import item_bytes, replace_item
from tasks.embed_image import EmbedImageParams, embed_image
from tasks.embed_text import EmbedTextParams, embed_text
from tasks.ingest import IngestParams, ingest
from tasks.sample.__main__ import make_sample
from tests.conftest import BIN, _free_port

pytestmark = pytest.mark.slow

SMALL = BucketParams(buckets=((256, 256), (320, 192), (192, 320)))
M = Path("data/manifest")


@pytest.fixture(scope="module")
def ray_cluster():
    """A real head node on loopback, as a user's `ray start --head` (ENVIRONMENT.md: single-
    machine mode keeps every port on 127.0.0.1); its address for NICHE_RAY_ADDRESS."""
    # Loopback only, so no token authentication: a token file left in ~/.ray by an earlier
    # `ray.init()` would otherwise turn it on for this head but not for the driver.
    quiet = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    env = {**os.environ, **quiet}
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
           "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
           f"--temp-dir={temp}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=120)
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture
def on_ray(ray_cluster, monkeypatch):
    def switch(on: bool) -> None:
        if on:
            monkeypatch.setenv(RAY_ADDRESS_ENV, ray_cluster)
        else:
            monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    return switch


@pytest.fixture
def dataset(chdir, tiny_models) -> Path:
    make_sample(Path("data/raw"), figures=6, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    bucket(SMALL, workers=2)
    return chdir


def files(root: Path) -> dict[str, bytes]:
    """Every item of the store at `root`, by key: what a stage computed, however its packs are laid out."""
    store = Store(root, ".item")  # the extension only names loose files; packs hold keys
    return {k: store.read_bytes(k) for k in sorted(store.keys())}


def stages(models: Path, tag: str) -> dict[str, object]:
    """caption -> embed_text, and embed_image, into stores and manifests named by `tag`."""
    out = Path(f"out-{tag}")
    out.mkdir(exist_ok=True)
    shutil.copy(M / "bucket.parquet", out / "bucket.parquet")
    shutil.copy(M / "ingest.parquet", out / "ingest.parquet")
    reports = {
        "caption": caption(CaptionParams(model=str(models / "gemma3"), max_new_tokens=8, batch_size=2),
                           in_dir=out, out_dir=out, store_dir=Path(f"caption-{tag}")),
        "embed_text": embed_text(EmbedTextParams(model=str(models / "t5"), batch_size=2), in_dir=out,
                                 out_dir=out, store_dir=Path(f"text-{tag}")),
        "embed_image": embed_image(EmbedImageParams(model=str(models / "dinov3"), batch_size=1), in_dir=out,
                                   out_dir=out, store_dir=Path(f"image-{tag}"), workers=1),
    }
    return reports


def sent(caplog) -> list[int]:
    """Items each Ray run sent, from the executor's own closing line."""
    return [int(m.group(1)) for r in caplog.records
            if (m := re.match(r"ray: (\d+) items in \d+ batches sent", r.getMessage()))]


def test_ray_stores_equal_local_byte_for_byte_and_only_missing_keys_travel(chdir, tiny_models, on_ray, caplog):
    caplog.set_level(logging.INFO, logger="niche")
    # One actor: these few items need no more, and two would only share the two cores' start-up.
    Path("params.yaml").write_text("executor:\n  actors: 1\n")
    make_sample(Path("data/raw"), figures=4, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    bucket(SMALL, workers=2)
    # One bucketed image the workers cannot decode: it fails alone, with the local reason.
    broken = next(r for r in pq.read_table(M / "bucket.parquet").to_pylist() if r["split"] == "train")
    target = f"{BUCKET_STORE}/{broken['file']}"
    replace_item(BUCKET_STORE, broken["key"], b"\x89PNG\r\n\x1a\n not really a png")

    on_ray(True)  # bucket's CPU work on the cluster too: the same PNGs as the threads made
    rows = pq.read_table(M / "bucket.parquet").to_pylist()
    by_ray = bucket(SMALL, out_dir=Path("bucket-ray"), store_dir=Path("bucket-ray"))
    assert (by_ray.computed, by_ray.failed) == (len(rows), 0)
    assert all(item_bytes("bucket-ray", r["key"], ".png") == item_bytes(BUCKET_STORE, r["key"])
               for r in rows if r["id"] != broken["id"])

    on_ray(False)
    local = stages(tiny_models, "local")
    on_ray(True)
    remote = stages(tiny_models, "ray")
    assert sent(caplog) == [4, 4, 3, 4]  # each stage's keys went through Ray once (text: 3 captions)
    for name in local:
        assert (remote[name].computed, remote[name].failed) == (local[name].computed, local[name].failed) == (3, 1)
        assert remote[name].failures == local[name].failures
    assert str(target) in remote["embed_image"].failures[broken["id"]]
    said = [r.getMessage() for r in caplog.records]  # what a Prefect task run shows of the stage
    assert any(re.match(r"ray: cluster has 2 CPU, 0 GPU on 1 node\(s\); 1 actors x \(1 CPU, 0 GPU\)", m) for m in said)
    assert any(re.search(r"embed_image: 3 computed, 1 failed in [\d.]+ s \([\d.]+ items/s; [\d.]+ items/s once the model was up\) on ray", m) for m in said)
    for a, b in (("caption-local", "caption-ray"), ("text-local", "text-ray"), ("image-local", "image-ray")):
        assert files(Path(a)) == files(Path(b)) and len(files(Path(a))) == 3, a
    for table in ("caption", "embed_text", "embed_image"):
        assert (pq.read_table(f"out-local/{table}.parquet").to_pylist()
                == pq.read_table(f"out-ray/{table}.parquet").to_pylist())

    # Three more images: exactly their keys go to Ray, stage by stage (and the broken one again).
    make_sample(Path("data/raw"), figures=3, photos=False, bad_examples=False, start=4)
    ingest(IngestParams(), workers=2)
    bucket(SMALL, workers=2)
    caplog.clear()
    again = stages(tiny_models, "ray")
    assert sent(caplog) == [4, 3, 4]
    assert all((r.total, r.computed, r.reused, r.failed) == (7, 3, 3, 1) for r in again.values())


def test_a_worker_killed_mid_stage_costs_only_time(dataset, tiny_models, on_ray, caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="niche")
    params = EmbedImageParams(model=str(tiny_models / "dinov3"), batch_size=1)
    on_ray(False)
    embed_image(params, store_dir=Path("clean"), out_dir=Path("."), workers=1)

    # After the second item lands, SIGKILL one of the actors: its batches in flight are lost.
    write = Store.write_bytes
    killed: list[int] = []

    def write_and_kill(self, key, data):
        path = write(self, key, data)
        if not killed and len(self._index()) == 2:
            pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _is_actor(p)]
            assert pids, "no Ray actor process found"
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        return path

    monkeypatch.setattr(Store, "write_bytes", write_and_kill)
    on_ray(True)
    report = embed_image(params, store_dir=Path("killed"), out_dir=Path("."), workers=1)
    assert killed and (report.computed, report.failed) == (6, 0)
    assert any("an actor died" in r.getMessage() for r in caplog.records)
    retried = [int(m.group(1)) for r in caplog.records if (m := re.search(r"(\d+) sent again", r.getMessage()))]
    assert retried and retried[0] > 0  # the killed actor had work in flight, and it was redone
    assert not [p for p in Path("killed").rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert files(Path("killed")) == files(Path("clean"))


def _is_actor(proc: Path) -> bool:
    try:
        return (proc / "cmdline").read_bytes().startswith(b"ray::_Host")
    except OSError:
        return False


def test_an_address_where_nothing_answers_is_a_clear_error_and_writes_nothing(dataset, tiny_models,
                                                                              monkeypatch):
    port = _free_port()  # nothing listens there
    monkeypatch.setenv(RAY_ADDRESS_ENV, f"127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(SetupError, match=rf"127\.0\.0\.1:{port}.*no Ray cluster answers"):
        embed_image(EmbedImageParams(model=str(tiny_models / "dinov3")), store_dir=Path("never"),
                    out_dir=Path("nothing"))
    assert time.monotonic() - t0 < 60
    assert not Path("never").exists() and not Path("nothing").exists()

"""The loader against a real S3 endpoint: a moto_server subprocess on 127.0.0.1.

GetObject calls are counted in the server's own request log, so the count does
not rely on the loader's bookkeeping (which is checked against it).
"""
from __future__ import annotations

import inspect
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import torch

from tasks.data.loader import ShardError, ShardLoader
from tests.shardkit import write_dataset

BIN = Path(sys.executable).parent
BUCKET, SECRET = "niche-test", "not-a-real-secret-5e3f"
COUNTS = {"64x48": 28, "48x64": 12}  # shards of 8: 4 + 2 train shards


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3")
    mp = pytest.MonkeyPatch()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                 "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": str(tmp / "none"),
                 "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "none")}.items():
        mp.setenv(k, v)
    mp.delenv("AWS_PROFILE", raising=False)
    port, log = _free_port(), tmp / "moto.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=f, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() - t0 > 30:
                    raise RuntimeError("moto_server did not start:\n" + log.read_text())
                time.sleep(0.1)
        root = tmp / "shards"
        samples = write_dataset(root, COUNTS, shard_size=8, holdout={"64x48": 4}, seed=4)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket=BUCKET)
        files = [p for p in root.rglob("*") if p.is_file()]
        for p in files:
            client.upload_file(str(p), BUCKET, f"ds/{p.relative_to(root)}")
        # a second copy missing one shard
        for p in files:
            if p.name != "shard-000001.tar" or "48x64" not in str(p):
                client.upload_file(str(p), BUCKET, f"broken/{p.relative_to(root)}")
        shards = sorted(str(p.relative_to(root)) for p in root.glob("train/*/*.tar"))
        yield SimpleNamespace(url=f"s3://{BUCKET}/ds", endpoint=endpoint, root=root, samples=samples,
                              log=log, shards=shards, client=client)
    finally:
        proc.terminate()
        proc.wait(10)
        mp.undo()


class Gets:
    """GetObject requests for shards seen in moto's log since creation."""

    def __init__(self, log: Path, prefix: str = "ds"):
        self.log, self.prefix, self.start = log, prefix, log.stat().st_size

    def count(self, expect: int = 0) -> int:
        # moto logs a request just after answering it: wait for the lines expected, then a moment more
        t0 = time.monotonic()
        while self._count() < expect and time.monotonic() - t0 < 5:
            time.sleep(0.05)
        time.sleep(0.3)
        return self._count()

    def _count(self) -> int:
        with open(self.log, "rb") as f:
            f.seek(self.start)
            text = f.read().decode(errors="replace")
        mark = f'"GET /{BUCKET}/{self.prefix}/'
        return sum(1 for line in text.splitlines() if mark in line and ".tar" in line)


def loader(s3, **kw) -> ShardLoader:
    return ShardLoader(s3.url, endpoint_url=s3.endpoint, region="us-east-1",
                       **{"batch_size": 4, "num_workers": 2, "seed": 0, **kw})


def test_s3_epoch_equals_local_epoch(s3):
    with loader(s3, flip=0.5) as remote, \
            ShardLoader(s3.root, batch_size=4, num_workers=2, seed=0, flip=0.5) as local:
        for _ in range(2):
            n = 0
            for a, b in zip(remote, local, strict=True):
                assert a["ids"] == b["ids"] and a["bucket"] == b["bucket"]
                for k in ("image", "t5", "t5_mask", "dino_cls", "dino_patches", "pose", "flipped"):
                    assert torch.equal(a[k], b[k]), k
                n += len(a["ids"])
            assert n == sum(COUNTS.values())


def test_one_get_object_per_shard_per_epoch(s3):
    with loader(s3) as L:
        for epoch in range(2):
            gets, before = Gets(s3.log), L.stats()["get_object"]
            ids = [i for b in L for i in b["ids"]]
            assert len(ids) == sum(COUNTS.values())
            assert gets.count(len(s3.shards)) == len(s3.shards)
            assert L.stats()["get_object"] - before == len(s3.shards)


def test_cache_downloads_each_shard_once_and_checks_it(s3, tmp_path):
    cache = tmp_path / "cache"
    with loader(s3, cache_dir=cache) as L:
        gets = Gets(s3.log)
        first = [b["ids"] for b in L]
        assert gets.count(len(s3.shards)) == len(s3.shards)
        assert L.stats()["cache_downloads"] == len(s3.shards)
        gets = Gets(s3.log)
        list(L)
        assert gets.count() == 0 and L.stats()["cache_hits"] == len(s3.shards)
    cached = sorted(cache.rglob("*.tar"))
    assert len(cached) == len(s3.shards) and not list(cache.rglob("*.tmp"))
    # a fresh loader (new processes) trusts the copies after re-hashing them; a damaged one is fetched again
    data = bytearray(cached[0].read_bytes())
    data[1000] ^= 0xFF
    cached[0].write_bytes(bytes(data))
    with loader(s3, cache_dir=cache) as L:
        gets = Gets(s3.log)
        again = [b["ids"] for b in L]
        assert gets.count(1) == 1
        assert L.stats()["cache_rejected"] == 1 and L.stats()["cache_hits"] == len(s3.shards) - 1
    assert again == first  # epoch 0 both times: the cache changes nothing but where bytes come from


def test_missing_shard_object_is_named(s3):
    with ShardLoader(f"s3://{BUCKET}/broken", endpoint_url=s3.endpoint, batch_size=4, num_workers=0) as L:
        with pytest.raises(ShardError, match="train/48x64/shard-000001.tar"):
            list(L)
    with ShardLoader(f"s3://{BUCKET}/broken", endpoint_url=s3.endpoint, batch_size=4, num_workers=2,
                     on_error="skip") as L:
        ids = [i for b in L for i in b["ids"]]
        assert L.stats()["samples_skipped"] == 4 and len(ids) == sum(COUNTS.values()) - 4


def test_credentials_are_never_parameters_nor_reported(s3):
    params = inspect.signature(ShardLoader).parameters
    assert not [p for p in params if "key" in p or "secret" in p or "token" in p]
    with loader(s3, num_workers=0) as L:
        next(iter(L))
        text = repr(L.state_dict()) + repr(L.stats()) + L.source.describe()
    assert SECRET not in text and "testing" not in text
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # they came from the environment

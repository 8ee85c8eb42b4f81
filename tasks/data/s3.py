"""Shards for the loader (tasks/data/loader.py): the shard table, where shard bytes come
from, and one shard's samples as checked arrays.

Sources: a local folder, or S3 — one GetObject per whole shard, streamed (the tar
is parsed in mode "r|" as the bytes arrive), never one request per sample (many
small objects are slow on every S3 measured, moto included). A stream broken
midway is re-requested from the byte where it broke (Range), a few times.
Credentials come from boto3's usual chain (AWS_* variables, ~/.aws, roles), never
from parameters, and are never logged; clients are made in the process that
reads (boto3 clients do not survive a fork).

The cache keeps whole shards under their sha256 (`cache/ab/abcd….tar`), so a
shard rewritten under the same name is never served stale. A download goes to a
temporary name, is checked against shards.parquet's sha256, then renamed into
place; a copy already there is re-hashed once per process before it is trusted
(a bad one is removed and downloaded again).
"""
from __future__ import annotations

import hashlib
import io as _io
import json
import logging
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from webdataset.tariterators import base_plus_ext

from tasks.core.store import atomic_write, sha256_file

log = logging.getLogger("niche.loader")

CHUNK = 1 << 20


class ShardError(RuntimeError):
    """A shard that cannot be read as planned; the message names the shard and the member.

    Takes one message argument (plus optional fields) so that a DataLoader worker
    can re-raise it in the main process with the worker's traceback appended.
    """

    def __init__(self, message: str, shard: str | None = None, member: str | None = None):
        super().__init__(message)
        self.shard, self.member = shard, member


# ---------------------------------------------------------------- the shard table and a shard's samples
@dataclass(frozen=True)
class Shard:
    path: str  # relative to the source root
    bucket: str
    samples: int
    bytes: int | None
    sha256: str | None


def read_shards(source: Source, split: str) -> list[Shard]:
    try:
        rows = pq.read_table(pa.BufferReader(source.read_bytes("shards.parquet"))).to_pylist()
    except FileNotFoundError as e:
        raise ValueError(f"source: no shards.parquet in {source.describe()} (run the shard stage)") from e
    shards = sorted((Shard(r["shard"], r["bucket"], int(r["samples"]), r.get("bytes"), r.get("sha256"))
                     for r in rows if r["split"] == split and r["samples"]), key=lambda s: s.path)
    if not shards:
        raise ValueError(f"split: no {split!r} shards in {source.describe()}")
    return shards


def tar_samples(stream, rel: str, expected: int):
    """(key, {ext: bytes}) per sample in archive order; exactly `expected` of them, else a ShardError
    naming the shard and the member. Mode "r|": the archive is read once, front to back."""
    member, key, parts, n = None, None, {}, 0
    try:
        tar = tarfile.open(fileobj=stream, mode="r|", bufsize=CHUNK)
        for info in tar:
            member = info.name
            if not info.isreg():
                continue
            k, ext = base_plus_ext(info.name)
            if k is None:
                raise ShardError(f"shard {rel}, member {member}: not an {{id}}.{{ext}} name", rel, member)
            data = tar.extractfile(info).read()
            tar.members = []  # stream mode: keep no history of members
            if k != key:
                if key is not None:
                    n += 1
                    yield key, parts
                key, parts = k, {}
            parts[ext] = data
        if key is not None:
            n += 1
            yield key, parts
    except (tarfile.TarError, OSError, EOFError) as e:
        where = f"member {member}" if member else "first member"
        raise ShardError(f"shard {rel}, {where}: {type(e).__name__}: {e}", rel, member) from e
    if n != expected:  # tarfile takes a header cut short for the end of the archive
        raise ShardError(f"shard {rel}: holds {n} samples, shards.parquet says {expected} "
                         f"(truncated? last member read: {member})", rel, member)


def read_samples(source: Source, shards: list[Shard], order: list[int], todo: dict, io: dict, fail):
    """((shard, position), (key, parts) or None if lost) for each sample in `todo` ({shard: positions}),
    shard after shard in `order`; a shard with nothing to do is not read at all. On a broken shard,
    `fail(error, samples lost)` raises or records, and its samples not yet read come out as None."""
    for i in order:
        want = todo.get(i)
        if not want:
            continue
        sh, got = shards[i], set()
        try:
            with source.open(sh.path, sh.sha256, io) as f:
                for pos, sample in enumerate(tar_samples(f, sh.path, sh.samples)):
                    if pos in want:
                        got.add(pos)
                        yield (i, pos), sample
        except ShardError as e:
            lost = sorted(want - got)
            fail(e, len(lost))
            for pos in lost:
                yield (i, pos), None


def size_of(bucket: str) -> tuple[int, int]:
    w, h = bucket.split("x")
    return int(w), int(h)


def _npy(data: bytes) -> np.ndarray:
    return np.lib.format.read_array(_io.BytesIO(data), allow_pickle=False)


def decode_sample(key: str, parts: dict, rel: str, bucket: str) -> dict:
    """Numpy arrays of one sample, checked against FORMAT; a ShardError names the bad member."""
    member = "image.png"

    def get(ext: str) -> bytes:
        nonlocal member
        member = ext
        if ext not in parts:
            raise ValueError("missing")
        return parts[ext]

    def need(ok: bool, what: str, got) -> None:
        if not ok:
            raise ValueError(f"expected {what}, got {got}")

    try:
        img = Image.open(_io.BytesIO(get("image.png")))
        img.load()
        need(img.mode == "RGB" and img.size == size_of(bucket), f"an RGB image of {bucket}",
             f"{img.mode} {img.size}")
        s = {"image": np.asarray(img), "t5": _npy(get("t5.npy"))}  # image (H, W, 3)
        need(s["t5"].ndim == 2, "(n, D)", s["t5"].shape)
        s["dino_cls"] = _npy(get("dino_cls.npy"))
        need(s["dino_cls"].ndim == 1, "(D,)", s["dino_cls"].shape)
        p = s["dino_patches"] = _npy(get("dino_patches.npy"))
        need(p.ndim == 3 and p.dtype in (np.int8, np.float16), "(h, w, D) int8 or float16",
             f"{p.dtype} {p.shape}")
        s["dino_scale"] = _npy(get("dino_scale.npy")) if p.dtype == np.int8 else None
        need(s["dino_scale"] is None or s["dino_scale"].shape == p.shape[:2], f"(h, w) = {p.shape[:2]}",
             None if s["dino_scale"] is None else s["dino_scale"].shape)
        s["pose"] = _npy(get("pose.npy"))
        need(s["pose"].shape == (133, 3), "(133, 3)", s["pose"].shape)
        meta = json.loads(get("json"))
        need(meta.get("id", key) == key, "the member name's id", meta.get("id"))
    except Exception as e:  # a missing member, or anything a broken PNG / npy / json throws
        name = f"{key}.{member}"
        raise ShardError(f"shard {rel}, member {name}: {type(e).__name__}: {e}", rel, name) from e
    return dict(s, id=key, caption=str(meta.get("caption", "")))


# ---------------------------------------------------------------- sources
class Source(Protocol):
    def read_bytes(self, rel: str) -> bytes: ...
    def open(self, rel: str, sha256: str | None, io: dict) -> BinaryIO: ...
    def describe(self) -> str: ...


class LocalSource:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def read_bytes(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def open(self, rel: str, sha256: str | None, io: dict) -> BinaryIO:
        try:
            return open(self.root / rel, "rb", buffering=CHUNK)
        except OSError as e:
            raise ShardError(f"shard {rel}: cannot open {self.root / rel}: {e}", rel) from e

    def describe(self) -> str:
        return str(self.root)


class S3Source:
    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None,
                 retries: int = 3):
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"source: expected s3://bucket/prefix, got {url!r}")
        self.bucket, self.prefix = u.netloc, u.path.strip("/")
        self.endpoint_url, self.region, self.retries = endpoint_url, region, retries
        self._client, self._pid = None, None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_pid": None}

    def client(self):
        if self._client is None or self._pid != os.getpid():
            import boto3
            from botocore.config import Config

            self._client = boto3.session.Session().client(
                "s3", endpoint_url=self.endpoint_url, region_name=self.region,
                config=Config(retries={"max_attempts": 5, "mode": "standard"}))
            self._pid = os.getpid()
        return self._client

    def key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def read_bytes(self, rel: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client().get_object(Bucket=self.bucket, Key=self.key(rel))["Body"].read()
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(f"s3://{self.bucket}/{self.key(rel)}") from e
            raise
        except BotoCoreError as e:
            raise OSError(f"s3://{self.bucket}/{self.key(rel)}: {e}") from e

    def open(self, rel: str, sha256: str | None, io: dict) -> BinaryIO:
        return _S3Stream(self, rel, io)

    def describe(self) -> str:
        where = f" at {self.endpoint_url}" if self.endpoint_url else ""
        return f"s3://{self.bucket}/{self.prefix}{where}"


class _S3Stream:
    """A GetObject body read front to back; re-requested from the break (Range) on a broken stream."""

    def __init__(self, src: S3Source, rel: str, io: dict):
        self.src, self.rel, self.io = src, rel, io
        self.pos, self.body = 0, None
        self.body = self._get()

    def _get(self):
        from botocore.exceptions import BotoCoreError, ClientError

        kw = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        self.io["get_object"] = self.io.get("get_object", 0) + 1
        try:
            key = self.src.key(self.rel)
            return self.src.client().get_object(Bucket=self.src.bucket, Key=key, **kw)["Body"]
        except (BotoCoreError, ClientError) as e:
            raise ShardError(f"shard {self.rel}: GetObject s3://{self.src.bucket}/{self.src.key(self.rel)} "
                             f"failed: {e}", self.rel) from e

    def read(self, n: int = -1) -> bytes:
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        for attempt in range(self.src.retries + 1):
            try:
                data = self.body.read(None if n is None or n < 0 else n)
                break
            except (BotoCoreError, HTTPError, OSError) as e:
                if attempt == self.src.retries:
                    raise ShardError(f"shard {self.rel}: stream broke at byte {self.pos}: {e}",
                                     self.rel) from e
                log.warning("loader: shard %s: stream broke at byte %d (%s); re-requesting from there",
                            self.rel, self.pos, e)
                self.body.close()
                self.body = self._get()
        self.pos += len(data)
        self.io["bytes"] = self.io.get("bytes", 0) + len(data)
        return data

    def close(self) -> None:
        if self.body is not None:
            self.body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CachedSource:
    """Whole shards kept on local disk under their sha256; see the module docstring."""

    def __init__(self, inner: Source, folder: str | os.PathLike, verify: bool = True):
        self.inner, self.folder, self.verify = inner, Path(folder), verify
        self._trusted: set[tuple] = set()  # (path, size, mtime_ns) hashed by this process

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_trusted": set()}

    def read_bytes(self, rel: str) -> bytes:
        # The tables always come from the source: they say which shard versions are current.
        return self.inner.read_bytes(rel)

    def path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.tar"

    def _usable(self, path: Path, sha256: str, io: dict) -> bool:
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        stamp = (str(path), st.st_size, st.st_mtime_ns)
        if stamp in self._trusted:
            return True
        if self.verify and sha256_file(path) != sha256:
            log.warning("loader: cached shard %s does not match its sha256; removed, downloading again", path)
            io["cache_rejected"] = io.get("cache_rejected", 0) + 1
            path.unlink(missing_ok=True)
            return False
        self._trusted.add(stamp)
        return True

    def open(self, rel: str, sha256: str | None, io: dict) -> BinaryIO:
        if not sha256:
            raise ShardError(f"shard {rel}: no sha256 in shards.parquet, so it cannot be cached", rel)
        path = self.path(sha256)
        if self._usable(path, sha256, io):
            io["cache_hits"] = io.get("cache_hits", 0) + 1
            return open(path, "rb", buffering=CHUNK)

        def download(tmp: Path) -> None:
            h, n = hashlib.sha256(), 0
            with self.inner.open(rel, sha256, io) as src, open(tmp, "wb") as dst:
                while chunk := src.read(CHUNK):
                    h.update(chunk)
                    dst.write(chunk)
                    n += len(chunk)
            if h.hexdigest() != sha256:
                raise ShardError(f"shard {rel}: downloaded {n} bytes with sha256 {h.hexdigest()[:16]}…, "
                                 f"but shards.parquet says {sha256[:16]}…; not cached", rel)

        atomic_write(path, download)
        io["cache_downloads"] = io.get("cache_downloads", 0) + 1
        st = path.stat()
        self._trusted.add((str(path), st.st_size, st.st_mtime_ns))
        return open(path, "rb", buffering=CHUNK)

    def describe(self) -> str:
        return f"{self.inner.describe()} (cache {self.folder})"


def open_source(source: str | os.PathLike, endpoint_url: str | None = None, region: str | None = None,
                cache_dir: str | os.PathLike | None = None, verify_cache: bool = True) -> Source:
    """A local folder, or `s3://bucket/prefix`; with `cache_dir`, through a whole-shard cache."""
    if str(source).startswith("s3://"):
        src: Source = S3Source(str(source), endpoint_url=endpoint_url, region=region)
    else:
        if endpoint_url is not None or region is not None:
            raise ValueError(f"endpoint_url/region: only for s3:// sources, got source {str(source)!r}")
        if not Path(source).is_dir():
            raise ValueError(f"source: expected a folder of shards or s3://bucket/prefix, "
                             f"got {str(source)!r}")
        src = LocalSource(source)
    return CachedSource(src, cache_dir, verify_cache) if cache_dir is not None else src

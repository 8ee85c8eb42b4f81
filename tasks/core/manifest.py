"""The manifest tables: explicit pyarrow schemas, deterministic parquet files.

Each stage writes its own table under data/manifest/. Rows are sorted and the
files carry no timestamps, so an unchanged table is byte-identical and DVC does
not wake the stages downstream of it.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.store import atomic_write

MANIFEST_DIR = Path("data/manifest")

INGEST = pa.schema([
    pa.field("id", pa.string(), nullable=False),  # sha256 of the file's bytes
    pa.field("path", pa.string(), nullable=False),  # relative to the repo root
    pa.field("source", pa.string(), nullable=False),  # the configured source folder
    pa.field("format", pa.string(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),  # upright (after EXIF rotation)
    pa.field("height", pa.int32(), nullable=False),
    pa.field("mode", pa.string(), nullable=False),  # as stored in the file
    pa.field("orientation", pa.int8(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("caption", pa.string()),  # sidecar text, null when none
    pa.field("caption_path", pa.string()),
    pa.field("tags", pa.list_(pa.string())),  # the `.tags` sidecar's tags, null when none
    pa.field("split", pa.string(), nullable=False),  # "train" | "holdout" | "rejected" (a curator's reject)
    pa.field("duplicates", pa.list_(pa.string()), nullable=False),  # same bytes, other paths
])

QUARANTINE = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),  # stable code, e.g. "corrupt"
    pa.field("detail", pa.string(), nullable=False),  # what a person reads
    pa.field("id", pa.string()),  # content id when the bytes could be read
])

BUCKET = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("bucket", pa.string(), nullable=False),  # "WxH"
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    # Source-pixel crop box origin and scale: bucket_xy = (src_xy - (left, top)) * scale.
    pa.field("scale", pa.float64(), nullable=False),
    pa.field("left", pa.float64(), nullable=False),
    pa.field("top", pa.float64(), nullable=False),
    pa.field("key", pa.string()),  # null when the item failed
    pa.field("file", pa.string()),  # path of the item in the store
    pa.field("error", pa.string()),  # why it failed, null when it did not
])


def write_table(rows: list[dict], schema: pa.Schema, path: Path, sort_by: str) -> Path:
    rows = sorted(rows, key=lambda r: r[sort_by])
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    return path


def previous(path: Path, columns: list[str]) -> dict[str, dict]:
    """{key: row} (`columns` only) of the table a stage wrote last time, for its rows with a key;
    {} when there is none or it cannot be read. A key names one content, so what a stage derives
    from an item alone (a token count, a number of people) holds for that key whichever run
    computed it: a re-run after adding 10 images reads back 10 items, not 70,000."""
    try:
        t = pq.read_table(path, columns=["key", *columns]).to_pylist()
    except Exception:  # noqa: BLE001 — no table, an older schema: every item is read back
        return {}
    return {r["key"]: r for r in t if r["key"] is not None}


def read_table(path: Path, schema: pa.Schema) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing — run the stage that writes it first")
    table = pq.read_table(path)
    if not table.schema.equals(schema, check_metadata=False):
        raise ValueError(f"{path}: schema differs from the expected one; re-run its stage\n"
                         f"found:    {table.schema}\nexpected: {schema}")
    return table

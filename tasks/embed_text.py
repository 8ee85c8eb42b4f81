"""Stage `embed_text`: each caption → T5 encoder hidden states, trimmed to its
real token count (EOS included), stored as float16 with the length.

One item per distinct caption text: the key holds the sha256 of the text, so
editing one caption re-encodes one item and identical captions share one.

    python -m tasks.embed_text        # reads params.yaml:embed_text
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.encoders import t5
from models.hub import ResolvedModel, resolve, resolve_here, torch_dtype
from tasks.core import manifest
from tasks.core.executors import model_executor
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_model
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key, read_metadata, tensor_bytes
from tasks.core.workers import Failed, Result, Worker, check_device

log = logging.getLogger("niche.embed_text")

VERSION = 1  # bump when the arrays written for the same key would change
STORE = Path("data/derived/embed_text")
DTYPES = ("auto", "float32", "bfloat16")
CAPTION_COLUMNS = ("id", "split", "text", "error")  # what this stage reads of caption.parquet

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("key", pa.string()),  # null when the item failed
    pa.field("file", pa.string()),  # path of the item in the store
    pa.field("error", pa.string()),  # why it failed, null when it did not
    pa.field("length", pa.int32()),  # tokens stored, EOS included
    pa.field("truncated", pa.bool_()),  # the caption had more than max_length tokens
])


@dataclass(frozen=True)
class EmbedTextParams:
    model: str = t5.DEFAULT_MODEL  # hub id or local folder
    revision: str | None = None  # hub commit/branch; None: the cached snapshot
    max_length: int = 512  # tokens, EOS included; longer captions are cut and flagged
    dtype: str = "auto"  # compute precision: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16
    batch_size: int = 32

    def validate(self) -> None:
        if self.dtype == "float16":
            raise ValueError("embed_text.dtype: float16 is refused — T5 overflows in float16 "
                             "(inf/NaN hidden states); use auto, bfloat16 or float32")
        if self.dtype not in DTYPES:
            raise ValueError(f"embed_text.dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.max_length < 2:
            raise ValueError(f"embed_text.max_length: expected at least 2 (a token and EOS), got {self.max_length}")
        if self.batch_size < 1:
            raise ValueError(f"embed_text.batch_size: expected a positive integer, got {self.batch_size}")
        if not self.model:
            raise ValueError("embed_text.model: expected a hub id or a local folder")


def read_captions(path: Path) -> list[dict]:
    """The caption stage's rows (only the columns used here), checked for those columns."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing — run the caption stage first")
    names = pq.read_schema(path).names
    missing = [c for c in CAPTION_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{path}: no column(s) {', '.join(missing)}; re-run the caption stage")
    return pq.read_table(path, columns=list(CAPTION_COLUMNS)).to_pylist()


def text_id(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_item_info(store: Store, key: str) -> tuple[int, bool]:
    """(length, truncated) from an item's header, without reading its arrays."""
    meta = read_metadata(store, key)
    return int(meta["length"]), meta["truncated"] == "1"


class TextWorker(Worker):
    """T5 on whichever machine runs it: captions in, safetensors bytes out."""

    def __init__(self, model: ResolvedModel, dtype: str, device: str, max_length: int):
        self.model, self.dtype, self.device, self.max_length = model, dtype, device, max_length
        self.encoder = None

    def setup(self) -> str:
        check_device(self.device)
        here = resolve_here(self.model, "embed_text.model", t5.ALLOW_PATTERNS)
        self.encoder = t5.T5Encoder(here.path, torch_dtype(self.dtype, self.device), self.device)
        return f"T5 {self.model.key()}, {self.dtype} on {self.device}"

    def run(self, texts: list[str]) -> list[Result]:
        out: list[Result] = []
        for hidden, truncated in self.encoder.encode(texts, self.max_length):
            h16 = hidden.astype(np.float16)
            if not np.isfinite(h16).all():
                out.append(Failed("non-finite hidden states (out of float16 range)"))
                continue
            meta = {"model": self.model.key(), "dtype": self.dtype, "length": str(len(h16)),
                    "truncated": "1" if truncated else "0"}
            out.append(tensor_bytes({"hidden": h16, "length": np.array(len(h16), np.int32),
                                     "truncated": np.array(truncated, np.bool_)}, meta))
        return out


def embed_text(p: EmbedTextParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
               store_dir: Path = STORE, workers: int | None = None, params_file: Path = PARAMS_FILE) -> Report:
    """`workers` is unused: the model spreads one batch over the cores itself; where the model
    runs (this process or a Ray cluster) is params.yaml's `executor`."""
    p.validate()
    captions = read_captions(in_dir / "caption.parquet")
    resolved = resolve(p.model, "embed_text.model", p.revision, allow_patterns=t5.ALLOW_PATTERNS)
    executor = model_executor(params_file)
    with executor:
        return _embed(p, captions, resolved, executor, out_dir, Store(store_dir, ".safetensors"))


def _embed(p: EmbedTextParams, captions: list[dict], resolved: ResolvedModel, executor, out_dir: Path,
           store: Store) -> Report:
    device = executor.device()
    dtype_name = str(torch_dtype(p.dtype, device)).removeprefix("torch.")  # what "auto" became

    rows, upstream = [], {}
    text_of: dict[str, str] = {}  # key -> caption text
    first: dict[str, str] = {}  # key -> the first id with it: identical captions are one item
    for c in captions:
        row = dict(id=c["id"], split=c["split"], key=None, file=None, error=None, length=None, truncated=None)
        rows.append(row)
        if c["text"] is None:
            upstream[c["id"]] = f"no caption ({c['error'] or 'the caption stage gave no text'})"
            continue
        if not c["text"].strip():
            upstream[c["id"]] = "empty caption"
            continue
        key = item_key("embed_text", VERSION, [text_id(c["text"])],
                       {"max_length": p.max_length, "dtype": dtype_name}, model=resolved.key())
        row.update(key=key, file=store.relpath(key))
        text_of[key] = c["text"]
        first.setdefault(key, c["id"])
    key_of = {r["id"]: r["key"] for r in rows}

    tokenizer = None
    n_tokens: dict[str, int] = {}

    def order(item_id: str) -> int:
        # By token count, so a batch pads to about its own length. Only the tokenizer is loaded
        # here: the model is the workers'.
        nonlocal tokenizer
        key = key_of[item_id]
        if key not in n_tokens:
            tokenizer = tokenizer or t5.load_tokenizer(resolved.path)
            n_tokens[key] = t5.count_tokens(tokenizer, [text_of[key]])[0]
        return n_tokens[key]

    work = [(item_id, key) for key, item_id in first.items()]
    worker = TextWorker(resolved, dtype_name, device, p.max_length)
    report = run_model("embed_text", work, store, worker, lambda item_id: text_of[key_of[item_id]],
                       p.batch_size, executor=executor, order=order)

    # Per sample: the item's failure reaches every sample that shares it.
    failures = dict(upstream)
    failed_keys = {key_of[i]: e for i, e in report.failures.items()}
    n_truncated = 0
    known = manifest.previous(out_dir / "embed_text.parquet", ["length", "truncated"])
    for r in rows:
        if r["id"] in failures:
            r["error"] = failures[r["id"]]
        elif r["key"] in failed_keys:
            r.update(key=None, file=None, error=failed_keys[r["key"]])
            failures[r["id"]] = r["error"]
        else:
            old = known.get(r["key"])
            r["length"], r["truncated"] = ((old["length"], old["truncated"]) if old is not None
                                           else read_item_info(store, r["key"]))
            n_truncated += r["truncated"]
    manifest.write_table(rows, SCHEMA, out_dir / "embed_text.parquet", sort_by="id")
    if n_truncated:
        log.warning("embed_text: %d captions were longer than max_length=%d tokens and were cut",
                    n_truncated, p.max_length)

    # Counted per sample: a sample whose caption another sample already encoded is reused.
    report.total = len(rows)
    report.failures = failures
    report.failed = len(failures)
    report.reused = report.total - report.computed - report.failed
    report.extra = {"items": len(first), "truncated": n_truncated, "no_caption": len(upstream),
                    "tiny_model": resolved.tiny}
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main("embed_text", EmbedTextParams, embed_text, __doc__, argv)


if __name__ == "__main__":
    main()

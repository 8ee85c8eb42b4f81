"""Stage `caption`: a text caption per bucketed image, from Gemma 3
(transformers), a running Ollama server, OpenAI-compatible servers (vLLM,
SGLang; several endpoints, with failover), or the sidecar .txt files ingest read
(`backend: sidecar`; or `sidecar_first`: a model backend for the images without one).

The store keeps the RAW model output per key (text, whether the model ended on
its own, token count); the trigger word and whitespace normalisation are applied
when the manifest is written, so changing `caption.trigger` regenerates nothing.
A model caption's key is the bucketed image's key + backend + model + instruction
+ generation settings (for openai: the served model id, not the endpoints' URLs
nor the in-flight limit); a sidecar caption's key is the image id + its text's hash.

Each backend is a Worker (tasks/core/workers.py): Gemma in transformers runs on the
configured executor — this process, or actors on a Ray cluster —; the servers (Ollama,
OpenAI-compatible) are their own scale-out and are called from this process.

Long on purpose: four backends share one key scheme, one store format and one
manifest; their clients live in models/encoders/, and what stays here is how each
one's answers become stored items.

    python -m tasks.caption            # reads params.yaml:caption
"""
from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.bucket import bucket_store
from tasks.core import manifest
from tasks.core.executors import model_executor
from tasks.core.images import BucketedImage, read_bucketed, why
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_model
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key
from tasks.core.workers import Failed, LocalModels, Result, Worker, check_device
from tasks.data.caption_text import (FLAG_MAX_TOKENS, FLAG_REPETITION, apply_trigger, caption_flags,  # noqa: F401
                                     normalize, repetition_coverage)

log = logging.getLogger("niche.caption")

VERSION = 1  # bump when the item stored for the same key would change
STORE = Path("data/derived/caption")

# The prx-tg captions: dense, objective, 150-200 words (see the seed write-up).
DEFAULT_INSTRUCTION = (
    "Describe this image in one dense, objective paragraph of 150 to 200 words. Cover the physical "
    "attributes of every subject (shape, build, pose, surface, clothing), the composition and framing, "
    "the lighting, and the colours and textures. State only what is visible: no interpretation of mood, "
    "meaning or intent, no opinions, and no preamble such as 'This image shows'.")

_MAX_LOGGED_FLAGS = 20

SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("key", pa.string()),  # null when the item failed
    pa.field("file", pa.string()),  # the raw item in the store (JSON)
    pa.field("text", pa.string()),  # final caption: normalised, trigger applied; null on failure
    pa.field("flags", pa.list_(pa.string()), nullable=False),  # runaway output warnings
    pa.field("error", pa.string()),  # why it failed, null when it did not
])


@dataclass(frozen=True)
class CaptionParams:
    backend: Literal["transformers", "ollama", "openai", "sidecar"] = "transformers"
    instruction: str = DEFAULT_INSTRUCTION
    trigger: str = ""  # e.g. "TOK": captions become "TOK, <caption>"; not part of the key
    # A model backend with sidecar_first: an image's own .txt (written by hand or kept and fixed on
    # the curation page) is its caption; the model captions only the images without one.
    sidecar_first: bool = False
    # transformers backend
    model: str = "google/gemma-3-27b-it"  # hub id or local folder
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU, fp32 on a CPU
    batch_size: int = 8  # images per generate() call; concurrent requests for ollama
    # generation (transformers and ollama)
    max_new_tokens: int = 384  # 200 words are ~270 Gemma tokens; more is a runaway
    temperature: float = 0.0  # 0 = greedy (reproducible); top_p, top_k, seed matter only above 0
    top_p: float = 0.95
    top_k: int = 64
    seed: int = 0
    # ollama backend
    ollama_host: str = "http://localhost:11434"
    ollama_model: str = "gemma3:27b"
    # openai backend (vLLM, SGLang): the same model behind each endpoint, asked concurrently
    openai_endpoints: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    openai_model: str = "google/gemma-3-27b-it"  # the served model id: part of the key
    openai_api_key_env: str = "OPENAI_API_KEY"  # the env var holding the key; unset: "EMPTY"
    openai_max_in_flight: int = 8  # requests in flight per endpoint
    timeout_s: float = 600.0  # for one caption
    retries: int = 3  # on connection errors and 5xx, with exponential backoff
    backoff_s: float = 1.0
    # runaway detection: flag when one repeated n-gram covers this share of the words
    repetition_threshold: float = 0.3

    def validate(self) -> None:
        if not self.instruction.strip():
            raise ValueError("caption.instruction: expected a non-empty instruction")
        if self.trigger != self.trigger.strip() or any(c in self.trigger for c in ",\n"):
            raise ValueError(f"caption.trigger: expected a word without surrounding spaces, commas or "
                             f"newlines (e.g. 'TOK'), got {self.trigger!r}")
        if not self.model:
            raise ValueError("caption.model: expected a hub id or a local folder")
        for name in ("batch_size", "max_new_tokens", "openai_max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"caption.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"caption.temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"caption.top_p: expected a value in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"caption.top_k: expected >= 0 (0 = off), got {self.top_k}")
        if not self.ollama_host.startswith(("http://", "https://")):
            raise ValueError(f"caption.ollama_host: expected an http:// or https:// URL, got {self.ollama_host!r}")
        if not self.ollama_model:
            raise ValueError("caption.ollama_model: expected a model name such as 'gemma3:27b'")
        urls = self.openai_endpoints
        if not urls or len(set(urls)) < len(urls) or not all(u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"caption.openai_endpoints: expected distinct http(s):// base URLs such as "
                             f"http://127.0.0.1:8000/v1, got {list(urls)!r}")
        if not self.openai_model or not self.openai_api_key_env:
            raise ValueError("caption.openai_model, caption.openai_api_key_env: expected a served model id "
                             "(e.g. google/gemma-3-27b-it) and an environment variable's name")
        if self.timeout_s <= 0:
            raise ValueError(f"caption.timeout_s: expected > 0 seconds, got {self.timeout_s}")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("caption.retries, caption.backoff_s: expected >= 0")
        if not 0 < self.repetition_threshold <= 1:
            raise ValueError(f"caption.repetition_threshold: expected a share in (0, 1], "
                             f"got {self.repetition_threshold}")


# ---------------------------------------------------------------- stage

def _generation_params(p: CaptionParams) -> dict:
    """The settings that change a model's caption; sampling knobs only when sampling."""
    g = {"backend": p.backend, "instruction": p.instruction, "max_new_tokens": p.max_new_tokens,
         "temperature": p.temperature}
    if p.temperature > 0:
        g.update(top_p=p.top_p, top_k=p.top_k, seed=p.seed)
    return g


def _item(text: str, ended: bool, tokens: int | None) -> bytes:
    """A stored caption: the raw model output, as the store keeps it."""
    doc = {"text": text, "ended": ended, "tokens": tokens}
    return (json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def caption(p: CaptionParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
            store_dir: Path = STORE, workers: int | None = None, params_file: Path = PARAMS_FILE) -> Report:
    # `workers` is not used: the model uses the cores (or the GPU) itself, and a server's
    # concurrency is a property of the server. Where Gemma runs is params.yaml's `executor`.
    samples = manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
    # Rejects only train the negative LoRA (fixed prompt): captioning them would waste hours.
    samples = [s for s in samples if s["split"] != "rejected"]
    # Only Gemma in transformers runs on the executor; a server backend is its own scale-out.
    executor = model_executor(params_file) if p.backend == "transformers" else LocalModels()
    with executor:
        return _caption(p, samples, in_dir, out_dir, Store(store_dir, ".json"), executor)


def _caption(p: CaptionParams, samples: list[dict], in_dir: Path, out_dir: Path, store: Store,
             executor) -> Report:
    sidecar: dict[str, str | None] = {}
    resolved = None
    if p.backend == "sidecar" or p.sidecar_first:
        ingested = manifest.read_table(in_dir / "ingest.parquet", manifest.INGEST).to_pylist()
        sidecar = {r["id"]: r["caption"] for r in ingested}
    if p.backend == "transformers":
        from models.hub import resolve

        # Resolved (not loaded) on every run: its revision is part of every key.
        resolved = resolve(p.model, "caption.model", revision=p.revision)
    gen = _generation_params(p)
    model_key = _model_key(p, resolved, executor)

    rows, work, side_work, failed_before, by_id = [], [], [], {}, {}
    for s in samples:
        row = dict(id=s["id"], split=s["split"], key=None, file=None, text=None, flags=[], error=None)
        rows.append(row)
        text = (sidecar.get(s["id"]) or "").strip()
        if s["error"] is not None:
            failed_before[s["id"]] = f"bucket failed: {s['error']}"
        elif text:  # the sidecar backend, or sidecar_first and the image has a .txt
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            row["key"] = item_key("caption", VERSION, [s["id"], digest], {"backend": "sidecar"})
            side_work.append((s["id"], row["key"]))
        elif p.backend == "sidecar":
            failed_before[s["id"]] = "no sidecar caption"
        else:
            row["key"] = item_key("caption", VERSION, [s["key"]], gen, model=model_key)
            by_id[s["id"]] = s
            work.append((s["id"], row["key"]))

    images = bucket_store()

    def read_image(item_id: str) -> BucketedImage:
        s = by_id[item_id]
        return read_bucketed(images, s["key"], s["width"], s["height"])

    report = run_model("caption", side_work, store, SidecarWorker(), lambda i: sidecar[i].strip(), 256,
                       executor=LocalModels())
    worker: CaptionWorker = SidecarWorker()
    if p.backend != "sidecar":
        worker, batch_size = _worker(p, resolved, executor.device()), p.batch_size
        if p.backend == "openai":
            batch_size = worker.pool.concurrency  # one batch fills every endpoint's in-flight slots
        # A fully cached run (or one where every image has a sidecar) never loads the model.
        report = _merged(report, run_model("caption", work, store, worker, read_image, batch_size,
                                           executor=executor))
    worker.after()  # a server that went away mid-run fails the stage, not just its items

    for item_id, err in failed_before.items():
        log.warning("caption: %s failed: %s", item_id, err)
    report.total = len(rows)
    report.failed += len(failed_before)
    report.failures.update(failed_before)
    settings = _text_settings(p)
    report.extra = _fill_rows(rows, store, report.failures, p, _known_texts(out_dir / "caption.parquet", settings))
    manifest.write_table(rows, SCHEMA.with_metadata({SETTINGS_KEY: settings}), out_dir / "caption.parquet",
                         sort_by="id")
    return report


def _merged(a: Report, b: Report) -> Report:
    """The sidecar captions' run and the model's, as one stage's counts."""
    a.total += b.total
    a.computed += b.computed
    a.reused += b.reused
    a.failed += b.failed
    a.failures.update(b.failures)
    a.seconds += b.seconds
    return a


# In caption.parquet's schema metadata: the settings that turn a raw caption into the table's
# text and flags (applied late, so they are in no key). A table made with the same ones gives
# each key's text and flags without reading its raw output again (70,000 repetition checks).
SETTINGS_KEY = "niche.caption.text_settings"


def _text_settings(p: CaptionParams) -> str:
    return json.dumps({"trigger": p.trigger, "repetition_threshold": p.repetition_threshold,
                       "normalize": "whitespace-v1"}, sort_keys=True)


def _known_texts(table: Path, settings: str) -> dict[str, dict]:
    try:
        meta = pq.read_schema(table).metadata or {}
    except Exception:  # noqa: BLE001 — no table yet, or unreadable: every raw output is read
        return {}
    if meta.get(SETTINGS_KEY.encode()) != settings.encode():
        return {}
    return manifest.previous(table, ["text", "flags"])


def _fill_rows(rows: list[dict], store: Store, failures: dict[str, str], p: CaptionParams,
               known: dict[str, dict] | None = None) -> dict:
    """Final text and flags from the stored raw output (or the error; or, for a key `known` holds,
    from the last table made with the same settings); returns the counts."""
    flagged = {FLAG_MAX_TOKENS: 0, FLAG_REPETITION: 0}
    n_flagged, words = 0, []
    for r in rows:
        if r["id"] in failures:
            r.update(key=None, error=failures[r["id"]])
            continue
        r["file"] = store.relpath(r["key"])
        if (old := (known or {}).get(r["key"])) is not None and old["text"] is not None:
            r["text"], r["flags"] = old["text"], list(old["flags"] or [])
            raw = None
        else:
            raw = json.loads(store.read_bytes(r["key"]).decode("utf-8"))
            r["text"] = apply_trigger(normalize(raw["text"]), p.trigger)
            r["flags"] = caption_flags(raw["text"], raw["ended"], p.repetition_threshold)
        words.append(len(r["text"].split()))
        for f in r["flags"]:
            flagged[f] += 1
        n_flagged += bool(r["flags"])
        if r["flags"] and n_flagged <= _MAX_LOGGED_FLAGS:
            log.warning("caption: %s flagged %s (%s tokens): %.80r", r["id"], ",".join(r["flags"]),
                        raw["tokens"] if raw else "?", r["text"])
    if n_flagged > _MAX_LOGGED_FLAGS:
        log.warning("caption: %d more flagged captions (see the flags column of caption.parquet)",
                    n_flagged - _MAX_LOGGED_FLAGS)
    return {"flagged": flagged, "flagged_items": n_flagged,
            "mean_words": round(sum(words) / len(words), 1) if words else 0.0}


def _model_key(p: CaptionParams, resolved, executor) -> str | None:
    if p.backend == "sidecar":
        return None
    if p.backend == "ollama":
        # Ollama has no revision to ask for without the server; pin a precise tag
        # (e.g. gemma3:27b-it-qat) when re-pulling a tag could change the weights.
        return f"ollama:{p.ollama_model}"
    if p.backend == "openai":
        return f"openai:{p.openai_model}"  # check() makes sure every endpoint serves it
    # bf16 and fp32 give different greedy captions: the dtype actually used is in the key.
    return f"{resolved.key()}|{_dtype_name(p, executor.device())}"


def _dtype_name(p: CaptionParams, device: str) -> str:
    from models.hub import torch_dtype

    return str(torch_dtype(p.dtype, device)).removeprefix("torch.")


def _worker(p: CaptionParams, resolved, device: str) -> "CaptionWorker":
    if p.backend == "transformers":
        return GemmaWorker(p, resolved, _dtype_name(p, device), device)
    if p.backend == "ollama":
        return OllamaWorker(p)
    return OpenAIWorker(p)


class CaptionWorker(Worker):
    """A caption backend's model side; `after()` runs on the driver once the batches are done."""

    def after(self) -> None:
        pass


class SidecarWorker(CaptionWorker):
    """The .txt beside the image: nothing to compute, but stored like any caption."""

    def run(self, texts: list[str]) -> list[Result]:
        return [_item(t, True, None) for t in texts]


class GemmaWorker(CaptionWorker):
    """Gemma 3 in transformers, on whichever machine runs it: bucketed PNG bytes in, captions out."""

    def __init__(self, p: CaptionParams, model, dtype: str, device: str):
        self.p, self.model, self.dtype, self.device = p, model, dtype, device
        self.captioner = None

    def setup(self) -> str:
        from models.encoders.gemma import GemmaCaptioner
        from models.hub import resolve_here

        check_device(self.device)
        here = resolve_here(self.model, "caption.model")
        self.captioner = GemmaCaptioner(here.path, self.device, self.dtype)
        return f"Gemma {self.model.key()}, {self.dtype} on {self.device}"

    def run(self, images: list[BucketedImage]) -> list[Result]:
        p = self.p
        out: list[Result] = []
        pil = []
        for img in images:
            try:
                pil.append(_pil(img))
                out.append(b"")
            except OSError as e:  # PIL's UnidentifiedImageError is an OSError
                out.append(Failed(f"cannot read the bucketed image {img.path}: {why(e)}"))
        ok = [j for j, r in enumerate(out) if not isinstance(r, Failed)]
        if ok:
            gens = self.captioner.caption(pil, p.instruction, p.max_new_tokens, p.temperature, p.top_p, p.top_k,
                                          p.seed)
            for j, g in zip(ok, gens):
                # An empty caption is not stored: the next run tries again (sampling may work).
                out[j] = _item(g.text, g.ended, g.tokens) if g.text.strip() else Failed(EMPTY)
        return out


def _pil(img: BucketedImage):
    import io

    from PIL import Image

    with Image.open(io.BytesIO(img.data)) as im:
        return im.convert("RGB")


EMPTY = "empty caption: the model produced no text"


class OllamaWorker(CaptionWorker):
    """A running Ollama server; the batch's requests go out together (OLLAMA_NUM_PARALLEL batches
    them on the server)."""

    def __init__(self, p: CaptionParams):
        from models.encoders.ollama import OllamaClient

        self.p = p
        self.client = OllamaClient(p.ollama_host, p.timeout_s, p.retries, p.backoff_s)

    def setup(self) -> str:
        self.client.check(self.p.ollama_model)
        return f"Ollama {self.p.ollama_model} at {self.p.ollama_host}"

    def _one(self, img: BucketedImage) -> Result:
        p = self.p
        options = {"num_predict": p.max_new_tokens, "temperature": p.temperature}
        if p.temperature > 0:
            options.update(top_p=p.top_p, top_k=p.top_k, seed=p.seed)
        try:
            res = self.client.generate(p.ollama_model, p.instruction, [img.data], options)
        except Exception as e:  # noqa: BLE001 — one failed request fails its item
            return Failed(str(e))
        return _item(res.text, res.ended, res.tokens) if res.text.strip() else Failed(EMPTY)

    def run(self, images: list[BucketedImage]) -> list[Result]:
        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            return list(pool.map(self._one, images))

    def after(self) -> None:
        from models.encoders.ollama import OllamaUnreachable

        if self.client.down:
            raise OllamaUnreachable(self.client.down + " Captions finished so far are kept; run the stage again.")


class OpenAIWorker(CaptionWorker):
    """OpenAI-compatible servers (vLLM, SGLang): a batch fills every endpoint's in-flight slots."""

    def __init__(self, p: CaptionParams):
        from models.encoders.openai_chat import ChatPool

        self.p = p
        self.pool = ChatPool(p.openai_endpoints, p.openai_model, p.openai_api_key_env, p.timeout_s, p.retries,
                             p.backoff_s, p.openai_max_in_flight)

    def setup(self) -> str:
        self.pool.check()
        return f"{self.p.openai_model} on {len(self.p.openai_endpoints)} endpoint(s)"

    def _one(self, img: BucketedImage) -> Result:
        p = self.p
        try:  # the bucketed PNG is sent as it is
            res = self.pool.caption(img.data, p.instruction, p.max_new_tokens, p.temperature, p.top_p, p.top_k,
                                    p.seed)
        except Exception as e:  # noqa: BLE001 — one failed request fails its item; a dead pool: after()
            return Failed(str(e))
        return _item(res.text, res.ended, res.tokens) if res.text.strip() else Failed(EMPTY)

    def run(self, images: list[BucketedImage]) -> list[Result]:
        with ThreadPoolExecutor(max_workers=self.pool.concurrency) as ex:
            return list(ex.map(self._one, images))

    def after(self) -> None:
        from models.encoders.openai_chat import EndpointsDown

        if self.pool.down:
            raise EndpointsDown(self.pool.down + " Captions finished so far are kept; run the stage again.")


def main(argv: list[str] | None = None) -> None:
    stage_main("caption", CaptionParams, caption, __doc__, argv)


if __name__ == "__main__":
    main()

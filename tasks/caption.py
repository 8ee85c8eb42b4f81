"""Stage `caption`: a text caption per bucketed image, from Gemma 3
(transformers), a running Ollama server, OpenAI-compatible servers (vLLM,
SGLang; several endpoints, with failover), or the sidecar .txt files ingest read.

The store keeps the RAW model output per key (text, whether the model ended on
its own, token count); the trigger word and whitespace normalisation are applied
when the manifest is written, so changing `caption.trigger` regenerates nothing.
A model caption's key is the bucketed image's key + backend + model + instruction
+ generation settings (for openai: the served model id, not the endpoints' URLs
nor the in-flight limit); a sidecar caption's key is the image id + its text's hash.

Long on purpose: four backends share one key scheme, one store format and one
manifest; their clients live in models/encoders/, and what stays here is how each
one's answers become stored items.

    python -m tasks.caption            # reads params.yaml:caption
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import pyarrow as pa

from tasks.core import manifest
from tasks.bucket import STORE as BUCKET_STORE
from tasks.core.runner import run_batches
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key

log = logging.getLogger("niche.caption")

VERSION = 1  # bump when the item stored for the same key would change
STORE = Path("data/derived/caption")

# The prx-tg captions: dense, objective, 150-200 words (see the seed write-up).
DEFAULT_INSTRUCTION = (
    "Describe this image in one dense, objective paragraph of 150 to 200 words. Cover the physical "
    "attributes of every subject (shape, build, pose, surface, clothing), the composition and framing, "
    "the lighting, and the colours and textures. State only what is visible: no interpretation of mood, "
    "meaning or intent, no opinions, and no preamble such as 'This image shows'.")

FLAG_MAX_TOKENS = "max_new_tokens"  # stopped by the limit, not by the model: likely cut off or looping
FLAG_REPETITION = "repetition"  # one repeated n-gram covers much of the text
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


# ---------------------------------------------------------------- text

def normalize(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space; strip."""
    return " ".join(text.split())


def apply_trigger(text: str, trigger: str) -> str:
    """'TOK, <text>' — unless the text already starts with the trigger word."""
    if not trigger or re.match(rf"{re.escape(trigger)}(?!\w)", text):
        return text
    return f"{trigger}, {text}"


def repetition_coverage(text: str, max_n: int = 8, min_repeats: int = 3, min_words: int = 12) -> float:
    """Largest share of the words covered by one n-gram (n <= max_n) repeated >= min_repeats times.

    Occurrences are counted without overlap, so 'a a a a' is two of 'a a'. Natural
    prose stays under ~0.1 (its most frequent word, 'the', alone); a looping
    generation ('a red dot, a red dot, ...') goes towards 1.
    """
    words = re.findall(r"\w+", text.lower())
    if len(words) < min_words:
        return 0.0
    best = 0
    for n in range(1, max_n + 1):
        counts: dict[tuple[str, ...], int] = {}
        free_from: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if i >= free_from.get(gram, 0):
                counts[gram] = counts.get(gram, 0) + 1
                free_from[gram] = i + n
        top = max(counts.values(), default=0)
        if top >= min_repeats:
            best = max(best, top * n)
    return best / len(words)


def caption_flags(text: str, ended: bool, repetition_threshold: float) -> list[str]:
    flags = []
    if not ended:
        flags.append(FLAG_MAX_TOKENS)
    if repetition_coverage(text) >= repetition_threshold:
        flags.append(FLAG_REPETITION)
    return flags


# ---------------------------------------------------------------- stage

def _generation_params(p: CaptionParams) -> dict:
    """The settings that change a model's caption; sampling knobs only when sampling."""
    g = {"backend": p.backend, "instruction": p.instruction, "max_new_tokens": p.max_new_tokens,
         "temperature": p.temperature}
    if p.temperature > 0:
        g.update(top_p=p.top_p, top_k=p.top_k, seed=p.seed)
    return g


def _write_item(store: Store, key: str, text: str, ended: bool, tokens: int | None) -> None:
    doc = {"text": text, "ended": ended, "tokens": tokens}
    store.write_bytes(key, (json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))


def _read_image(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def caption(p: CaptionParams, in_dir: Path = manifest.MANIFEST_DIR, out_dir: Path = manifest.MANIFEST_DIR,
            store_dir: Path = STORE, workers: int | None = None) -> Report:
    # `workers` is not used: the model uses the cores (or the GPU) itself, and
    # Ollama's concurrency is batch_size, a property of the server.
    samples = manifest.read_table(in_dir / "bucket.parquet", manifest.BUCKET).to_pylist()
    # Rejects only train the negative LoRA (fixed prompt): captioning them would waste hours.
    samples = [s for s in samples if s["split"] != "rejected"]
    store = Store(store_dir, ".json")
    sidecar: dict[str, str | None] = {}
    resolved = None
    if p.backend == "sidecar":
        ingested = manifest.read_table(in_dir / "ingest.parquet", manifest.INGEST).to_pylist()
        sidecar = {r["id"]: r["caption"] for r in ingested}
    elif p.backend == "transformers":
        from models.hub import resolve

        # Resolved (not loaded) on every run: its revision is part of every key.
        resolved = resolve(p.model, "caption.model", revision=p.revision)
    gen = _generation_params(p)
    model_key = _model_key(p, resolved)

    rows, work, failed_before, by_id = [], [], {}, {}
    for s in samples:
        row = dict(id=s["id"], split=s["split"], key=None, file=None, text=None, flags=[], error=None)
        rows.append(row)
        if s["error"] is not None:
            failed_before[s["id"]] = f"bucket failed: {s['error']}"
        elif p.backend == "sidecar":
            text = (sidecar.get(s["id"]) or "").strip()
            if not text:
                failed_before[s["id"]] = "no sidecar caption"
                continue
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            row["key"] = item_key("caption", VERSION, [s["id"], digest], {"backend": "sidecar"})
        else:
            row["key"] = item_key("caption", VERSION, [s["key"]], gen, model=model_key)
        if row["key"] is not None:
            by_id[s["id"]] = s
            work.append((s["id"], row["key"]))

    needed = any(not store.has(k) for _, k in work)
    compute, batch_size, after = _backend(p, store, by_id, sidecar, resolved, needed)
    report = run_batches("caption", work, store, compute, batch_size)
    after()  # a server that went away mid-run fails the stage, not just its items

    for item_id, err in failed_before.items():
        log.warning("caption: %s failed: %s", item_id, err)
    report.total = len(rows)
    report.failed += len(failed_before)
    report.failures.update(failed_before)
    report.extra = _fill_rows(rows, store, report.failures, p)
    manifest.write_table(rows, SCHEMA, out_dir / "caption.parquet", sort_by="id")
    return report


def _fill_rows(rows: list[dict], store: Store, failures: dict[str, str], p: CaptionParams) -> dict:
    """Final text and flags from the stored raw output (or the error); returns the counts."""
    flagged = {FLAG_MAX_TOKENS: 0, FLAG_REPETITION: 0}
    n_flagged, words = 0, []
    for r in rows:
        if r["id"] in failures:
            r.update(key=None, error=failures[r["id"]])
            continue
        raw = json.loads(store.read_bytes(r["key"]).decode("utf-8"))
        r["file"] = store.relpath(r["key"])
        r["text"] = apply_trigger(normalize(raw["text"]), p.trigger)
        r["flags"] = caption_flags(raw["text"], raw["ended"], p.repetition_threshold)
        words.append(len(r["text"].split()))
        for f in r["flags"]:
            flagged[f] += 1
        n_flagged += bool(r["flags"])
        if r["flags"] and n_flagged <= _MAX_LOGGED_FLAGS:
            log.warning("caption: %s flagged %s (%s tokens): %.80r", r["id"], ",".join(r["flags"]),
                        raw["tokens"], r["text"])
    if n_flagged > _MAX_LOGGED_FLAGS:
        log.warning("caption: %d more flagged captions (see the flags column of caption.parquet)",
                    n_flagged - _MAX_LOGGED_FLAGS)
    return {"flagged": flagged, "flagged_items": n_flagged,
            "mean_words": round(sum(words) / len(words), 1) if words else 0.0}


def _model_key(p: CaptionParams, resolved) -> str | None:
    if p.backend == "sidecar":
        return None
    if p.backend == "ollama":
        # Ollama has no revision to ask for without the server; pin a precise tag
        # (e.g. gemma3:27b-it-qat) when re-pulling a tag could change the weights.
        return f"ollama:{p.ollama_model}"
    if p.backend == "openai":
        return f"openai:{p.openai_model}"  # check() makes sure every endpoint serves it
    from models.hub import torch_device, torch_dtype

    # bf16 and fp32 give different greedy captions: the dtype actually used is in the key.
    dtype = str(torch_dtype(p.dtype, torch_device())).removeprefix("torch.")
    return f"{resolved.key()}|{dtype}"


def _backend(p: CaptionParams, store: Store, by_id: dict[str, dict], sidecar: dict[str, str | None],
             resolved, needed: bool) -> tuple[Callable, int, Callable[[], None]]:
    """(compute_batch, batch size, after-run check) for the configured backend.

    The model is loaded (or the server checked) only when some key is missing, and
    before the batch loop, so a failure to load is one clear error, not one per item.
    """
    if p.backend == "sidecar":
        def compute_sidecar(batch):
            for item_id, key in batch:
                _write_item(store, key, sidecar[item_id].strip(), True, None)
        return compute_sidecar, 256, lambda: None

    def image_path(item_id: str) -> Path:
        return BUCKET_STORE / by_id[item_id]["file"]

    if p.backend == "ollama":
        from models.encoders.ollama import OllamaClient, OllamaUnreachable

        client = OllamaClient(p.ollama_host, p.timeout_s, p.retries, p.backoff_s)
        if needed:
            client.check(p.ollama_model)
        options = {"num_predict": p.max_new_tokens, "temperature": p.temperature}
        if p.temperature > 0:
            options.update(top_p=p.top_p, top_k=p.top_k, seed=p.seed)

        def one(pair):
            item_id, key = pair
            try:
                data = image_path(item_id).read_bytes()
            except OSError as e:
                return item_id, f"cannot read the bucketed image: {e}"
            try:
                res = client.generate(p.ollama_model, p.instruction, [data], options)
            except Exception as e:  # noqa: BLE001 — one failed request fails its item
                return item_id, str(e)
            if not res.text.strip():
                return item_id, "empty caption: the model produced no text"
            _write_item(store, key, res.text, res.ended, res.tokens)
            return item_id, None

        def compute_ollama(batch):
            # The server batches concurrent requests itself (OLLAMA_NUM_PARALLEL).
            with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                return {i: e for i, e in pool.map(one, batch) if e is not None}

        def after():
            if client.down:
                raise OllamaUnreachable(client.down + " Captions finished so far are kept; run the stage again.")
        return compute_ollama, p.batch_size, after

    if p.backend == "openai":
        from models.encoders.openai_chat import ChatPool, EndpointsDown

        pool = ChatPool(p.openai_endpoints, p.openai_model, p.openai_api_key_env, p.timeout_s, p.retries,
                        p.backoff_s, p.openai_max_in_flight)
        if needed:
            pool.check()

        def ask(pair):
            item_id, key = pair
            try:
                data = image_path(item_id).read_bytes()  # already a PNG: sent as it is
                res = pool.caption(data, p.instruction, p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.seed)
            except OSError as e:
                return item_id, f"cannot read the bucketed image: {e}"
            except Exception as e:  # noqa: BLE001 — one failed request fails its item; a dead pool: after()
                return item_id, str(e)
            if not res.text.strip():
                return item_id, "empty caption: the model produced no text"
            _write_item(store, key, res.text, res.ended, res.tokens)  # as it arrives: a failed run keeps it
            return item_id, None

        def compute_openai(batch):
            with ThreadPoolExecutor(max_workers=pool.concurrency) as ex:
                return {i: e for i, e in ex.map(ask, batch) if e is not None}

        def after_openai():
            if pool.down:
                raise EndpointsDown(pool.down + " Captions finished so far are kept; run the stage again.")
        # One batch fills every endpoint's in-flight slots.
        return compute_openai, pool.concurrency, after_openai

    captioner = None
    if needed:
        from models.encoders.gemma import GemmaCaptioner
        from models.hub import torch_device

        captioner = GemmaCaptioner(resolved.path, torch_device(), p.dtype)

    def compute_transformers(batch):
        errors, images, keys = {}, [], []
        for item_id, key in batch:
            try:
                images.append(_read_image(image_path(item_id)))
                keys.append((item_id, key))
            except OSError as e:  # PIL's UnidentifiedImageError is an OSError
                errors[item_id] = f"cannot read the bucketed image: {e}"
        if images:
            outs = captioner.caption(images, p.instruction, p.max_new_tokens, p.temperature, p.top_p,
                                     p.top_k, p.seed)
            for (item_id, key), g in zip(keys, outs):
                if g.text.strip():
                    _write_item(store, key, g.text, g.ended, g.tokens)
                else:
                    # Not stored: the next run tries again (with sampling it may work).
                    errors[item_id] = "empty caption: the model produced no text"
        return errors
    return compute_transformers, p.batch_size, lambda: None


def main(argv: list[str] | None = None) -> None:
    stage_main("caption", CaptionParams, caption, __doc__, argv)


if __name__ == "__main__":
    main()

"""Stage `expand`: words or scene ideas (a text file, one per line) -> image prompts.

    python -m tasks.expand            # reads params.yaml:expand; writes data/manifest/expand.parquet

As in the particleArt seed: a word ("love") goes to an instruction model (Qwen 2.5 3B
Instruct in transformers, or any OpenAI-compatible server), which answers a short visual
scene ("two people hugging"); each image template then wraps the scene ("Sparse black
particle flecks ... forming {scene}. ..."). The table holds one row per word x variation x
template (schema: tasks/curate/tables.py), which the `candidates` stage renders.

What is stored, and what is only applied: the store (data/derived/expand/) keeps the model's
RAW answer per (word, variation), keyed on the word, the model (its revision and dtype, or
the served model id), the instruction, the variation and the generation settings (top_p,
top_k and seed only when sampling). Normalising the answer into a scene and the templates are
applied when the table is written, so adding or editing a template asks the model nothing,
and adding a word asks it for that word's `variations` answers only. Variation i samples
with seed + i, so variations differ and each one is reproducible on its own.

The counts (metrics/expand.json) are of model answers, one per word x variation: what was
asked, reused or failed; metrics/expand.details.json adds the prompts written, the templates,
the mean words per scene and how many answers ran into max_new_tokens.

`backend: none` takes each line as the scene itself (a hand-written list of scenes): no
model, one variation; its items are stored all the same, so the table has a key per row.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.hub import SetupError
from tasks.core import manifest
from tasks.core.executors import model_executor
from tasks.core.params import PARAMS_FILE
from tasks.core.runner import run_model
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key
from tasks.core.workers import Failed, LocalModels, Result, Worker, check_device
from tasks.curate.tables import EXPAND, EXPAND_TABLE

log = logging.getLogger("niche.expand")

VERSION = 1  # bump when the item stored for the same key would change
STORE = Path("data/derived/expand")

DEFAULT_INSTRUCTION = (
    "Turn the word or idea '{word}' into one short visual scene: an abstract human figure or a few objects "
    "doing something that shows it. Answer with the scene only, under 20 words, no preamble.")
# The seed's first image prompt (the one it kept; its sharper rewrite produced fewer keepers).
PARTICLE_TEMPLATE = (
    "Sparse black particle flecks on a pure white background forming {scene}. Minimal, lots of negative "
    "space. No gray tones, no shading — just scattered black dots/flecks suggesting the form. Abstract, "
    "not realistic.")
EMPTY = "empty answer: the model produced no scene"


@dataclass(frozen=True)
class ExpandParams:
    words: str = "data/prompts/words.txt"  # one word or idea per line; blank and '#' lines skipped
    backend: Literal["transformers", "openai", "none"] = "transformers"  # none: each line is the scene
    instruction: str = DEFAULT_INSTRUCTION  # {word} is replaced by the line
    variations: int = 2  # scenes asked per word (variation i samples with seed + i)
    templates: tuple[tuple[str, str], ...] = (("particle", PARTICLE_TEMPLATE),)  # (name, text with {scene})
    # transformers backend
    model: str = "Qwen/Qwen2.5-3B-Instruct"  # hub id or local folder
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on a GPU, fp32 on a CPU
    batch_size: int = 16  # prompts per generate() when greedy; requests in flight per batch otherwise
    # generation (transformers and openai)
    max_new_tokens: int = 48  # a 20-word scene is ~30 tokens
    temperature: float = 0.8  # 0 = greedy (then variations must be 1: they would all be the same)
    top_p: float = 0.95
    top_k: int = 50
    seed: int = 0
    # openai backend (vLLM, SGLang): the same model behind each endpoint, asked concurrently
    openai_endpoints: tuple[str, ...] = ("http://127.0.0.1:8000/v1",)
    openai_model: str = "Qwen/Qwen2.5-3B-Instruct"  # the served model id: part of the key
    openai_api_key_env: str = "OPENAI_API_KEY"  # the env var holding the key; unset: "EMPTY"
    openai_max_in_flight: int = 8  # requests in flight per endpoint
    timeout_s: float = 120.0  # for one answer
    retries: int = 3  # on connection errors and 5xx, with exponential backoff
    backoff_s: float = 1.0

    def validate(self) -> None:
        if not self.words.strip():
            raise ValueError("expand.words: expected the path of a text file (one word or idea per line)")
        _check_format(self.instruction, "word", "expand.instruction")
        if self.variations < 1:
            raise ValueError(f"expand.variations: expected an integer >= 1, got {self.variations}")
        if self.variations > 1 and self.backend == "none":
            raise ValueError(f"expand.variations: backend none takes each line as its scene, so the "
                             f"{self.variations} variations would be the same; expected 1 (or expand.backend: "
                             "transformers | openai)")
        if self.variations > 1 and self.temperature == 0 and self.backend != "none":
            raise ValueError(f"expand.variations, expand.temperature: {self.variations} variations with "
                             "temperature 0 (greedy) would all be the same answer; raise expand.temperature "
                             "or set expand.variations: 1")
        if not self.templates:
            raise ValueError("expand.templates: expected at least one [name, template with {scene}]")
        names = [n for n, _ in self.templates]
        for i, (name, text) in enumerate(self.templates):
            if not name.strip() or name != name.strip():
                raise ValueError(f"expand.templates[{i}]: expected a non-empty name without surrounding "
                                 f"spaces, got {name!r}")
            _check_format(text, "scene", f"expand.templates[{i}] ({name})")
        if len(set(names)) < len(names):
            raise ValueError(f"expand.templates: names must be unique, got {names}")
        if not self.model:
            raise ValueError("expand.model: expected a hub id or a local folder")
        for name in ("batch_size", "max_new_tokens", "openai_max_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"expand.{name}: expected an integer >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"expand.temperature: expected >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"expand.top_p: expected a value in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"expand.top_k: expected >= 0 (0 = off), got {self.top_k}")
        urls = self.openai_endpoints
        if not urls or len(set(urls)) < len(urls) or not all(u.startswith(("http://", "https://")) for u in urls):
            raise ValueError(f"expand.openai_endpoints: expected distinct http(s):// base URLs such as "
                             f"http://127.0.0.1:8000/v1, got {list(urls)!r}")
        if not self.openai_model or not self.openai_api_key_env:
            raise ValueError("expand.openai_model, expand.openai_api_key_env: expected a served model id "
                             "(e.g. Qwen/Qwen2.5-3B-Instruct) and an environment variable's name")
        if self.timeout_s <= 0:
            raise ValueError(f"expand.timeout_s: expected > 0 seconds, got {self.timeout_s}")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("expand.retries, expand.backoff_s: expected >= 0")


def _check_format(text: str, field: str, key: str) -> None:
    """`text` must hold `{field}` and format with it alone (other braces doubled)."""
    if "{" + field + "}" not in text:
        raise ValueError(f"{key}: expected a text containing {{{field}}}, got {text!r}")
    try:
        text.format(**{field: "x"})
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{key}: does not format with {{{field}}} alone ({type(e).__name__}: {e}); "
                         "write a literal brace as {{ or }}") from None


# ---------------------------------------------------------------- words and scenes

def read_words(path: Path, key: str = "expand.words") -> list[str]:
    """The file's lines, stripped; blank lines and '#' comments skipped; each word once, in order."""
    if not path.is_file():
        raise SetupError(
            f"{key}: {path} does not exist. Write one word or scene idea per line into it (e.g. `love`, "
            f"`a quiet morning`; lines starting with # are comments) and commit it, or set {key} to your file.")
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(w for w in lines if w and not w.startswith("#")))


_LABEL = re.compile(r"^(?:visual\s+)?(?:scene|answer|image|prompt|description)\s*\d*\s*[:\-–—]\s*", re.I)
_BULLET = re.compile(r"^(?:[-*•]+|\d+[.)])\s+")
_QUOTES = "\"'“”‘’`"


def normalize_scene(text: str) -> str:
    """The scene in a model's answer: its first non-empty line, without a list bullet, markdown
    emphasis, a label ("Scene:"), surrounding quotes or a final full stop (the templates go on
    after {scene}); whitespace collapsed. A capitalised first word is lowered ("Two people" ->
    "two people"): the scene goes in mid-sentence. Empty when nothing is left."""
    line = next((s.strip() for s in text.strip().splitlines() if s.strip()), "")
    for _ in range(3):  # a label inside quotes inside emphasis, in any order
        line = _BULLET.sub("", line).strip("*_ ").strip()
        line = _LABEL.sub("", line).strip(_QUOTES + " ")
    line = " ".join(line.split()).rstrip(" .")
    first = line.split(" ", 1)[0]
    if len(first) > 1 and first[0].isupper() and first[1:].islower():
        line = line[0].lower() + line[1:]
    return line


def row_id(word: str, variation: int, template: str) -> str:
    """A table row's id: stable for the same word, variation and template name."""
    blob = json.dumps([word, variation, template], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _item(text: str, ended: bool, tokens: int | None) -> bytes:
    """A stored answer: the model's raw output, as the store keeps it."""
    doc = {"text": text, "ended": ended, "tokens": tokens}
    return (json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


def _answer(text: str, ended: bool, tokens: int | None) -> Result:
    """An answer worth storing, or why not: one without a scene is not stored (the next run asks again)."""
    if not text.strip():
        return Failed(EMPTY)
    if not normalize_scene(text):
        return Failed(f"no scene in the model's answer {text.strip()[:80]!r}")
    return _item(text, ended, tokens)


# ---------------------------------------------------------------- stage

def generation_params(p: ExpandParams, variation: int) -> dict:
    """What changes one answer besides the word and the model; sampling knobs only when sampling."""
    if p.backend == "none":
        return {"backend": "none"}
    g = {"backend": p.backend, "instruction": p.instruction, "variation": variation,
         "max_new_tokens": p.max_new_tokens, "temperature": p.temperature}
    if p.temperature > 0:
        g.update(top_p=p.top_p, top_k=p.top_k, seed=p.seed)
    return g


def expand(p: ExpandParams, out: Path = EXPAND_TABLE, store_dir: Path = STORE, workers: int | None = None,
           params_file: Path = PARAMS_FILE) -> Report:
    # `workers` is not used: the model uses the cores (or the GPU), a server is its own scale-out.
    words = read_words(Path(p.words))
    if not words:
        # The shipped words file holds only comments: `dvc repro` must cost nothing (and need no
        # model) for a project that does not use the front of the loop.
        log.info("expand: %s holds no word (only blank lines or # comments): nothing to expand", p.words)
        manifest.write_table([], EXPAND, out, sort_by="id")
        Store(store_dir, ".json").mark()  # the stage's out exists, empty
        return Report("expand", extra={"words": 0, "variations": p.variations,
                                       "templates": [name for name, _ in p.templates], "prompts": 0})
    executor = model_executor(params_file) if p.backend == "transformers" else LocalModels()
    with executor:
        return _expand(p, words, out, Store(store_dir, ".json"), executor)


def _expand(p: ExpandParams, words: list[str], out: Path, store: Store, executor) -> Report:
    resolved = None
    if p.backend == "transformers":
        from models.hub import resolve

        resolved = resolve(p.model, "expand.model", revision=p.revision)  # its revision is in every key
    model_key = _model_key(p, resolved, executor)
    items = {f"{v}:{w}": (w, v) for w in words for v in range(p.variations)}  # item id -> (word, variation)
    keys = {i: item_key("expand", VERSION, [w], generation_params(p, v), model=model_key)
            for i, (w, v) in items.items()}
    worker = _worker(p, resolved, executor.device())
    batch_size = worker.pool.concurrency if isinstance(worker, OpenAIWorker) else p.batch_size
    report = run_model("expand", list(keys.items()), store, worker, items.__getitem__, batch_size,
                       executor=executor)
    worker.after()  # a server that went away mid-run fails the stage, not just its items

    rows, scenes, truncated = [], {}, 0
    for item_id, (word, variation) in items.items():
        err = report.failures.get(item_id)
        if err is None:
            raw = json.loads(store.read_bytes(keys[item_id]).decode("utf-8"))
            scenes[item_id] = normalize_scene(raw["text"])
            truncated += not raw["ended"]
        for name, template in p.templates:
            row = dict(id=row_id(word, variation, name), word=word, variation=variation, template=name,
                       scene=None, prompt=None, key=None, file=None, error=err)
            if err is None:
                scene = scenes[item_id]
                row.update(scene=scene, prompt=template.format(scene=scene), key=keys[item_id],
                           file=store.relpath(keys[item_id]))
            rows.append(row)
    manifest.write_table(rows, EXPAND, out, sort_by="id")
    n_words = [len(s.split()) for s in scenes.values()]
    report.extra = {
        "words": len(words), "variations": p.variations, "templates": [n for n, _ in p.templates],
        "prompts": sum(r["prompt"] is not None for r in rows), "distinct_scenes": len(set(scenes.values())),
        "mean_words_per_scene": round(sum(n_words) / len(n_words), 1) if n_words else 0.0,
        # answers cut at max_new_tokens: the scene may stop mid-phrase (raise expand.max_new_tokens)
        "truncated": truncated,
    }
    if truncated and p.backend != "none":
        log.warning("expand: %d of %d answers hit max_new_tokens (%d); their scenes may be cut short",
                    truncated, len(scenes), p.max_new_tokens)
    return report


def _model_key(p: ExpandParams, resolved, executor) -> str | None:
    if p.backend == "none":
        return None
    if p.backend == "openai":
        return f"openai:{p.openai_model}"  # check() makes sure every endpoint serves it
    # bf16 and fp32 answer differently: the dtype actually used is in the key.
    return f"{resolved.key()}|{_dtype_name(p, executor.device())}"


def _dtype_name(p: ExpandParams, device: str) -> str:
    from models.hub import torch_dtype

    return str(torch_dtype(p.dtype, device)).removeprefix("torch.")


def _worker(p: ExpandParams, resolved, device: str) -> "ExpandWorker":
    if p.backend == "transformers":
        return InstructWorker(p, resolved, _dtype_name(p, device), device)
    if p.backend == "openai":
        return OpenAIWorker(p)
    return NoModelWorker()


class ExpandWorker(Worker):
    """A backend's model side: (word, variation) pairs in, raw answers out; `after()` runs on the
    driver once the batches are done."""

    def after(self) -> None:
        pass


class NoModelWorker(ExpandWorker):
    """backend none: the line is the scene; stored like an answer, so each row has its key."""

    def run(self, items: list[tuple[str, int]]) -> list[Result]:
        return [_answer(word, True, None) for word, _ in items]


class InstructWorker(ExpandWorker):
    """An instruction model in transformers (models/encoders/instruct.py), wherever it runs."""

    def __init__(self, p: ExpandParams, model, dtype: str, device: str):
        self.p, self.model, self.dtype, self.device = p, model, dtype, device
        self.llm = None

    def setup(self) -> str:
        from models.encoders.instruct import InstructModel
        from models.hub import resolve_here

        check_device(self.device)
        here = resolve_here(self.model, "expand.model")
        self.llm = InstructModel(here.path, self.device, self.dtype)
        return f"instruction model {self.model.key()}, {self.dtype} on {self.device}"

    def run(self, items: list[tuple[str, int]]) -> list[Result]:
        p = self.p
        gens = self.llm.generate([p.instruction.format(word=w) for w, _ in items], p.max_new_tokens,
                                 p.temperature, p.top_p, p.top_k, [p.seed + v for _, v in items])
        return [_answer(g.text, g.ended, g.tokens) for g in gens]


class OpenAIWorker(ExpandWorker):
    """OpenAI-compatible servers (vLLM, SGLang): a batch fills every endpoint's in-flight slots."""

    def __init__(self, p: ExpandParams):
        from models.encoders.openai_chat import ChatPool

        self.p = p
        self.pool = ChatPool(p.openai_endpoints, p.openai_model, p.openai_api_key_env, p.timeout_s, p.retries,
                             p.backoff_s, p.openai_max_in_flight, section="expand")

    def setup(self) -> str:
        self.pool.check()
        return f"{self.p.openai_model} on {len(self.p.openai_endpoints)} endpoint(s)"

    def _one(self, item: tuple[str, int]) -> Result:
        p = self.p
        word, variation = item
        try:
            res = self.pool.complete(p.instruction.format(word=word), p.max_new_tokens, p.temperature, p.top_p,
                                     p.top_k, p.seed + variation)
        except Exception as e:  # noqa: BLE001 — one failed request fails its item; a dead pool: after()
            return Failed(str(e))
        return _answer(res.text, res.ended, res.tokens)

    def run(self, items: list[tuple[str, int]]) -> list[Result]:
        with ThreadPoolExecutor(max_workers=self.pool.concurrency) as ex:
            return list(ex.map(self._one, items))

    def after(self) -> None:
        from models.encoders.openai_chat import EndpointsDown

        if self.pool.down:
            raise EndpointsDown(self.pool.down + " Scenes finished so far are kept; run the stage again.")


def main(argv: list[str] | None = None) -> None:
    stage_main("expand", ExpandParams, expand, __doc__, argv)


if __name__ == "__main__":
    main()

"""The caption stage with a real tiny Gemma 3 (random weights, loaded by the same
code as google/gemma-3-27b-it), the sidecar backend, and the text checks."""
import io
import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from models.encoders.gemma import GemmaCaptioner, build_tiny_gemma3
from models.hub import TINY_MARKER, ModelMissing
from tasks.bucket import BucketParams, bucket
from tasks.caption import (DEFAULT_INSTRUCTION, FLAG_MAX_TOKENS, FLAG_REPETITION, STORE, CaptionParams,
                           apply_trigger, caption, caption_flags, normalize, repetition_coverage)
from tasks.ingest import IngestParams, ingest
from tasks.core.params import ParamsError, from_dict
from tasks.sample.__main__ import make_sample
from tests.conftest import bucketed_sample
from tests.storekit import item_bytes, replace_item

M = Path("data/manifest")
SMALL = BucketParams(buckets=((256, 256), (320, 192), (192, 320)))


def _rows() -> list[dict]:
    return pq.read_table(M / "caption.parquet").to_pylist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("models") / "gemma3")


@pytest.fixture
def bucketed(chdir):
    bucketed_sample(SMALL, figures=4)
    return chdir


def test_tiny_builder_writes_a_labelled_folder_autoprocessor_loads(tiny):
    from transformers import AutoProcessor

    assert (tiny / TINY_MARKER).is_file() and (tiny / "model.safetensors").is_file()
    proc = AutoProcessor.from_pretrained(tiny)
    # Without torchvision, transformers picks Gemma 3's PIL/numpy image processor.
    assert type(proc).__name__ == "Gemma3Processor"
    assert type(proc.image_processor).__name__ == "Gemma3ImageProcessorPil"
    ids = proc.tokenizer("<start_of_turn>user\n", add_special_tokens=False).input_ids
    assert ids[0] == proc.tokenizer.convert_tokens_to_ids("<start_of_turn>")  # one token, not 15


def test_tiny_gemma_end_to_end_caches_and_applies_the_trigger_late(bucketed, tiny, caplog):
    p = CaptionParams(model=str(tiny), max_new_tokens=12, batch_size=3)  # batches of 3 and 1
    report = caption(p, workers=2)
    rows = _rows()
    assert len(rows) == 4 and report.computed == 4 and report.failed == 0
    for r in rows:
        assert r["error"] is None and r["text"] and r["split"] == "train"
        raw = json.loads(item_bytes(STORE, r["key"]))
        assert set(raw) == {"text", "ended", "tokens"}
        assert r["text"] == normalize(raw["text"])
        # Random weights never say "the end": every caption runs into the limit and is flagged.
        assert raw["tokens"] == 12 and raw["ended"] is False and FLAG_MAX_TOKENS in r["flags"]
    assert report.extra["flagged"][FLAG_MAX_TOKENS] == 4
    first = pq.read_table(M / "caption.parquet")

    caplog.set_level(logging.INFO, logger="niche.caption")
    from tasks.core.store import Store

    def not_read(*a, **k):
        raise AssertionError("a raw caption was read back although the last table, made with the same "
                             "trigger and threshold, holds its key")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Store, "read_bytes", not_read)
        again = caption(p, workers=2)
    assert again.computed == 0 and again.reused == 4
    assert "loading Gemma 3" not in caplog.text  # nothing missing: the model is not loaded
    assert pq.read_table(M / "caption.parquet").equals(first)

    other = caption(CaptionParams(model=str(tiny), max_new_tokens=12, batch_size=3,
                                  instruction="List the colours in this image."), workers=2)
    assert other.computed == 4
    assert not {r["key"] for r in _rows()} & {r["key"] for r in first.to_pylist()}

    triggered = caption(CaptionParams(model=str(tiny), max_new_tokens=12, batch_size=3, trigger="TOK"), workers=2)
    assert triggered.computed == 0 and triggered.reused == 4
    before = {r["id"]: r["text"] for r in first.to_pylist()}
    for r in _rows():
        assert r["text"] == f"TOK, {before[r['id']]}"


def test_tiny_builder_is_deterministic(tiny, tmp_path):
    again = build_tiny_gemma3(tmp_path / "gemma3")

    def digests(folder: Path) -> dict[str, str]:
        return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}

    assert digests(again) == digests(tiny)
    assert sum(f.stat().st_size for f in tiny.iterdir()) < 2_000_000


def test_tiny_gemma_can_only_generate_plain_words(tiny):
    # generation_config.json bans every token but the words; what is left decodes
    # to " word": no byte-fallback piece (U+FFFD), no special, no control character.
    from transformers import AutoProcessor, GenerationConfig

    tok = AutoProcessor.from_pretrained(tiny).tokenizer
    banned = set(GenerationConfig.from_pretrained(tiny).suppress_tokens)
    allowed = [i for i in range(len(tok)) if i not in banned]
    assert len(allowed) >= 100
    for i in allowed:
        assert re.fullmatch(r" [a-z]+", tok.decode([i])), (i, tok.decode([i]))
    for name in ("<eos>", "<end_of_turn>", "<start_of_image>", "<image_soft_token>", "<0xEF>", "a", "\n"):
        assert tok.convert_tokens_to_ids(name) in banned, name


def _bucketed_figures(sizes: BucketParams) -> list[Image.Image]:
    bucket(sizes, workers=2)
    rows = sorted(pq.read_table(M / "bucket.parquet").to_pylist(), key=lambda r: r["id"])
    return [Image.open(io.BytesIO(item_bytes("data/derived/bucket", r["key"]))).convert("RGB") for r in rows]


def test_tiny_gemma_captions_depend_on_the_image_and_read_as_words(chdir, tiny):
    # The demo's failure: one unreadable caption ('JaaJJJJ\ufffdJ...') for every
    # image, so all captions collapsed into one T5 item downstream.
    make_sample(Path("data/raw"), figures=8, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    cap = GemmaCaptioner(tiny, "cpu")
    for sizes in (BucketParams(), SMALL):  # ~1 MP, and small
        images = _bucketed_figures(sizes)
        assert len(images) == 8
        gens = cap.caption(images + images[:2], DEFAULT_INSTRUCTION, max_new_tokens=16)
        texts = [g.text for g in gens]
        assert len(set(texts[:8])) >= 6, texts
        assert texts[8:] == texts[:2]  # the same image, the same caption
        for t in texts:
            assert re.fullmatch(r"( [a-z]+)+", t), t  # plain words: no U+FFFD, no control character
            assert len(set(t.split())) >= 8, t  # not one word over and over


def test_batched_generation_equals_one_at_a_time(tiny):
    cap = GemmaCaptioner(tiny, "cpu")
    rng = np.random.default_rng(0)
    images = [Image.new("RGB", (256, 256), (220, 30, 30)),
              Image.fromarray(rng.integers(0, 255, (192, 320, 3), dtype=np.uint8)),
              Image.new("RGB", (192, 320), (20, 40, 230))]
    batched = cap.caption(images, "Describe this image.", max_new_tokens=10)
    single = [cap.caption([im], "Describe this image.", max_new_tokens=10)[0] for im in images]
    assert batched == single
    assert all(g.text and g.tokens == 10 for g in batched)
    assert len({g.text for g in batched}) > 1  # the image reaches the model
    # The stage's prompts are all the same length; prompts of different lengths
    # are padded, on the left, and still give each image its own caption.
    prompts = ["Describe.", "Describe this image in detail, please.", "Colours?"]
    padded = cap.caption(images, prompts, max_new_tokens=10)
    assert padded == [cap.caption([im], [t], max_new_tokens=10)[0] for im, t in zip(images, prompts)]


def test_bad_images_fail_alone_with_a_reason(chdir, tiny):
    make_sample(Path("data/raw"), figures=4, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    # An original changed after ingest: bucket lists it as failed.
    changed = Path("data/raw/figures/figure_00003.png")
    changed.write_bytes(changed.read_bytes() + b"\0")
    bucket(SMALL, workers=2)
    buckets = {r["id"]: r for r in pq.read_table(M / "bucket.parquet").to_pylist()}
    ok = sorted(i for i, r in buckets.items() if r["error"] is None)
    # A bucketed image damaged on disk after bucket ran.
    replace_item("data/derived/bucket", buckets[ok[0]]["key"], b"not a png")

    report = caption(CaptionParams(model=str(tiny), max_new_tokens=8, batch_size=4), workers=2)
    rows = {r["id"]: r for r in _rows()}
    assert report.total == 4 and report.computed == 2 and report.failed == 2
    bad_bucket = next(i for i, r in buckets.items() if r["error"] is not None)
    assert rows[bad_bucket]["error"].startswith("bucket failed: ") and "changed since ingest" in rows[bad_bucket]["error"]
    assert rows[ok[0]]["error"].startswith("cannot read the bucketed image")
    for r in rows.values():
        assert (r["text"] is None) == (r["error"] is not None)
        assert (r["key"] is None) == (r["error"] is not None)


def test_sidecar_captions_come_from_ingest_and_a_missing_one_is_listed(chdir):
    make_sample(Path("data/raw"), figures=3, photos=False, bad_examples=False)
    Path("data/raw/figures/figure_00001.txt").unlink()
    ingest(IngestParams(), workers=2)
    bucket(SMALL, workers=2)
    sidecar = {r["id"]: r["caption"] for r in pq.read_table(M / "ingest.parquet").to_pylist()}

    # The default model (google/gemma-3-27b-it) is not on this machine: the sidecar
    # backend must not even look for it.
    report = caption(CaptionParams(backend="sidecar", trigger="TOK"), workers=2)
    rows = _rows()
    assert report.computed == 2 and report.failed == 1
    for r in rows:
        if sidecar[r["id"]] is None:
            assert r["error"] == "no sidecar caption" and r["text"] is None
        else:
            assert r["text"] == f"TOK, {normalize(sidecar[r['id']])}" and r["flags"] == []

    # Editing one caption file re-does that caption only.
    Path("data/raw/figures/figure_00002.txt").write_text("a figure   drawn\nin dots")
    ingest(IngestParams(), workers=2)
    again = caption(CaptionParams(backend="sidecar"), workers=2)
    assert again.computed == 1 and again.reused == 1
    assert "a figure drawn in dots" in {r["text"] for r in _rows()}


def test_sidecar_first_keeps_each_txt_and_the_model_captions_only_the_rest(chdir, tiny):
    make_sample(Path("data/raw"), figures=3, photos=False, bad_examples=False)
    Path("data/raw/figures/figure_00001.txt").unlink()
    ingest(IngestParams(), workers=2)
    bucket(SMALL, workers=2)
    paths = {r["id"]: r["path"] for r in pq.read_table(M / "ingest.parquet").to_pylist()}
    p = CaptionParams(model=str(tiny), max_new_tokens=8, sidecar_first=True)
    report = caption(p, workers=2)
    assert report.computed == 3 and report.failed == 0
    by_path = {paths[r["id"]]: r["text"] for r in _rows()}
    for path, text in by_path.items():
        txt = Path(path).with_suffix(".txt")
        if txt.exists():
            assert text == normalize(txt.read_text())
        else:  # figure_00001: no .txt, so the model wrote it
            assert text and text != normalize(Path("data/raw/figures/figure_00002.txt").read_text())

    # A caption fixed by hand (or on the curation page) is one caption; nothing else is asked.
    Path("data/raw/figures/figure_00002.txt").write_text("a figure fixed in place")
    ingest(IngestParams(), workers=2)
    again = caption(p, workers=2)
    assert (again.computed, again.reused) == (1, 2)
    assert "a figure fixed in place" in {r["text"] for r in _rows()}


def test_a_missing_model_names_the_parameter(bucketed, monkeypatch):
    # An empty hub cache: on a machine that has the real model, it must not load 27B here.
    # (huggingface_hub reads HF_HUB_CACHE once, at import: patch the constant it uses.)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(bucketed / "empty-cache"))
    monkeypatch.delenv("NICHE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelMissing, match=r"caption\.model.*google/gemma-3-27b-it"):
        caption(CaptionParams(), workers=2)  # the real default
    with pytest.raises(ModelMissing, match=r"caption\.model"):
        caption(CaptionParams(model=str(bucketed / "no-such-folder")), workers=2)
    assert not Path(STORE).exists()


@pytest.mark.parametrize("raw, key", [
    ({"max_new_tokens": 0}, "caption.max_new_tokens"),
    ({"backend": "vllm"}, "caption.backend"),
    ({"trigger": "TOK, "}, "caption.trigger"),
    ({"temperature": -1.0}, "caption.temperature"),
    ({"ollama_host": "localhost:11434"}, "caption.ollama_host"),
    ({"instruction": "  "}, "caption.instruction"),
    ({"max_tokens": 5}, "caption.max_tokens"),
])
def test_bad_parameters_are_refused_by_name(raw, key):
    with pytest.raises((ParamsError, ValueError), match=key.replace(".", r"\.")):
        from_dict(CaptionParams, raw, "caption")


def test_normalize_and_trigger():
    assert normalize("  A  figure,\n\n\tarms   raised. ") == "A figure, arms raised."
    assert normalize(" \n ") == ""
    assert apply_trigger("a figure", "TOK") == "TOK, a figure"
    assert apply_trigger("TOK, a figure", "TOK") == "TOK, a figure"  # already there
    assert apply_trigger("TOKYO at night", "TOK") == "TOK, TOKYO at night"
    assert apply_trigger("a figure", "") == "a figure"


PROSE = (
    "A fair-skinned woman with a slender build and visible clavicle is positioned in a close-up, frontal "
    "portrait. Her dark, curly hair frames her face and falls past her shoulders in loose ringlets. She wears "
    "a sleeveless cream top with a scooped neckline. Soft daylight enters from the left, leaving a gentle "
    "shadow along the right side of her jaw and neck. The background is a plain, warm grey wall, slightly out "
    "of focus. Her eyes are brown and look straight at the camera; her lips are closed and unpainted. A thin "
    "gold chain rests on her collarbone. The colour palette is muted: beige, cream, brown and grey, with the "
    "highest contrast at the hairline against the pale skin of her forehead and the light wall behind her.")


def test_runaway_detection():
    assert repetition_coverage(PROSE) < 0.15
    assert caption_flags(PROSE, ended=True, repetition_threshold=0.3) == []
    assert caption_flags(PROSE, ended=False, repetition_threshold=0.3) == [FLAG_MAX_TOKENS]
    loop = PROSE[:200] + " and a red dot," * 30
    assert repetition_coverage(loop) > 0.6
    assert FLAG_REPETITION in caption_flags(loop, ended=False, repetition_threshold=0.3)
    assert repetition_coverage("dot " * 40) == 1.0
    # A short human caption is never "repetitive".
    assert repetition_coverage("a figure, a figure, a figure") == 0.0

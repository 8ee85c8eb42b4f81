"""embed_text on a tiny random-weight T5 built here and loaded like a real one."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from models.hub import ModelMissing
from models.encoders.t5 import T5Encoder, build_tiny_t5, check_vocab
from tasks.sample.corpus import tiny_corpus
from tasks import embed_text as stage
from tasks.embed_text import EmbedTextParams, embed_text
from tasks.ingest import IngestParams, ingest
from tasks.core.params import from_dict
from tasks.sample.__main__ import make_sample
from tasks.core.store import Store, read_tensors

M = Path("data/manifest")
# What this stage reads of the caption stage's manifest (its other columns are not used).
CAPTION = pa.schema([("id", pa.string()), ("split", pa.string()), ("text", pa.string()), ("error", pa.string())])


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("models") / "t5", tiny_corpus())


@pytest.fixture
def captioned(chdir) -> list[dict]:
    """Six figures with their sidecar captions as the caption stage's manifest."""
    make_sample(Path("data/raw"), figures=6, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    rows = [dict(id=r["id"], split=r["split"], text=r["caption"], error=None)
            for r in pq.read_table(M / "ingest.parquet").to_pylist()]
    write_captions(rows)
    return rows


def write_captions(rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows, schema=CAPTION), M / "caption.parquet")


def manifest_rows() -> list[dict]:
    return pq.read_table(M / "embed_text.parquet").to_pylist()


def load(row: dict) -> dict:
    return read_tensors(Store(stage.STORE, ".safetensors"), row["key"])[0]


def by_hand(model_dir: Path, text: str, max_length: int = 512) -> np.ndarray:
    """The reference: the saved model run alone on one text, no padding, fp32."""
    from transformers import T5EncoderModel, T5Tokenizer

    tok = T5Tokenizer.from_pretrained(model_dir)
    model = T5EncoderModel.from_pretrained(model_dir).eval()
    ids = tok(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        return model(input_ids=ids).last_hidden_state[0].numpy()


def test_stores_trimmed_fp16_states_with_their_length(captioned, tiny_t5):
    report = embed_text(EmbedTextParams(model=str(tiny_t5), batch_size=4), workers=2)
    assert (report.total, report.computed, report.failed) == (6, 6, 0)
    assert report.extra["tiny_model"] is True
    encoder = T5Encoder(tiny_t5, torch.float32, "cpu")
    text = {r["id"]: r["text"] for r in captioned}
    rows = manifest_rows()
    assert [r["id"] for r in rows] == sorted(text)
    for r in rows:
        ids = encoder.tokenizer(text[r["id"]])["input_ids"]
        assert ids[-1] == encoder.tokenizer.eos_token_id and len(ids) > 10
        item = load(r)
        assert item["hidden"].dtype == np.float16 and item["hidden"].shape == (len(ids), 64)
        assert int(item["length"]) == r["length"] == len(ids)
        assert not bool(item["truncated"]) and r["truncated"] is False and r["error"] is None
        assert r["file"] == Store(stage.STORE, ".safetensors").relpath(r["key"])
    ref = by_hand(tiny_t5, text[rows[0]["id"]])
    np.testing.assert_allclose(load(rows[0])["hidden"].astype(np.float32), ref, rtol=2e-3, atol=2e-3)


def test_padding_never_changes_a_caption(captioned, tiny_t5):
    encoder = T5Encoder(tiny_t5, torch.float32, "cpu")
    short, long = "a figure waving", captioned[0]["text"]
    assert encoder.count_tokens([short])[0] < encoder.count_tokens([long])[0] - 5
    (alone, _), = encoder.encode([short], 512)
    (padded, _), (full, _) = encoder.encode([short, long], 512)
    assert padded.shape == alone.shape
    np.testing.assert_allclose(padded, alone, rtol=1e-5, atol=1e-5)
    # Through the stage: one item per batch and all six in one batch store the same states.
    embed_text(EmbedTextParams(model=str(tiny_t5), batch_size=1), store_dir=Path("one"))
    embed_text(EmbedTextParams(model=str(tiny_t5), batch_size=6), store_dir=Path("six"))
    lengths = {r["length"] for r in manifest_rows()}
    assert len(lengths) > 1  # so the batch of six was really padded
    for r in manifest_rows():
        a = read_tensors(Store("one", ".safetensors"), r["key"])[0]["hidden"]
        b = read_tensors(Store("six", ".safetensors"), r["key"])[0]["hidden"]
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), rtol=1e-3, atol=1e-3)


def test_truncation_is_flagged(captioned, tiny_t5):
    captioned[0]["text"] = "a figure"
    write_captions(captioned)
    embed_text(EmbedTextParams(model=str(tiny_t5), max_length=8), workers=2)
    rows = {r["id"]: r for r in manifest_rows()}
    short = rows.pop(captioned[0]["id"])
    assert short["truncated"] is False and short["length"] < 8
    for r in rows.values():
        item = load(r)
        assert r["truncated"] is True and bool(item["truncated"]) and r["length"] == 8
        assert item["hidden"].shape == (8, 64)
    text = next(c["text"] for c in captioned if c["id"] == next(iter(rows)))
    np.testing.assert_allclose(load(next(iter(rows.values())))["hidden"].astype(np.float32),
                               by_hand(tiny_t5, text, max_length=8), rtol=2e-3, atol=2e-3)


def test_float16_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"embed_text\.dtype.*overflows in float16"):
        from_dict(EmbedTextParams, {"dtype": "float16"}, "embed_text")
    with pytest.raises(ValueError, match=r"embed_text\.dtype"):
        from_dict(EmbedTextParams, {"dtype": "half"}, "embed_text")
    with pytest.raises(ValueError, match=r"embed_text\.max_length"):
        from_dict(EmbedTextParams, {"max_length": 1}, "embed_text")
    with pytest.raises(ValueError, match="overflows"):
        EmbedTextParams(dtype="float16").validate()


def test_editing_one_caption_reencodes_one_item(captioned, tiny_t5, monkeypatch):
    p = EmbedTextParams(model=str(tiny_t5))
    embed_text(p, workers=2)
    before = {r["id"]: r["key"] for r in manifest_rows()}

    class NotLoaded:
        def __init__(self, *a, **k):
            raise AssertionError("the model was loaded although every item was cached")

    table = Path("data/manifest/embed_text.parquet")
    first = table.read_bytes()
    read_back = []
    real_info = stage.read_item_info

    def counted(store, key):
        read_back.append(key)
        return real_info(store, key)

    with monkeypatch.context() as m:
        m.setattr(stage.t5, "T5Encoder", NotLoaded)
        m.setattr(stage, "read_item_info", counted)
        again = embed_text(p, workers=2)
    assert (again.computed, again.reused) == (0, 6)
    # The lengths come from the last table (a key names one content): no item is read back.
    assert read_back == [] and table.read_bytes() == first

    captioned[2]["text"] += ", in bright light"
    write_captions(captioned)
    with monkeypatch.context() as m:
        m.setattr(stage, "read_item_info", counted)
        report = embed_text(p, workers=2)
    assert (report.computed, report.reused, report.failed) == (1, 5, 0)
    assert read_back == [next(r["key"] for r in manifest_rows() if r["id"] == captioned[2]["id"])]
    after = {r["id"]: r["key"] for r in manifest_rows()}
    assert [i for i in before if before[i] != after[i]] == [captioned[2]["id"]]


def test_identical_captions_share_one_item(captioned, tiny_t5):
    captioned[1]["text"] = captioned[0]["text"]
    write_captions(captioned)
    report = embed_text(EmbedTextParams(model=str(tiny_t5)), workers=2)
    assert (report.total, report.computed, report.reused) == (6, 5, 1)
    assert report.extra["items"] == 5
    keys = {r["id"]: r["key"] for r in manifest_rows()}
    assert keys[captioned[0]["id"]] == keys[captioned[1]["id"]]
    assert len(Store(stage.STORE, ".safetensors").keys()) == 5


def test_failed_captions_are_listed_with_the_reason(captioned, tiny_t5):
    captioned[0].update(text=None, error="ollama: connection refused")
    captioned[1].update(text="   ")
    write_captions(captioned)
    report = embed_text(EmbedTextParams(model=str(tiny_t5)), workers=2)
    assert (report.computed, report.failed) == (4, 2)
    rows = {r["id"]: r for r in manifest_rows()}
    assert rows[captioned[0]["id"]]["error"] == "no caption (ollama: connection refused)"
    assert rows[captioned[1]["id"]]["error"] == "empty caption"
    assert all(rows[c["id"]]["key"] is None for c in captioned[:2])
    assert report.failures[captioned[0]["id"]].startswith("no caption")


def test_a_tokenizer_that_does_not_fit_the_model_is_refused(captioned, tiny_t5, tmp_path):
    with pytest.raises(ValueError, match="only 4 tokens"):
        check_vocab(4, 700, tiny_t5)
    bad = tmp_path / "bad-t5"
    shutil.copytree(tiny_t5, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["vocab_size"] = 32128  # a real T5's table with the tiny tokenizer
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="700 tokens for a model with 32128"):
        embed_text(EmbedTextParams(model=str(bad)), workers=2)


def test_a_missing_model_names_the_parameter(captioned):
    with pytest.raises(ModelMissing, match=r"embed_text\.model.*no-such/t5"):
        embed_text(EmbedTextParams(model="no-such/t5"), workers=2)


def test_command_line_writes_manifest_and_metrics(captioned, tiny_t5):
    Path("params.yaml").write_text(f"embed_text:\n  model: {tiny_t5}\n  max_length: 64\n")
    stage.main([])
    metrics = json.loads(Path("metrics/embed_text.json").read_text())
    assert (metrics["total"], metrics["computed"], metrics["failed"]) == (6, 6, 0)
    assert len(manifest_rows()) == 6

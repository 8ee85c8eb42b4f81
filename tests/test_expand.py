"""The expand stage with a real tiny Qwen2 chat model (random weights, built from a config and
loaded by the same code as Qwen/Qwen2.5-3B-Instruct), the none backend, and the openai backend
against a real OpenAI-compatible server (tests/openai_server.py) serving that same folder."""
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.encoders import instruct
from models.encoders.gemma import Generation
from models.hub import TINY_MARKER, SetupError
from tasks.core.params import ParamsError, from_dict
from tasks.curate.tables import EXPAND, EXPAND_TABLE
from tasks.expand import (EMPTY, PARTICLE_TEMPLATE, STORE, VERSION, ExpandParams, expand, generation_params,
                          normalize_scene, read_words, row_id)
from tasks.core.store import item_key
from tests.conftest import ROOT
from tests.openai_server import Served, free_port
from tests.storekit import item_bytes

WORDS = Path("data/prompts/words.txt")
PLAIN = ("plain", "a drawing of {scene}, white background")
SERVED_ID = "tiny/qwen2"


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return instruct.build_tiny_qwen2(tmp_path_factory.mktemp("models") / "qwen2")


def _words(*lines: str) -> None:
    WORDS.parent.mkdir(parents=True, exist_ok=True)
    WORDS.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _params(model: Path, **kw) -> ExpandParams:
    return ExpandParams(**{"model": str(model), "max_new_tokens": 10, "batch_size": 3,
                           "templates": (("particle", PARTICLE_TEMPLATE), PLAIN), **kw})


def _rows() -> list[dict]:
    table = pq.read_table(EXPAND_TABLE)
    assert table.schema.equals(EXPAND, check_metadata=False)
    return table.to_pylist()


def _scenes() -> dict[tuple[str, int], str]:
    return {(r["word"], r["variation"]): r["scene"] for r in _rows()}


def test_tiny_builder_is_labelled_deterministic_and_chat_shaped(qwen, tmp_path):
    from transformers import AutoTokenizer

    assert (qwen / TINY_MARKER).is_file() and (qwen / "model.safetensors").is_file()
    again = instruct.build_tiny_qwen2(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json", "generation_config.json"):
        assert (again / name).read_bytes() == (qwen / name).read_bytes(), name
    tok = AutoTokenizer.from_pretrained(qwen)
    text = tok.apply_chat_template([{"role": "user", "content": "love"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nlove<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # one token, not 12 characters
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\nYou are Qwen")


def test_answers_depend_on_their_own_seed_not_on_the_batch(qwen):
    llm = instruct.InstructModel(qwen, "cpu")
    prompts = ["Turn 'love' into a scene", "Turn 'a quiet morning' into a scene"]
    greedy = llm.generate(prompts, 8)
    assert [g.tokens for g in greedy] == [8, 8] and not any(g.ended for g in greedy)  # it never stops
    assert llm.generate(prompts[1:], 8) == greedy[1:]  # left padding changes nothing
    sampled = llm.generate(prompts, 8, 0.8, 0.95, 0, [5, 6])
    assert llm.generate(prompts[1:], 8, 0.8, 0.95, 0, [6]) == sampled[1:]
    assert llm.generate(prompts[:1], 8, 0.8, 0.95, 0, [7]) != sampled[:1]


def test_table_rows_are_words_x_variations_x_templates_and_a_rerun_computes_nothing(chdir, qwen):
    _words("# seeds of the particle set", "love", "  a quiet morning ", "", "love")
    assert read_words(WORDS) == ["love", "a quiet morning"]
    p = _params(qwen)
    report = expand(p)
    assert (report.total, report.computed, report.reused, report.failed) == (4, 4, 0, 0)
    rows = _rows()
    assert len(rows) == 2 * 2 * 2 and len({r["id"] for r in rows}) == 8
    model_key = None
    for r in rows:
        assert r["id"] == row_id(r["word"], r["variation"], r["template"]) and r["error"] is None
        raw = json.loads(item_bytes(STORE, r["key"]))
        assert r["scene"] == normalize_scene(raw["text"]) and len(r["scene"].split()) >= 3
        template = dict(p.templates)[r["template"]]
        assert r["prompt"] == template.format(scene=r["scene"])
        if model_key is None:
            from models.hub import resolve

            model_key = f"{resolve(str(qwen), 'expand.model').key()}|float32"
        assert r["key"] == item_key("expand", VERSION, [r["word"]], generation_params(p, r["variation"]),
                                    model=model_key)
    assert all(r["prompt"].startswith("Sparse black particle flecks on a pure white background forming ")
               for r in rows if r["template"] == "particle")
    assert report.extra["prompts"] == 8 and report.extra["templates"] == ["particle", "plain"]
    assert report.extra["truncated"] == 4  # the tiny model never stops by itself

    table = EXPAND_TABLE.read_bytes()
    again = expand(p)
    assert (again.computed, again.reused, again.failed) == (0, 4, 0)
    assert EXPAND_TABLE.read_bytes() == table


def test_a_new_word_asks_for_its_variations_and_a_template_change_asks_nothing(chdir, qwen, monkeypatch):
    _words("love", "war")
    p = _params(qwen)
    expand(p)
    before = _scenes()
    _words("love", "war", "joy")
    added = expand(p)
    assert (added.computed, added.reused) == (2, 4)
    assert {k: v for k, v in _scenes().items() if k[0] != "joy"} == before

    # Templates are applied when the table is written: the model is not even loaded.
    monkeypatch.setattr(instruct.InstructModel, "__init__", lambda *a, **k: pytest.fail("model loaded"))
    edited = replace(p, templates=(("particle", "Black dots forming {scene}."), ("outline", "{scene}, in outline")))
    report = expand(edited)
    assert (report.computed, report.reused) == (0, 6)
    rows = _rows()
    assert len(rows) == 12 and {r["template"] for r in rows} == {"particle", "outline"}
    assert all(r["prompt"] == ("Black dots forming {scene}." if r["template"] == "particle"
                               else "{scene}, in outline").format(scene=r["scene"]) for r in rows)


def test_sampling_settings_and_the_instruction_are_in_the_key(chdir, qwen):
    _words("love", "war")
    p = _params(qwen, templates=(PLAIN,))
    expand(p)
    first = {(r["word"], r["variation"]): r for r in _rows()}
    # Each variation samples with its own seed: keys always differ, answers here too.
    for w in ("love", "war"):
        assert first[(w, 0)]["key"] != first[(w, 1)]["key"]
    assert any(first[(w, 0)]["scene"] != first[(w, 1)]["scene"] for w in ("love", "war"))
    for change in (dict(temperature=0.9), dict(instruction="Draw '{word}' as a scene."), dict(seed=1),
                   dict(max_new_tokens=9), dict(top_k=5)):
        report = expand(replace(p, **change))
        assert report.computed == 4 and report.reused == 0, change
    back = expand(p)  # the first answers are all still in the store
    assert back.computed == 0 and {(r["word"], r["variation"]): r["key"] for r in _rows()} == {
        k: r["key"] for k, r in first.items()}
    # Greedy keys leave the sampling knobs out: a seed changes nothing.
    greedy = replace(p, temperature=0.0, variations=1)
    assert expand(greedy).computed == 2
    assert expand(replace(greedy, seed=9, top_p=0.5)).computed == 0


def test_backend_none_takes_each_line_as_the_scene(chdir):
    _words("Two people hugging.", "a bird leaving its cage")
    p = ExpandParams(backend="none", variations=1, model="no/such-model", templates=(PLAIN,))
    report = expand(p)
    assert (report.computed, report.failed) == (2, 0)
    rows = {r["word"]: r for r in _rows()}
    assert rows["Two people hugging."]["prompt"] == "a drawing of two people hugging, white background"
    assert rows["a bird leaving its cage"]["scene"] == "a bird leaving its cage"
    assert all(r["key"] and r["variation"] == 0 for r in rows.values())
    assert expand(p).reused == 2


def test_an_empty_answer_fails_its_item_with_the_reason_and_the_rest_goes_on(chdir, qwen, monkeypatch):
    _words("love", "blank", "label")
    real = instruct.InstructModel.generate

    def generate(self, prompts, *a, **k):
        gens = real(self, prompts, *a, **k)
        return [Generation("  \n", True, 1) if "'blank'" in q else Generation('"Scene:"', True, 3) if "'label'" in q
                else g for q, g in zip(prompts, gens)]

    monkeypatch.setattr(instruct.InstructModel, "generate", generate)
    p = _params(qwen, variations=1, temperature=0.0, templates=(PLAIN,))
    report = expand(p)
    assert (report.total, report.computed, report.failed) == (3, 1, 2)
    assert report.failures["0:blank"] == EMPTY
    assert "no scene in the model's answer" in report.failures["0:label"]
    rows = {r["word"]: r for r in _rows()}
    assert rows["blank"]["error"] == EMPTY and rows["blank"]["prompt"] is rows["blank"]["key"] is None
    assert rows["love"]["error"] is None and rows["love"]["prompt"]
    monkeypatch.setattr(instruct.InstructModel, "generate", real)
    retry = expand(p)  # a failed item was not stored: the next run asks again
    assert (retry.computed, retry.reused, retry.failed) == (2, 1, 0)


def test_scene_normalisation():
    assert normalize_scene('  Scene: "Two people hugging."\nThis shows love.') == "two people hugging"
    assert normalize_scene("**Answer:** a figure holding an umbrella") == "a figure holding an umbrella"
    assert normalize_scene("1. NASA rocket lifting off") == "NASA rocket lifting off"
    assert normalize_scene('"Scene:"') == "" and normalize_scene("\n\n") == ""


@pytest.mark.parametrize("raw, match", [
    ({"variations": 3, "temperature": 0.0}, r"expand\.variations, expand\.temperature"),
    ({"backend": "none"}, r"expand\.variations: backend none"),
    ({"templates": [["particle", "dots"]]}, r"expand\.templates\[0\] \(particle\).*\{scene\}"),
    ({"templates": [["a", "{scene}"], ["a", "{scene}."]]}, r"expand\.templates: names must be unique"),
    ({"templates": [["a", "{scene} of {word}"]]}, r"expand\.templates\[0\].*format"),
    ({"templates": [[" ", "{scene}"]]}, r"expand\.templates\[0\]: expected a non-empty name"),
    ({"templates": []}, r"expand\.templates"),
    ({"instruction": "Describe love."}, r"expand\.instruction.*\{word\}"),
    ({"top_p": 0}, r"expand\.top_p"),
    ({"openai_endpoints": ["127.0.0.1:8000"]}, r"expand\.openai_endpoints"),
])
def test_bad_params_name_their_key(raw, match):
    with pytest.raises(ValueError, match=match):
        from_dict(ExpandParams, raw, "expand")


def test_wrong_types_and_a_missing_words_file_name_the_key(chdir):
    with pytest.raises(ParamsError, match=r"'ollama' is not one of"):
        from_dict(ExpandParams, {"backend": "ollama"}, "expand")
    with pytest.raises(ParamsError, match=r"expand\.templates\[0\]: expected 2 items"):
        from_dict(ExpandParams, {"templates": [["particle"]]}, "expand")
    with pytest.raises(SetupError, match=r"expand\.words: data/prompts/words\.txt does not exist\. Write one"):
        expand(ExpandParams(backend="none", variations=1))
    # Only comments (the shipped file): nothing to do, no model needed, an empty table.
    _words("# only a comment", "")
    report = expand(ExpandParams(model="no/such-model"))
    assert (report.total, report.computed) == (0, 0) and _rows() == []


def test_the_command_line_writes_the_table_and_the_metrics(chdir):
    def run() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tasks.expand"], cwd=chdir, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})

    Path("params.yaml").write_text("expand:\n  backend: none\n  variations: 1\n")
    missing = run()
    assert missing.returncode != 0 and "expand.words" in missing.stderr and "Traceback" not in missing.stderr
    _words("love", "war")
    done = run()
    assert done.returncode == 0, done.stderr
    assert json.loads(Path("metrics/expand.json").read_text())["computed"] == 2
    assert json.loads(Path("metrics/expand.details.json").read_text())["prompts"] == 2
    assert len(_rows()) == 2


@pytest.mark.slow
def test_openai_backend_against_a_real_server(chdir, qwen, tmp_path_factory):
    _words("love", "war")
    log = tmp_path_factory.mktemp("server") / "server.log"
    with Served(qwen, SERVED_ID, log) as server:
        p = _params(qwen, backend="openai", openai_endpoints=(server.url,), openai_model=SERVED_ID, retries=1,
                    backoff_s=0.01, timeout_s=30.0, openai_max_in_flight=2, templates=(PLAIN,))
        report = expand(p)
        assert (report.computed, report.failed) == (4, 0)
        rows = {(r["word"], r["variation"]): r for r in _rows()}
        for (word, v), r in rows.items():
            assert r["key"] == item_key("expand", VERSION, [word], generation_params(p, v),
                                        model=f"openai:{SERVED_ID}")
        bodies = server.stats()["bodies"]
        assert sorted((b["prompt"], b["seed"]) for b in bodies) == sorted(
            (p.instruction.format(word=w), p.seed + v) for w, v in rows)
        assert all(b["temperature"] == 0.8 and b["max_tokens"] == 10 and b["top_k"] == 50 for b in bodies)

        # Endpoints and in-flight limits are not in the key: nobody is asked anything.
        again = expand(replace(p, openai_endpoints=(f"http://127.0.0.1:{free_port()}/v1",)))
        assert (again.computed, again.reused) == (0, 4) and server.stats()["received"] == 4

        # The same weights behind the server answer as they do here (greedy, one prompt at a time).
        greedy = replace(p, temperature=0.0, variations=1, batch_size=1)
        expand(greedy)
        served = _scenes()
        expand(replace(greedy, backend="transformers"))
        assert _scenes() == served

        server.control(model_id="tiny/other")
        with pytest.raises(SetupError, match=r"serves 'tiny/other', but expand\.openai_model expects 'tiny/qwen2'"):
            expand(replace(p, max_new_tokens=11))

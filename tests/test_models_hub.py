import logging
import shutil
from pathlib import Path

import pytest

from models.hub import ModelMissing, mark_tiny, resolve
from tasks.profile import apply, load_profile

ROOT = Path(__file__).resolve().parents[1]


def test_local_folder_revision_follows_its_content(tmp_path):
    m = tmp_path / "model"
    m.mkdir()
    (m / "config.json").write_text('{"d": 1}')
    r1 = resolve(str(m), "x.model")
    assert r1.revision.startswith("local-") and not r1.tiny
    assert resolve(str(m), "x.model").key() == r1.key()
    (m / "config.json").write_text('{"d": 2}')
    assert resolve(str(m), "x.model").revision != r1.revision


def test_tiny_models_are_labelled_loudly(tmp_path, caplog):
    m = tmp_path / "tiny"
    mark_tiny(m, "T5")
    with caplog.at_level(logging.WARNING, logger="niche.models"):
        r = resolve(str(m), "embed_text.model")
    assert r.tiny and "RANDOM weights" in caplog.text and "embed_text.model" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="niche.models"):
        assert resolve(str(m), "embed_text.model").tiny  # once a process: not once a prompt
    assert "RANDOM weights" not in caplog.text


def test_missing_hub_model_names_the_param_and_the_fix(tmp_path, monkeypatch):
    # huggingface_hub reads the env var once at import; patch the constant it uses.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.delenv("NICHE_ALLOW_DOWNLOAD", raising=False)
    with pytest.raises(ModelMissing) as e:
        resolve("google-t5/t5-large", "embed_text.model")
    msg = str(e.value)
    assert "embed_text.model" in msg and "google-t5/t5-large" in msg and "hf download" in msg
    with pytest.raises(ModelMissing, match="neither an existing local path"):
        resolve("./models/nowhere", "embed_text.model")


def test_profiles_switch_only_their_keys_and_keep_comments(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    apply("real", params, build=False)  # the checkout may be on the tiny profile (after `make demo`)
    before = params.read_text()
    import yaml

    doc = yaml.safe_load(before)
    tiny = load_profile("tiny")
    differing = [f"{s}.{k}" for s, kv in tiny.items() for k, v in kv.items() if doc[s][k] != v]
    changes = apply("tiny", params, build=False)
    assert sorted(c.split(":")[0] for c in changes) == sorted(differing) and len(differing) >= 5
    text = params.read_text()
    assert "models/tiny/t5" in text and "# One section per stage" in text
    apply("real", params, build=False)
    assert params.read_text() == before
    with pytest.raises(SystemExit, match="known: bigasp, particleart, real, tiny"):
        apply("huge", params, build=False)

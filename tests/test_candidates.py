"""The candidates stage on the tiny SDXL (the base, and a LoRA + TI checkpoint written by the real
export code) and on a tiny NanoDiT checkpoint: one PNG per prompt x seed, a re-run that loads no
model, new prompts that render only themselves, new settings that render everything beside the
old images, a failing prompt listed while the rest goes on, a killed run that keeps its images."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from models.hub import SetupError
from tasks.candidates import CandidatesParams, candidates, main, resolve_checkpoint
from tasks.core.manifest import write_table
from tasks.core.params import ParamsError, from_dict
from tasks.curate.tables import CANDIDATES_STORE, CANDIDATES_TABLE, EXPAND, EXPAND_TABLE
from tasks.sdxl.sampler import SDXLSampler

SIZE = (64, 64)
FAST = dict(steps=2, size=SIZE, seeds=(0, 1))
LORA_CKPT = Path("runs/sdxl/checkpoints/step-000002")


def write_expand(prompts: list[str | None], words: list[str] | None = None) -> None:
    """The expand stage's table: row i is word i with `prompts[i]` (None: the scene failed)."""
    rows = [dict(id=f"{i:04d}", word=(words or [f"word{j}" for j in range(len(prompts))])[i], variation=0,
                 template="particle", scene=None if t is None else "a scene", prompt=t, key=None, file=None,
                 error="no answer" if t is None else None) for i, t in enumerate(prompts)]
    write_table(rows, EXPAND, EXPAND_TABLE, sort_by="id")


def table() -> list[dict]:
    return pq.read_table(CANDIDATES_TABLE).to_pylist()


def store_files() -> set[Path]:
    return set(CANDIDATES_STORE.glob("??/*.png"))


def info(row: dict) -> dict:
    with Image.open(CANDIDATES_STORE / row["file"]) as im:
        return json.loads(im.text["niche"])


def pixels(row: dict) -> bytes:
    with Image.open(CANDIDATES_STORE / row["file"]) as im:
        return im.convert("RGB").tobytes()


@pytest.fixture(autouse=True)
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def sdxl(tiny_models) -> CandidatesParams:
    return CandidatesParams(model=str(tiny_models / "sdxl"), **FAST)


def no_model_may_load(monkeypatch) -> None:
    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(SDXLSampler, "__init__", boom)


def test_prompts_x_seeds_then_a_rerun_loads_nothing_new_prompts_render_alone_new_steps_render_all(
        chdir, sdxl, monkeypatch):
    write_expand(["a figure juggling", None, "a figure dancing", "a figure juggling"], ["juggle", "x", "dance", "j2"])
    f = chdir / "params.yaml"
    f.write_text(yaml.safe_dump({"candidates": {"model": sdxl.model, "steps": 2, "size": list(SIZE)}}))
    main(["--params", str(f)])
    rows = table()
    # Two distinct prompts (the failed row has none, the repeat renders once, as its first row's word) x 2 seeds.
    assert sorted((r["prompt"], r["seed"], r["word"]) for r in rows) == [
        ("a figure dancing", 0, "dance"), ("a figure dancing", 1, "dance"),
        ("a figure juggling", 0, "juggle"), ("a figure juggling", 1, "juggle")]
    for r in rows:
        assert r["id"] == r["key"] and r["error"] is None and (r["width"], r["height"]) == SIZE
        assert r["generator"] == "sdxl" and r["checkpoint"] == sdxl.model and r["template"] == "particle"
        assert r["checkpoint_id"].startswith(f"{sdxl.model}@local-") and r["checkpoint_id"].endswith(":float32")
        with Image.open(CANDIDATES_STORE / r["file"]) as im:
            assert (im.format, im.size) == ("PNG", SIZE)
        assert info(r)["seed"] == r["seed"] and info(r)["steps"] == 2
    assert len({pixels(r) for r in rows}) == 4  # another seed or prompt, another image
    metric = json.loads((chdir / "metrics/candidates.json").read_text())
    assert (metric["total"], metric["computed"], metric["reused"], metric["failed"]) == (4, 4, 0, 0)
    details = json.loads((chdir / "metrics/candidates.details.json").read_text())
    assert details["generator"] == "sdxl" and details["prompts"] == 2 and details["no_prompt"] == 1
    assert details["images_per_second"] > 0 and details["images_per_second_model_up"] > 0

    with monkeypatch.context() as m:  # everything cached: no model loads
        no_model_may_load(m)
        again = candidates(sdxl)
    assert (again.computed, again.reused) == (0, 4) and table() == rows

    write_expand(["a figure juggling", None, "a figure dancing", "a figure juggling", "a figure reading"])
    added = candidates(sdxl)
    assert (added.total, added.computed, added.reused) == (6, 2, 4)
    assert {r["prompt"] for r in table()} == {"a figure juggling", "a figure dancing", "a figure reading"}

    before = store_files()
    more = candidates(CandidatesParams(**{**vars(sdxl), "steps": 3}))
    assert (more.computed, more.reused) == (6, 0)  # new keys for every image...
    assert before < store_files() and len(store_files()) == 12  # ...and the old ones stay in the store
    assert not set(r["key"] for r in rows) & {r["key"] for r in table()}


def test_a_failing_prompt_is_listed_the_rest_goes_on_and_a_killed_run_keeps_its_images(chdir, sdxl, monkeypatch):
    write_expand(["a figure juggling", "EXPLODE", "a figure dancing"])
    sample = SDXLSampler.sample
    calls = []

    def killed_at_the_third(self, ckpt, prompt, seed, negative):
        calls.append(prompt)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed mid-way
        return sample(self, ckpt, prompt, seed, negative)

    with monkeypatch.context() as m:
        m.setattr(SDXLSampler, "sample", killed_at_the_third)
        with pytest.raises(KeyboardInterrupt):
            candidates(sdxl)
    assert len(store_files()) == 2 and not list(CANDIDATES_STORE.rglob("*.tmp"))

    def explodes(self, ckpt, prompt, seed, negative):
        if prompt == "EXPLODE":
            raise ValueError("the renderer cannot draw this")
        return sample(self, ckpt, prompt, seed, negative)

    with monkeypatch.context() as m:
        m.setattr(SDXLSampler, "sample", explodes)
        report = candidates(sdxl)
    assert (report.total, report.computed, report.reused, report.failed) == (6, 2, 2, 2)
    failed = [r for r in table() if r["error"] is not None]
    assert {r["prompt"] for r in failed} == {"EXPLODE"} and len(failed) == 2
    assert all(r["key"] is None and r["file"] is None and r["width"] is None for r in failed)
    assert all("ValueError: the renderer cannot draw this" in r["error"] for r in failed)
    assert set(report.failures) == {r["id"] for r in failed}  # the render key, even when it failed
    assert len(table()) == 6 and len(store_files()) == 4

    fixed = candidates(sdxl)  # only the failed ones render
    assert (fixed.computed, fixed.reused, fixed.failed) == (2, 4, 0)
    assert {r["id"] for r in failed} == {r["key"] for r in table() if r["prompt"] == "EXPLODE"}


@pytest.fixture(scope="module")
def lora_checkpoint(tiny_models, tmp_path_factory) -> Path:
    """A LoRA + TI checkpoint of the tiny SDXL, as the trainer writes one (models/sdxl/export.py,
    models/sdxl/ti.py): a random but non-zero LoRA, two new tokens for TOK, meta.json."""
    from peft import LoraConfig

    from models.sdxl.export import save_kohya, save_lora
    from models.sdxl.pipeline import TextEncoders, load_pipeline, resolve_sdxl
    from models.sdxl.ti import PivotalTokens, save_embeddings

    r = resolve_sdxl(str(tiny_models / "sdxl"), "test.model")
    pipe = load_pipeline(r, "test.model", torch.float32)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, w in pipe.unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a no-op LoRA
                w.copy_(torch.randn(w.shape, generator=g) * 0.5)
    ti = PivotalTokens(TextEncoders(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2),
                       n_tokens=2, seed=5)
    ckpt = tmp_path_factory.mktemp("lora") / "step-000002"
    save_kohya(save_lora(ckpt / "lora", pipe.unet), ckpt / "kohya.safetensors")
    save_embeddings(ckpt / "embeddings.safetensors", ti.state_dict())
    (ckpt / "meta.json").write_text(json.dumps({
        "step": 2, "section": "train_lora", "model": r.key(), "tokens": ti.tokens, "abstractions": ti.abstractions,
        "scaling_factor": 0.13025, "sizes": [[128, 64], [64, 64]]}))
    return ckpt


def test_a_lora_checkpoint_draws_other_images_under_another_id_and_newest_can_be_pinned(
        chdir, sdxl, lora_checkpoint, tiny_models):
    write_expand(["a figure juggling"])
    f = chdir / "params.yaml"
    f.write_text(yaml.safe_dump({"train_lora": {"model": str(tiny_models / "sdxl"), "run": "sdxl"}}))
    lora = CandidatesParams(**{**vars(sdxl), "generator": "lora", "size": None})
    with pytest.raises(SetupError, match=r"candidates\.checkpoint = newest.*dvc repro train_lora"):
        candidates(lora, params_file=f)
    shutil.copytree(lora_checkpoint, LORA_CKPT)
    assert resolve_checkpoint(lora, chdir, f) == (LORA_CKPT.as_posix(), chdir / LORA_CKPT)

    candidates(CandidatesParams(**{**vars(sdxl), "size": (128, 64)}))  # the base at the LoRA run's size
    base = {r["seed"]: r for r in table()}
    report = candidates(lora, params_file=f)
    assert report.computed == 2 and report.extra["checkpoint"] == LORA_CKPT.as_posix()
    rows = {r["seed"]: r for r in table()}
    for seed, r in rows.items():
        assert r["generator"] == "lora" and r["checkpoint"] == LORA_CKPT.as_posix()
        assert r["checkpoint_id"].startswith("lora-") and r["checkpoint_id"] != base[seed]["checkpoint_id"]
        assert (r["width"], r["height"]) == (128, 64)  # the size the run trained on most
        assert pixels(r) != pixels(base[seed])
        assert info(r)["text"] == "TOK, a figure juggling"  # the trigger in front, as the run's captions
    pinned = candidates(CandidatesParams(**{**vars(lora), "checkpoint": LORA_CKPT.as_posix()}), params_file=f)
    assert (pinned.computed, pinned.reused) == (0, 2)  # `newest` pinned to its folder: the same keys


def test_the_sdxl_sampler_draws_the_base_model_again_after_a_lora(lora_checkpoint, tiny_models):
    """sample(None, ...) unloads the run's LoRA and tokens: the base model's image comes back."""
    from tasks.sdxl.params import LoraParams

    p = from_dict(LoraParams, {"model": str(tiny_models / "sdxl"), "sample_steps": 2, "sample_size": [64, 64]},
                  "train_lora")
    sampler = SDXLSampler(p, device="cpu")
    base = sampler.sample(None, "TOK, a figure", 0, "")
    styled = sampler.sample(lora_checkpoint, "TOK, a figure", 0, "")
    again = sampler.sample(None, "TOK, a figure", 0, "")
    assert base.tobytes() == again.tobytes() != styled.tobytes()
    assert "style" not in getattr(sampler.pipe.unet, "peft_config", {})
    assert "<s0>" not in sampler.pipe.tokenizer.get_vocab() and "<s0>" not in sampler.pipe.tokenizer_2.get_vocab()


def _nanodit_checkpoint(folder: Path, tiny: Path, step: int, seed: int) -> Path:
    from tests.dit_kit import nudged

    model = nudged(seed, text_dim=64, dino_dim=64, repa_hidden=64)  # the tiny T5 is 64 wide
    model.save_pretrained(folder / "ema")
    (folder / "meta.json").write_text(json.dumps({
        "step": step, "dataset_params": {"bucket": {"buckets": [[128, 96], [64, 64]], "resample": "lanczos"},
                                         "caption": {"trigger": "TOK"},
                                         "embed_text": {"model": str(tiny / "t5"), "max_length": 32}},
        "sampling": {"steps": 3, "guidance": "dual", "scale": 3.0, "route": 0.5, "shift": 1.0}}))
    return folder


def test_nanodit_checkpoint_newest_of_the_train_run(chdir, tiny_models, monkeypatch):
    write_expand(["a figure juggling", "a figure dancing"])
    f = chdir / "params.yaml"
    f.write_text(yaml.safe_dump({"train": {"run": "dit"}}))
    _nanodit_checkpoint(chdir / "runs/dit/checkpoints/step-000010", tiny_models, 10, seed=1)
    _nanodit_checkpoint(chdir / "runs/dit/checkpoints/step-000020", tiny_models, 20, seed=2)
    p = CandidatesParams(generator="nanodit", steps=2, seeds=(0, 3))
    report = candidates(p, params_file=f)
    rows = table()
    assert report.computed == 4 and len(rows) == 4
    assert {r["checkpoint"] for r in rows} == {"runs/dit/checkpoints/step-000020"}
    assert all(r["checkpoint_id"].startswith("nanodit-") and (r["width"], r["height"]) == (128, 96) for r in rows)
    assert {info(r)["guidance"] for r in rows} == {"cfg"}  # the checkpoint's dual, without a reference
    assert len({pixels(r) for r in rows}) == 4
    older = candidates(CandidatesParams(**{**vars(p), "checkpoint": "runs/dit/checkpoints/step-000010",
                                           "size": (64, 64)}), params_file=f)
    assert older.computed == 4 and {r["checkpoint_id"] for r in table()}.isdisjoint({r["checkpoint_id"] for r in rows})
    from tasks.nanodit.sampler import NanoDiTSampler

    def boom(*a, **k):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(NanoDiTSampler, "load", boom)
    assert candidates(p, params_file=f).reused == 4  # back on the newest: all there, nothing loads


def test_no_prompts_render_nothing_and_need_no_generator(chdir, monkeypatch):
    """The shipped words file holds only comments: `dvc repro` must not look for a model."""
    no_model_may_load(monkeypatch)
    write_expand([])
    report = candidates(CandidatesParams(generator="lora", checkpoint="runs/none"))
    assert (report.total, report.computed) == (0, 0) and table() == []


@pytest.mark.parametrize("raw, key", [
    ({"steps": 0}, "candidates.steps"),
    ({"seeds": [1, 1]}, "candidates.seeds"),
    ({"seeds": []}, "candidates.seeds"),
    ({"size": [100, 64]}, "candidates.size"),
    ({"generator": "dalle"}, "candidates.generator"),
    ({"lora_section": "train"}, "candidates.lora_section"),
    ({"guidance_scale": -1}, "candidates.guidance_scale"),
    ({"sample_shift": 0}, "candidates.sample_shift"),
    ({"stepz": 3}, "candidates.stepz"),
])
def test_bad_params_name_the_key(raw, key):
    with pytest.raises((ParamsError, ValueError), match=key.replace(".", r"\.")):
        from_dict(CandidatesParams, raw, "candidates")


def test_errors_a_person_fixes_name_what_to_do(chdir, sdxl, capsys):
    with pytest.raises(SetupError, match=r"expand\.parquet.*dvc repro expand"):
        candidates(sdxl)
    write_expand(["a figure"])
    with pytest.raises(SetupError, match=r"candidates\.checkpoint nowhere: not found"):
        candidates(CandidatesParams(generator="nanodit", checkpoint="nowhere"))
    with pytest.raises(SetupError, match=r"candidates\.model"):
        candidates(CandidatesParams(model=str(chdir / "no-such-model")))
    (chdir / "params.yaml").write_text("candidates:\n  stepz: 3\n")
    with pytest.raises(SystemExit, match=r"candidates\.stepz"):
        main(["--params", "params.yaml"])

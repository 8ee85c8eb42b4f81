"""The SDXL LoRA trainer on the tiny SDXL: pivotal tuning (tokens train, then freeze), every
checkpoint pairing its LoRA with its embeddings, exact resume, the flow-matching objective with
chunked prompts, the negative LoRA on the curator's rejects, and the sweep over checkpoints."""
from __future__ import annotations

import csv
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tasks.core.params import from_dict
from tasks.sdxl.checkpoint import finished
from tasks.sdxl.trainer import LoraTrainer
from tasks.sdxl.params import LoraParams, WrongParams
from tasks.core.store import ItemRef
from tests.conftest import make_repo, run
from tests.storekit import replace_item

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(rank=4, alpha=4.0, steps=6, batch_size=2, grad_accum=1, lr=1e-3, text_encoder_lr=1e-2, warmup_steps=1,
             precision="fp32", gradient_checkpointing=False, checkpoint_every=2, log_every=1, ti_frac=0.5,
             sample_steps=2, sweep_scenes=["juggling"], sweep_seeds=[0])


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory, tiny_models):
    """Figures and rejects through ingest, bucket, caption and latents (the tiny profile)."""
    root, _ = make_repo(tmp_path_factory.mktemp("lora") / "repo", figures=6, photos=False, bad=False, rejects=3)
    for stage in ("ingest", "bucket", "caption", "latents"):
        run([sys.executable, "-m", f"tasks.{stage}"], root)
    return root


@pytest.fixture
def root(data_repo, tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(data_repo, dst, symlinks=True)
    return dst


def params(cls=LoraParams, **over):
    section = cls.SECTION
    return from_dict(cls, {**SMALL, "model": str(ROOT / "models/tiny/sdxl"), **over}, section)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "live" / "plots" / "metrics" / "train" / "loss.tsv").open() as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


def test_pivotal_tuning_trains_the_tokens_then_freezes_them_and_each_checkpoint_keeps_its_own(root, caplog):
    p = params(keep_states=1)
    with caplog.at_level(logging.WARNING):
        trainer = LoraTrainer(p, root=root)
        base_rows = trainer.text.text_encoder.get_input_embeddings().weight[:-2].detach().clone()
        assert trainer.fit()["step"] == 6
    # The tiny tokenizer reads characters: every caption is too long, said in one line, not one per caption.
    assert sum("prompts are longer than 75 tokens" in m for m in caplog.messages) == 1
    assert not any("are dropped" in m for m in caplog.messages)
    ckpts = dict(finished(root / "runs/sdxl/checkpoints"))
    assert sorted(ckpts) == [2, 4, 6]
    emb = {s: load_file(d / "embeddings.safetensors") for s, d in ckpts.items()}
    lora = {s: load_file(d / "lora" / "pytorch_lora_weights.safetensors") for s, d in ckpts.items()}
    assert emb[2]["clip_l"].shape == (2, 32) and emb[2]["clip_g"].shape == (2, 32)
    # The tokens train for the first 3 steps (ti_frac 0.5), then freeze; the LoRA goes on.
    assert not torch.equal(emb[2]["clip_l"], emb[4]["clip_l"])
    assert torch.equal(emb[4]["clip_l"], emb[6]["clip_l"]) and torch.equal(emb[4]["clip_g"], emb[6]["clip_g"])
    key = next(k for k in lora[4] if "lora_B" in k or "lora.up" in k)
    assert not torch.equal(lora[4][key], lora[6][key])
    # Only the new rows moved: every other token of the vocabulary is the base model's.
    assert torch.equal(trainer.text.text_encoder.get_input_embeddings().weight[:-2], base_rows)
    # Every checkpoint has its LoRA in both formats; the optimizer state only the newest keep_states.
    for d in ckpts.values():
        assert (d / "kohya.safetensors").is_file()
        assert json.loads((d / "meta.json").read_text())["abstractions"] == {"TOK": ["<s0>", "<s1>"]}
    assert [s for s, d in ckpts.items() if (d / "state.pt").is_file()] == [6]
    assert all(k.startswith(("lora_unet_", "lora_te")) for k in load_file(ckpts[6] / "kohya.safetensors"))


def test_a_stopped_run_resumes_exactly(root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(root, other, symlinks=True)
    p = params()
    LoraTrainer(p, root=root).fit()
    LoraTrainer(p, root=other).fit(stop_at=2)
    assert LoraTrainer(p, root=other).fit()["step"] == 6  # resumes at 2, across the TI freeze at 3
    assert losses(root / "runs/sdxl") == losses(other / "runs/sdxl")
    a, b = (load_file(r / "runs/sdxl/checkpoints/step-000006/lora/pytorch_lora_weights.safetensors") for r in (root, other))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (load_file(r / "runs/sdxl/checkpoints/step-000006/embeddings.safetensors") for r in (root, other))
    assert torch.equal(ea["clip_l"], eb["clip_l"]) and torch.equal(ea["clip_g"], eb["clip_g"])
    # Other settings: the old run is moved aside, never deleted.
    LoraTrainer(params(rank=8, steps=2), root=root).fit()
    moved = list((root / "runs").glob("sdxl.superseded-*"))
    assert len(moved) == 1 and (moved[0] / "checkpoints" / "step-000006" / "lora").is_dir()


def test_flow_objective_with_chunked_prompts_text_encoder_lora_and_prompt_drop(root):
    p = params(objective="flow", max_chunks=3, caption_dropout=0.5, ti=False, text_encoder_lora=True, steps=2)
    trainer = LoraTrainer(p, root=root)
    assert any(len(trainer.text.tokenizer(r.prompt).input_ids) > 77 for r in trainer.rows)  # >1 chunk
    trainer.fit()
    state = torch.load(root / "runs/sdxl/checkpoints/step-000002/state.pt", weights_only=True)
    assert {"unet", "te1", "te2"} <= set(state["lora"])
    assert all(v == v for _, v in losses(root / "runs/sdxl"))  # finite (NaN != NaN)
    keys = load_file(root / "runs/sdxl/checkpoints/step-000002/lora/pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    # Sampling inverts the objective: a flow-match Euler schedule whose shift changes the image.
    from tasks.sdxl.sampler import SDXLSampler
    ckpt = root / "runs/sdxl/checkpoints/step-000002"
    images = [SDXLSampler(params(objective="flow", max_chunks=3, ti=False, sample_shift=shift), root=root,
                          device="cpu").sample(ckpt, "a figure dancing", 0, "") for shift in (3.0, 6.0)]
    sizes = [r.size for r in trainer.rows]
    assert images[0].size == max(sorted(set(sizes)), key=sizes.count)  # the size trained on most
    assert images[0].tobytes() != images[1].tobytes()


def test_frozen_text_encoders_run_once_per_prompt_and_a_full_cache_changes_nothing(root, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(root, other, symlinks=True)

    def fit_counting(p, where):
        trainer = LoraTrainer(p, root=where)
        calls = []
        handle = trainer.text.text_encoder.register_forward_hook(lambda *a: calls.append(1))
        trainer.fit()
        handle.remove()
        return trainer, len(calls)

    p = params(ti=False, steps=12, checkpoint_every=12)
    trainer, cached = fit_counting(p, root)
    # Live, it would run at every step (12, two epochs); cached, once per distinct prompt at most.
    assert 1 <= cached <= len({r.prompt for r in trainer.rows}) < p.steps
    _, uncached = fit_counting(params(ti=False, steps=12, checkpoint_every=12, text_cache_gb=0.0), other)
    assert uncached >= p.steps  # no room: encoded again each time, to the same numbers
    assert losses(root / "runs/sdxl") == losses(other / "runs/sdxl")


def test_a_latent_paired_with_another_samples_row_is_left_out_and_the_rest_trains(root, caplog):
    table = root / "data/manifest/latents.parquet"
    rows = pq.read_table(table).to_pylist()
    train = [r for r in rows if r["split"] == "train" and r["key"]]
    train[0]["key"], train[1]["key"] = train[1]["key"], train[0]["key"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(table)), table)
    replace_item(root / "data/derived/latents", train[2]["key"], b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="niche.train_lora"):
        trainer = LoraTrainer(params(steps=2), root=root)
    # Both swapped samples and the unreadable one are left out, each named with its reason; the rest trains.
    assert {r.id for r in trainer.rows} == {r["id"] for r in train[3:]}
    for r in train[:3]:
        assert any(r["id"] in m and "latent" in m for m in caplog.messages)
    assert any("not to this one" in m for m in caplog.messages) and any("unreadable" in m for m in caplog.messages)
    assert trainer.fit()["step"] == 2
    # At read time too (a file changed under a running job), a latent is never used for another sample.
    from tasks.latents import LatentMismatch, read_latent
    with pytest.raises(LatentMismatch, match=train[1]["id"]):
        read_latent(ItemRef(str(root / "data/derived/latents"), ".safetensors", train[0]["key"]), train[0]["id"])


def test_negative_lora_on_the_rejects_and_a_sweep_that_applies_it(root):
    wrong = params(WrongParams, steps=2, checkpoint_every=2)
    assert wrong.prompt == "wrong" and wrong.split == "rejected"
    trainer = LoraTrainer(wrong, root=root)
    rejected = {r["id"] for r in pq.read_table(root / "data/manifest/ingest.parquet").to_pylist()
                if r["split"] == "rejected"}
    assert {r.id for r in trainer.rows} == rejected and {r.prompt for r in trainer.rows} == {"wrong"}
    trainer.fit()
    LoraTrainer(params(steps=4), root=root).fit()

    from tasks.report.sweep_grid import sweep
    from tasks.sdxl.sampler import SDXLSampler, negative_for

    p = params(steps=4, negative_lora="runs/sdxl-wrong")
    sampler = SDXLSampler(p, root=root, device="cpu")
    assert negative_for(p).endswith(", wrong") and "wrong" in sampler.pipe.unet.peft_config
    out = root / "runs/sdxl/sweep.png"
    sweep(sampler, [p.prompt_template.format(scene="juggling")], [0], negative_for(p), out)
    layout = json.loads(out.with_suffix(".json").read_text())
    assert layout["rows"] == [2, 4] or [r.get("step", r) for r in layout["rows"]] == [2, 4]
    ckpt = root / "runs/sdxl/checkpoints/step-000004"
    a = sampler.sample(ckpt, "TOK, a figure dancing", 0, negative_for(p))
    b = sampler.sample(root / "runs/sdxl/checkpoints/step-000002", "TOK, a figure dancing", 0, negative_for(p))
    c = sampler.sample(ckpt, "TOK, a figure dancing", 0, negative_for(p))
    assert a.tobytes() == c.tobytes() and a.tobytes() != b.tobytes()


def test_without_rejects_the_negative_stage_leaves_a_note_and_succeeds(root):
    table = root / "data/manifest/latents.parquet"  # a dataset whose curator rejected nothing
    rows = [r for r in pq.read_table(table).to_pylist() if r["split"] != "rejected"]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(table)), table)
    out = subprocess.run([sys.executable, "-m", "tasks.train_lora", "--section", "train_wrong"], cwd=root,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "no usable sample" in (root / "runs/sdxl-wrong/checkpoints/NO_SAMPLES.txt").read_text()


def test_bad_params_are_named_by_key():
    with pytest.raises(ValueError, match="train_lora.max_chunks"):
        params(max_chunks=4)
    with pytest.raises(ValueError, match="train_wrong.rank"):
        params(WrongParams, rank=0)
    with pytest.raises(ValueError, match="train_lora.prompt_template"):
        params(prompt_template="TOK, a figure")


def test_gradient_checkpointing_trains_the_same_lora(root, tmp_path):
    """Frozen base weights and checkpointed blocks: the LoRA must still get its gradients."""
    other = tmp_path / "other"
    shutil.copytree(root, other, symlinks=True)
    LoraTrainer(params(steps=2, ti=False), root=root).fit()
    LoraTrainer(params(steps=2, ti=False, gradient_checkpointing=True), root=other).fit()
    a, b = (load_file(r / "runs/sdxl/checkpoints/step-000002/lora/pytorch_lora_weights.safetensors") for r in (root, other))
    assert a.keys() == b.keys() and any("lora_B" in k and a[k].abs().sum() > 0 for k in a)  # B starts at zero
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert [v for _, v in losses(root / "runs/sdxl")] == pytest.approx([v for _, v in losses(other / "runs/sdxl")],
                                                                        abs=1e-6)


def test_prodigy_estimates_its_own_step_size(root):
    LoraTrainer(params(optimizer="prodigy", lr=1.0, text_encoder_lr=1.0, steps=2), root=root).fit()
    state = torch.load(root / "runs/sdxl/checkpoints/step-000002/state.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [g["name"] for g in groups] == ["unet", "text"] and all(g["d"] > 0 for g in groups)
    lora = load_file(root / "runs/sdxl/checkpoints/step-000002/lora/pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in lora.values())


def test_two_abstractions_each_with_their_tokens_and_a_sample_that_uses_both(root):
    p = params(trigger=["TOK", "PRT"], steps=2, ti_frac=1.0)
    LoraTrainer(p, root=root).fit()
    ckpt = root / "runs/sdxl/checkpoints/step-000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["abstractions"] == {"TOK": ["<s0>", "<s1>"], "PRT": ["<s2>", "<s3>"]}
    assert load_file(ckpt / "embeddings.safetensors")["clip_g"].shape == (4, 32)
    from tasks.sdxl.sampler import SDXLSampler
    sampler = SDXLSampler(p, root=root, device="cpu")
    a = sampler.sample(ckpt, "TOK, a PRT figure", 0, "")
    b = sampler.sample(ckpt, "<s0><s1>, a <s2><s3> figure", 0, "")
    c = sampler.sample(ckpt, "TOK, a figure", 0, "")
    assert a.tobytes() == b.tobytes() != c.tobytes()  # each word became its own tokens

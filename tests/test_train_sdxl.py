"""The SDXL full fine-tune on the tiny SDXL (4 images): prompts built on the fly, the loss falling,
exact resume with EMA and trained text encoders, checkpoints that are diffusers folders and one
original-layout file giving the same image, the NaN guard, the held-out loss. torchrun with 2 gloo
ranks (DDP and FSDP2): tests/test_train_sdxl_ranks.py."""
from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from tasks.core.params import from_dict
from tasks.sdxl import prompts
from tasks.sdxl.full_params import FullParams
from tests.conftest import make_repo, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(model=str(ROOT / "models/tiny/sdxl"), steps=4, batch_size=4, grad_accum=1, lr=1e-3, warmup_steps=1,
             precision="fp32", gradient_checkpointing=False, checkpoint_every=2, log_every=1, export_dtype="fp32",
             sample_steps=4, sweep_scenes=["a figure dancing"], sweep_seeds=[0], device="cpu")


def params(**over) -> FullParams:
    return from_dict(FullParams, {**SMALL, **over}, FullParams.SECTION)


def losses(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "live" / "plots" / "metrics" / "train" / "loss.tsv").open() as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


def unet_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt / "unet" / "diffusion_pytorch_model.safetensors")


def test_prompts_are_caption_or_shuffled_tags_and_ucg_splits_between_empty_and_quality():
    p = params(tag_share=0.2, ucg=0.05, ucg_quality_share=0.5, quality_share=0.9)
    tags = ("best quality", "1girl", "solo", "watermark", "red hair", "outdoors", "smile")
    drawn = [prompts.build("a caption", tags, p, torch.Generator().manual_seed(i)) for i in range(4000)]
    share = {k: sum(d == v for d in drawn) / len(drawn) for k, v in (("empty", ""), ("quality", "best quality"),
                                                                     ("caption", "a caption"))}
    tag_strings = [d for d in drawn if d not in ("", "best quality", "a caption")]
    assert abs(share["empty"] - 0.025) < 0.01 and abs(share["quality"] - 0.025) < 0.01
    assert abs(len(tag_strings) / len(drawn) - 0.95 * 0.2) < 0.02
    assert abs(share["caption"] - 0.95 * 0.8) < 0.02
    # Important tags always stay; the rest are shuffled and thinned to a random count.
    assert all("watermark" in d.split(", ") for d in tag_strings)
    assert len({d for d in tag_strings}) > 50
    led = sum(d.startswith("best quality, ") for d in tag_strings) / len(tag_strings)
    assert 0.85 < led < 0.95
    # A sample's prompt is a function of its generator's seed alone.
    again = [prompts.build("a caption", tags, p, torch.Generator().manual_seed(i)) for i in range(50)]
    assert again == drawn[:50]
    # No tags: always the caption (or a dropped prompt).
    assert {prompts.build("c", (), p, torch.Generator().manual_seed(i)) for i in range(500)} == {"c", ""}


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory, tiny_models):
    """4 figures (2 with a .tags sidecar) through ingest, bucket, caption and latents."""
    root, _ = make_repo(tmp_path_factory.mktemp("full") / "repo", figures=4, photos=False, bad=False)
    images = sorted(p for p in (root / "data/raw").rglob("*.png"))
    for img in images[:2]:
        img.with_suffix(".tags").write_text("best quality, 1girl, solo,\nwatermark, smile\n", encoding="utf-8")
    for stage in ("ingest", "bucket", "caption", "latents"):
        run([sys.executable, "-m", f"tasks.{stage}"], root)
    return root


@pytest.fixture
def root(data_repo, tmp_path):
    dst = tmp_path / "repo"
    shutil.copytree(data_repo, dst, symlinks=True)
    return dst


def test_ingest_reads_tags_and_the_trainer_rows_carry_them(root):
    from tasks.sdxl.data import load_rows

    table = pq.read_table(root / "data/manifest/ingest.parquet").to_pylist()
    tagged = [r for r in table if r["tags"]]
    assert len(tagged) == 2 and tagged[0]["tags"] == ["best quality", "1girl", "solo", "watermark", "smile"]
    quarantine = pq.read_table(root / "data/manifest/quarantine.parquet").to_pylist()
    assert not [q for q in quarantine if q["path"].endswith(".tags")]
    rows = load_rows(root, params())
    assert sum(bool(r.tags) for r in rows) == sum(1 for r in tagged if r["split"] == "train")


def test_a_tiny_full_finetune_lowers_its_loss_and_its_checkpoint_is_a_pipeline(root, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    from tasks.sdxl.full import FullTrainer
    from tasks.sdxl.full_checkpoint import finished, single_file
    from tasks.sdxl.sampler import FullSampler

    p = params(steps=30, checkpoint_every=30, latent_sample=False, ucg=0.0, lr=2e-3, warmup_steps=3,
               schedule="constant", val_timesteps=4)
    trainer = FullTrainer(p, root=root)
    assert len(trainer.rows) == 4
    # The held-out loss (fixed timesteps and noise): the tiny set has no holdout, two training
    # images stand in. The same weights give the same number; it falls as the model learns.
    trainer.holdout = trainer.rows[:2]
    before = trainer.val_loss()
    assert trainer.val_loss() == before
    assert trainer.fit()["step"] == 30
    got = [v for _, v in losses(root / "runs/sdxl-full")]
    first, last = sum(got[:10]) / 10, sum(got[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert trainer.val_loss() < 0.8 * before
    ckpt = finished(root / "runs/sdxl-full/checkpoints")[-1][1]
    base = load_file(ROOT / "models/tiny/sdxl/unet/diffusion_pytorch_model.safetensors")
    tuned = unet_weights(ckpt)
    assert tuned.keys() == base.keys() and sum(not torch.equal(tuned[k], base[k]) for k in base) > 0.9 * len(base)
    # A diffusers folder: the pipeline loads it as it is; a flow run's scheduler says so.
    pipe = StableDiffusionXLPipeline.from_pretrained(ckpt, use_safetensors=True)
    assert type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler" and pipe.scheduler.config.shift == 6.0
    assert all(torch.equal(pipe.unet.state_dict()[k], tuned[k]) for k in tuned)
    # The single file in the original layout loads into a fresh pipeline with the same weights...
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    single = StableDiffusionXLPipeline.from_single_file(str(single_file(ckpt)), config=str(ckpt))
    assert all(torch.equal(single.unet.state_dict()[k], tuned[k]) for k in tuned)
    # ...and the flow sampler draws the same image from either.
    sampler = FullSampler(p, root=root, device="cpu")
    a = sampler.sample(ckpt, "a figure dancing", 0, "")
    sampler.pipe.unet.load_state_dict(single.unet.state_dict())
    sampler.loaded = ckpt
    b = sampler.sample(ckpt, "a figure dancing", 0, "")
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_stopped_run_resumes_exactly_with_ema_and_trained_text_encoders(root, tmp_path):
    from tasks.sdxl.full import FullTrainer
    from tasks.sdxl.full_checkpoint import TRAIN_WEIGHTS

    other = tmp_path / "other"
    shutil.copytree(root, other, symlinks=True)
    p = params(ema=True, ema_decay=0.9, train_text_encoders=True, text_encoder_lr=1e-3, batch_size=2,
               grad_accum=2)
    FullTrainer(p, root=root).fit()
    FullTrainer(p, root=other).fit(stop_at=2)
    assert FullTrainer(p, root=other).fit()["step"] == 4
    assert losses(root / "runs/sdxl-full") == losses(other / "runs/sdxl-full")
    a, b = (r / "runs/sdxl-full/checkpoints/step-000004" for r in (root, other))
    for rel in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                "text_encoder_2/model.safetensors", TRAIN_WEIGHTS):
        wa, wb = load_file(a / rel), load_file(b / rel)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), rel
    # The export holds the EMA, which lags the raw weights; the text encoders trained.
    raw = load_file(a / TRAIN_WEIGHTS)
    ema = unet_weights(a)
    assert any(not torch.equal(raw[f"unet.{k}"], ema[k]) for k in ema)
    base_te = load_file(ROOT / "models/tiny/sdxl/text_encoder/model.safetensors")
    te = load_file(a / "text_encoder/model.safetensors")
    assert any(not torch.equal(te[k], base_te[k]) for k in base_te if k in te)
    # The sampler loads a checkpoint's own text encoders, and the base ones again for the base model.
    from tasks.sdxl.sampler import FullSampler
    sampler = FullSampler(p, root=root, device="cpu")
    base_image = sampler.sample(None, "a figure", 0, "")
    sampler.sample(a, "a figure", 0, "")
    assert all(torch.equal(sampler.pipe.text_encoder.state_dict()[k], te[k]) for k in te)
    assert not np.array_equal(np.asarray(base_image), np.asarray(sampler.sample(a, "a figure", 0, "")))
    assert np.array_equal(np.asarray(base_image), np.asarray(sampler.sample(None, "a figure", 0, "")))
    # The oldest checkpoints beyond keep_checkpoints are gone; the newest stay whole.
    assert sorted(d.name for d in (root / "runs/sdxl-full/checkpoints").iterdir()) == ["step-000002", "step-000004"]




def test_non_finite_steps_are_skipped_then_stop_the_run_with_the_last_checkpoint_intact(root, monkeypatch):
    from tasks.sdxl import loop
    from tasks.sdxl.full import FullTrainer
    from tasks.training.run import TrainError

    calls = {"n": 0}
    real = loop.F.mse_loss

    def poisoned(pred, target):  # the 2nd call's loss is NaN (a skipped step), then every one from the 5th
        calls["n"] += 1
        loss = real(pred, target)
        return loss * float("nan") if calls["n"] == 2 or calls["n"] >= 5 else loss

    monkeypatch.setattr(loop.F, "mse_loss", poisoned)
    trainer = FullTrainer(params(steps=20, nan_patience=3, checkpoint_every=2, val_timesteps=0), root=root)
    before = {k: v.clone() for k, v in trainer.unet.state_dict().items()}
    with pytest.raises(TrainError, match="3 steps in a row.*step-000002"):
        trainer.fit()
    assert trainer.step == 3 and trainer.counters["skipped_steps"] == 4
    # A skipped step changes nothing: the weights are those of the three good steps, all finite.
    assert (root / "runs/sdxl-full/checkpoints/step-000002/state.pt").is_file()
    assert any(not torch.equal(before[k], v) for k, v in trainer.unet.state_dict().items())
    assert all(torch.isfinite(v).all() for v in trainer.unet.state_dict().values())


def test_a_checkpoint_takes_only_the_untrained_parts_a_pipeline_needs_from_the_base_folder(tmp_path):
    """Variants and single files sitting in a base folder are not copied into every checkpoint."""
    from tasks.sdxl.full_checkpoint import _untrained_part

    trained = {"unet"}
    wanted = ["model_index.json", "NICHE_TINY_RANDOM_WEIGHTS.txt", "vae/config.json",
              "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
              "tokenizer_2/merges.txt", "text_encoder_2/model-00001-of-00002.safetensors"]
    unwanted = ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
                "text_encoder/model.fp16.safetensors", "sd_xl_base_1.0.safetensors", ".gitattributes",
                "scheduler/scheduler_config.json", "vae_1_0/diffusion_pytorch_model.safetensors"]
    assert [r for r in wanted if not _untrained_part(Path(r), trained)] == []
    assert [r for r in unwanted if _untrained_part(Path(r), trained)] == []
    assert not _untrained_part(Path("text_encoder/model.safetensors"), {"unet", "text_encoder"})

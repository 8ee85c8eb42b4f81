"""Does training still compute what it did, and does a trained model listen to its text?

The first N losses of a fixed tiny run are pinned in tests/assets/nanodit_losses.json (as
torchtitan pins its loss curves): a change to the model, the objective, the optimizer, the
loader or the seeding that alters training numerics fails here and must re-pin on purpose:

    NICHE_PIN_LOSSES=1 .venv/bin/python -m pytest tests/test_learning.py -k pinned

Whether NanoDiT learns at all is measured by bench/bench_learn.py (minutes, not seconds).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import tasks.report.suite
from tasks.core.params import from_dict
from tasks.nanodit.params import TrainParams
from tasks.nanodit.trainer import Trainer
from tasks.validate import ValidateParams, validate
from tests import shardkit

ASSET = Path(__file__).parent / "assets" / "nanodit_losses.json"
# fp32 on a CPU: the same run repeats exactly here; other CPUs' kernels may differ by ~1e-7 a
# step. Small changes to what is computed exceed this: the timestep embedding's scale 1000 -> 999
# moved these losses by up to 1.7e-4 (relative).
RTOL = 1e-5
# REPA and TREAD on, so their numerics are pinned too; AdamW (Muon's Newton-Schulz is pinned
# by tests/test_train.py's exact-resume test).
PINNED = dict(preset="tiny", steps=12, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=3, precision="fp32",
              gradient_checkpointing=False, ema_decay=0.9, ema_warmup=2, image_scale=1.0, resolution_schedule=[],
              num_workers=0, shuffle_buffer=4, checkpoint_every=12, sample_every=12, sample_steps=1, log_every=1,
              optimizer="adamw", repa=True, tread=True, flip=0.5)


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "live" / "plots" / "metrics" / "train" / "loss.tsv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f, delimiter="\t")]


def _train(root: Path, settings: dict, extra: dict | None = None) -> Path:
    (root / "params.yaml").write_text(yaml.safe_dump({"train": settings, **(extra or {})}))
    p = from_dict(TrainParams, settings, "train")
    Trainer(p, root=root, params_file=root / "params.yaml").fit()
    return root / "runs" / p.run


def test_pinned_losses_of_a_fixed_tiny_run(tmp_path):
    shardkit.write_dataset(tmp_path / "data" / "shards", {"64x32": 8, "32x64": 8}, shard_size=4,
                           holdout={"64x32": 2})
    got = _losses(_train(tmp_path, PINNED))
    assert len(got) == PINNED["steps"]
    if os.environ.get("NICHE_PIN_LOSSES"):
        ASSET.parent.mkdir(exist_ok=True)
        ASSET.write_text(json.dumps({"torch": torch.__version__, "settings": PINNED, "loss": got}, indent=1) + "\n")
        pytest.skip(f"pinned {len(got)} losses in {ASSET}")
    want = json.loads(ASSET.read_text())
    assert want["settings"] == PINNED, "the pinned run's settings changed: re-pin (see the module doc)"
    np.testing.assert_allclose(got, want["loss"], rtol=RTOL, err_msg="training numerics changed: if on "
                               "purpose, re-pin (see the module doc) and say why in the commit")


def test_text_manipulation_samples_from_the_text_alone(tmp_path, tiny_models, monkeypatch):
    """With the image's own DINOv3 parts the text cannot move the image: the check keeps the text only."""
    seen: list[tuple[str, list[bool]]] = []
    real = tasks.report.suite.Suite.generate

    def spy(self, i, cond, size, guidance=None):
        import inspect
        check = next(f.function for f in inspect.stack() if f.function in tasks.report.suite.TESTS)
        seen.append((check, cond.keep[0].tolist()))
        return real(self, i, cond, size, guidance)

    monkeypatch.setattr(tasks.report.suite.Suite, "generate", spy)
    root = _trained(tmp_path, tiny_models, steps=2)
    validate(_validate_params(), root)
    text = [keep for check, keep in seen if check == "text_manipulation"]
    assert text and all(keep == [True, False, False, False] for keep in text)
    assert [True, True, True, True] in [keep for check, keep in seen if check == "reconstruction"]


def _trained(root: Path, tiny: Path, steps: int) -> Path:
    """A tiny model trained on random shards, mostly on its text alone (captions through the tiny
    T5 at validation)."""
    shardkit.write_dataset(root / "data" / "shards", {"64x32": 6}, shard_size=3, holdout={"64x32": 2},
                           spec=shardkit.Spec(t5_dim=64, dino_dim=16))
    settings = {**PINNED, "steps": steps, "checkpoint_every": steps, "sample_every": steps, "lr": 3e-3,
                "warmup_steps": 1, "repa": False, "tread": False,
                "cfg_dropout": {"uncond": 0.1, "text_only": 0.5, "dino_cls_only": 0.0, "dino_patches_only": 0.0,
                                "drop_pose": 0.0, "pose_only": 0.0, "all": 0.4}}
    _train(root, settings, {"embed_text": {"model": str(tiny / "t5"), "max_length": 32}})
    return root


def _validate_params() -> ValidateParams:
    return from_dict(ValidateParams, {"steps": 4, "device": "cpu", "lpips_allow_random": True, "guidance": "none",
                                      "text_edits": [["sample", "picture"]]}, "validate")


def test_changing_the_prompt_changes_the_sample_of_a_trained_tiny_model(tmp_path, tiny_models):
    root = _trained(tmp_path, tiny_models, steps=40)
    t = validate(_validate_params(), root)["tests"]["text_manipulation"]
    assert t["n"] == 2 and t["skipped"] == 0
    # A fresh model ignores its inputs (adaLN-zero, zero output layer): exactly 0 before training.
    # Measured: 5e-4 from the text alone; 3e-5 with the image's DINOv3 parts kept (the old check).
    assert t["min"] > 2e-4, t


def test_a_model_under_half_as_wide_as_a_patch_is_warned_about(caplog):
    from models.nanodit import NanoDiT
    from tasks.nanodit.trainer import narrow_warning

    for preset, patch, warned in (("tiny", 16, True), ("small", 8, False), ("baseline", 16, False)):
        caplog.clear()
        p = from_dict(TrainParams, {"preset": preset, "patch_size": patch}, "train")
        narrow_warning(NanoDiT.preset(preset, patch_size=patch, text_dim=8, dino_dim=8), p)
        assert ("cannot come out" in caplog.text) is warned, (preset, patch)
        if warned:  # the advice: the largest power-of-two patch the width covers (3 x 4 x 4 = 48 <= 64)
            assert "train.patch_size 4 " in caplog.text

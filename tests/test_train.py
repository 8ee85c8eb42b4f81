"""The NanoDiT trainer on small random shards: exact resume, non-finite steps, superseded runs,
checkpoint rotation, and DDP with two CPU processes (gloo)."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tasks import train as train_mod
from tasks import train_state
from tasks.params import ParamsError, from_dict
from tasks.train import Trainer, TrainError
from tasks.train_params import TrainParams
from tests import shardkit

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(preset="tiny", steps=6, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, precision="fp32",
             gradient_checkpointing=False, ema_decay=0.9, ema_warmup=2, image_scale=1.0, resolution_schedule=[[3, 0.5]],
             num_workers=0, shuffle_buffer=4, checkpoint_every=3, sample_every=3, sample_steps=1, log_every=1,
             optimizer="adamw")  # Muon's bf16 Newton-Schulz is slow on a CPU: one test covers it


def params(**over) -> TrainParams:
    return from_dict(TrainParams, {**SMALL, **over}, "train")


@pytest.fixture
def root(tmp_path):
    """A run folder with random shards (two buckets, 64x32 and 32x64) and a params.yaml."""
    shardkit.write_dataset(tmp_path / "data" / "shards", {"64x32": 8, "32x64": 8}, shard_size=4,
                           holdout={"64x32": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train": SMALL}))
    return tmp_path


def losses(run_dir: Path) -> list[tuple[int, float]]:
    with (run_dir / "live" / "plots" / "metrics" / "train" / "loss.tsv").open() as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f, delimiter="\t")]


def fit(root: Path, p: TrainParams, stop_at: int | None = None) -> dict:
    return Trainer(p, root=root, params_file=root / "params.yaml").fit(stop_at=stop_at)


def test_stopped_and_resumed_run_gives_the_same_losses_as_one_that_never_stopped(root, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    shardkit.write_dataset(other / "data" / "shards", {"64x32": 8, "32x64": 8}, shard_size=4, holdout={"64x32": 2})
    (other / "params.yaml").write_text((root / "params.yaml").read_text())
    p = params()
    straight = fit(root, p)
    assert straight["step"] == 6
    assert fit(other, p, stop_at=4)["step"] == 4        # checkpoints at 3 and 4, then stops
    # Points logged after the last checkpoint must not survive a crash: fake one.
    tsv = other / "runs/nanodit/live/plots/metrics/train/loss.tsv"
    tsv.write_text(tsv.read_text() + "5\t99.0\n")
    assert fit(other, p)["step"] == 6                   # a new process would do the same
    a, b = losses(root / "runs/nanodit"), losses(other / "runs/nanodit")
    assert [s for s, _ in a] == list(range(1, 7)) == [s for s, _ in b]
    assert a == b, "the resumed run's losses differ from the uninterrupted run's"
    wa = load_file(root / "runs/nanodit/checkpoints/step-000006/ema/diffusion_pytorch_model.safetensors")
    wb = load_file(other / "runs/nanodit/checkpoints/step-000006/ema/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The grid is written at every sample_every and at the end.
    assert sorted(f.name for f in (root / "runs/nanodit/samples").iterdir()) == ["step-000003.png",
                                                                                "step-000006.png"]
    metrics = json.loads((root / "runs/nanodit/live/metrics.json").read_text())
    assert metrics["step"] == 6 and math.isfinite(metrics["train"]["loss"]) and "repa_loss" in metrics["train"]


def test_checkpoint_holds_everything_to_resume_and_loads_weights_only(root):
    fit(root, params(steps=3, keep_checkpoints=1, optimizer="muon"))
    ckpt = train_state.latest(root / "runs/nanodit/checkpoints")
    assert ckpt.name == "step-000003"
    state = train_state.load_state(ckpt)  # torch.load(weights_only=True)
    assert set(state) == {"optimizers", "schedulers", "loader", "rng", "counters"}
    assert len(state["optimizers"]) == 2  # AdamW + Muon
    assert state["loader"][0]["batches"] > 0 and {"python", "numpy", "torch"} <= set(state["rng"])
    meta = train_state.read_meta(ckpt)
    assert meta["step"] == 3 and meta["data"] == {"text_dim": 8, "dino_dim": 16, "dino_pool": 1}
    assert meta["params"]["preset"] == "tiny"


def test_only_the_newest_checkpoints_are_kept_and_leftovers_are_swept(root):
    leftover = root / "runs/nanodit/checkpoints/.step-000001.deadbeef.tmp"
    leftover.mkdir(parents=True)
    fit(root, params(steps=4, checkpoint_every=1, keep_checkpoints=2))
    names = sorted(d.name for d in (root / "runs/nanodit/checkpoints").iterdir())
    assert names == ["step-000003", "step-000004"]


def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop_with_the_last_good_checkpoint(root, monkeypatch):
    real = train_mod.loss_terms
    calls = {"n": 0}

    def poisoned(*a, **kw):  # micro-steps 5 (one step), then from 9 on, give NaN
        calls["n"] += 1
        terms = real(*a, **kw)
        if calls["n"] in (5, 6) or calls["n"] >= 9:
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(train_mod, "loss_terms", poisoned)
    with pytest.raises(TrainError, match=r"3 steps in a row.*nan_patience = 3.*step-000003"):
        fit(root, params(steps=10, checkpoint_every=3, nan_patience=3))
    ckpts = [d.name for _, d in train_state.step_dirs(root / "runs/nanodit/checkpoints")]
    assert ckpts == ["step-000003"]  # nothing saved after the weights could have gone bad
    state = train_state.load_state(root / "runs/nanodit/checkpoints/step-000003")
    assert state["counters"]["skipped_steps"] == 1  # the lone NaN step was skipped and counted
    w = load_file(root / "runs/nanodit/checkpoints/step-000003/model/diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_changed_settings_start_over_and_move_the_old_run_aside(root):
    fit(root, params(steps=2, checkpoint_every=1))
    t = Trainer(params(steps=3, checkpoint_every=1), root=root, params_file=root / "params.yaml")  # steps change lr
    assert t.step == 0
    aside = list((root / "runs").glob("nanodit.superseded-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints/step-000002").is_dir()
    t.loader.close()
    # Settings that do not change the computation resume as they are.
    fit(root, params(steps=3, checkpoint_every=1), stop_at=1)
    assert Trainer(params(steps=3, checkpoint_every=1, sample_every=5, log_every=2), root=root,
                   params_file=root / "params.yaml").step == 1


def test_bad_settings_are_refused_with_their_key(root):
    with pytest.raises(ValueError, match=r"train.cfg_dropout: the seven shares must sum to 1"):
        params(cfg_dropout={"uncond": 0.5})
    with pytest.raises(ValueError, match=r"train.resolution_schedule\[1\]"):
        params(resolution_schedule=[[10, 0.5], [5, 1.0]])
    with pytest.raises(ParamsError, match=r"train.adam_betas: expected 2 items"):
        params(adam_betas=[0.9])
    with pytest.raises(TrainError, match="train.shards: source: expected a folder of shards.*nowhere"):
        Trainer(params(shards="nowhere"), root=root, params_file=root / "params.yaml")


@pytest.mark.slow
def test_two_process_ddp_on_cpu_trains_checkpoints_and_resumes(root):
    """torchrun, gloo: both ranks train in step, rank 0 writes one checkpoint holding both loaders'
    positions, and a resumed 2-process run continues exactly."""
    doc = yaml.safe_load((root / "params.yaml").read_text())
    doc["train"].update(steps=4, checkpoint_every=2, grad_accum=1)
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "tasks.train"]
    out = subprocess.run(cmd + ["--stop-at", "2"], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    state = train_state.load_state(root / "runs/nanodit/checkpoints/step-000002")
    assert len(state["loader"]) == 2 and all(s["batches"] >= 1 for s in state["loader"])
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stderr and "step-000002" in out.stderr
    assert [s for s, _ in losses(root / "runs/nanodit")] == [1, 2, 3, 4]

"""The NanoDiT trainer on small random shards: exact resume, non-finite steps, superseded runs,
checkpoint rotation, and DDP with two CPU processes (gloo)."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tasks.nanodit import trainer as train_mod
from tasks.training import checkpoints as train_state
from tasks.core.params import ParamsError, from_dict
from models.nanodit import NanoDiT
from tasks.nanodit.log import grid_guidance
from tasks.nanodit.optim import ADAMW_WEIGHTS, ema_decay_at, optimizers
from tasks.nanodit.trainer import Trainer
from tasks.training.run import TrainError
from tasks.nanodit.params import TrainParams
from tests import shardkit

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(preset="tiny", steps=6, batch_size=2, grad_accum=2, lr=1e-3, warmup_steps=2, precision="fp32",
             gradient_checkpointing=False, ema_decay=0.9, ema_warmup=2, image_scale=1.0, resolution_schedule=[[3, 0.5]],
             num_workers=0, shuffle_buffer=4, checkpoint_every=3, sample_every=3, sample_steps=1, log_every=1,
             optimizer="adamw")  # Muon's bf16 Newton-Schulz is slow on a CPU: two tests cover it


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


def twin(root: Path, tmp_path_factory) -> Path:
    """Another run folder with the same shards and params.yaml as `root`."""
    other = tmp_path_factory.mktemp("other")
    shardkit.write_dataset(other / "data" / "shards", {"64x32": 8, "32x64": 8}, shard_size=4, holdout={"64x32": 2})
    (other / "params.yaml").write_text((root / "params.yaml").read_text())
    return other


def grid_cell(png: Path) -> tuple[int, int]:
    """The (width, height) of one cell of a 4-column, 2-row sample grid (tasks.training.live.grid, pad 4)."""
    w, h = Image.open(png).size
    return (w - 4) // 4 - 4, (h - 4) // 2 - 4


# log_every 2 with a stop at 3: the stop falls inside a logging window, which the checkpoint
# carries over, so the resumed run logs step 4 as the mean of steps 3 and 4, as the straight run does.
@pytest.mark.parametrize("optimizer,log_every,stop", [("adamw", 1, 4), ("muon", 1, 4), ("adamw", 2, 3)])
def test_stopped_and_resumed_run_gives_the_same_losses_as_one_that_never_stopped(root, tmp_path_factory, optimizer,
                                                                                  log_every, stop):
    other = twin(root, tmp_path_factory)
    p = params(optimizer=optimizer, log_every=log_every)
    straight = fit(root, p)
    assert straight["step"] == 6
    assert fit(other, p, stop_at=stop)["step"] == stop  # checkpoints at 3 (and the stop), then stops
    # Points logged after the last checkpoint must not survive a crash: fake one.
    tsv = other / "runs/nanodit/live/plots/metrics/train/loss.tsv"
    tsv.write_text(tsv.read_text() + f"{stop + 1}\t99.0\n")
    assert fit(other, p)["step"] == 6                   # a new process would do the same
    a, b = losses(root / "runs/nanodit"), losses(other / "runs/nanodit")
    assert [s for s, _ in a] == list(range(log_every, 7, log_every)) == [s for s, _ in b]
    assert a == b, "the resumed run's losses differ from the uninterrupted run's"
    wa = load_file(root / "runs/nanodit/checkpoints/step-000006/ema/diffusion_pytorch_model.safetensors")
    wb = load_file(other / "runs/nanodit/checkpoints/step-000006/ema/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # The grid is written at every sample_every and at the end.
    assert sorted(f.name for f in (root / "runs/nanodit/samples").iterdir()) == ["step-000003.png",
                                                                                "step-000006.png"]
    # ... at the size training is at: half until step 3 (resolution_schedule [[3, 0.5]]), then full.
    half, full = (grid_cell(root / "runs/nanodit/samples" / f"step-00000{s}.png") for s in (3, 6))
    assert half == (full[0] // 2, full[1] // 2), (half, full)
    metrics = json.loads((root / "runs/nanodit/live/metrics.json").read_text())
    assert metrics["step"] == 6 and math.isfinite(metrics["train"]["loss"]) and "repa_loss" in metrics["train"]


def test_ema_copies_until_its_warmup_then_ramps_up_to_its_decay():
    p = params(ema_warmup=5, ema_decay=0.9)
    assert [ema_decay_at(s, p) for s in range(5)] == [0.0] * 5
    assert [ema_decay_at(s, p) for s in (5, 6, 15)] == [1 / 10, 2 / 11, 11 / 20]  # (1 + n) / (10 + n)
    assert ema_decay_at(85, p) == ema_decay_at(10_000, p) == 0.9                 # 81 / 90, then capped
    # The production settings: what is left of the weights at the end of the warmup after 6000 steps
    # (0.9999 at once from step 500 would keep 0.9999^5500, 58%).
    real = TrainParams()
    assert math.prod(ema_decay_at(s, real) for s in range(real.ema_warmup, real.steps)) < 1e-6
    assert ema_decay_at(real.steps - 1, real) == pytest.approx(5500 / 5509)


def test_muon_trains_the_hidden_matrices_and_adamw_the_layers_at_the_edges():
    torch.manual_seed(0)
    model = NanoDiT.preset("tiny", text_dim=8, dino_dim=16)
    adam, muon = optimizers(model, params(optimizer="muon"))
    names = {id(v): k for k, v in model.named_parameters()}
    in_adam, in_muon = ({names[id(v)] for g in o.param_groups for v in g["params"]} for o in (adam, muon))
    assert isinstance(muon, torch.optim.Muon) and not in_adam & in_muon and in_adam | in_muon == set(names.values())
    # The raw signals in (pixels, sinusoidal timestep features, a joint's x, y, conf) and the pixels out.
    assert ADAMW_WEIGHTS <= in_adam and {"patch_in.weight", "pose_mlp.0.weight", "t_embed.0.weight"} <= in_adam
    assert {"blocks.0.attn.q.weight", "blocks.0.cross.kv.weight", "blocks.3.mlp.2.weight", "pose_mlp.2.weight",
            "t_embed.2.weight", "text_proj.1.weight"} <= in_muon
    assert all(model.get_parameter(k).dim() == 2 for k in in_muon)
    assert {"joint_embed", "type_embed", "blocks.0.attn.q.bias"} <= in_adam
    assert len(optimizers(model, params(optimizer="adamw"))) == 1


def test_self_guidance_without_tread_samples_with_cfg_and_says_so(root, caplog):
    caplog.set_level(logging.INFO, logger="niche.train")
    fit(root, params(steps=1, tread=False, sample_guidance="self"))
    meta = train_state.read_meta(root / "runs/nanodit/checkpoints/step-000001")
    assert meta["sampling"]["guidance"] == "cfg"  # what tasks.generate inherits
    assert (root / "runs/nanodit/samples/step-000001.png").is_file()
    assert "sample_guidance self needs TREAD" in caplog.text
    assert grid_guidance(params(tread=True, sample_guidance="self")) == "self"
    assert grid_guidance(params(tread=False, sample_guidance="dual")) == "dual"


def test_checkpoint_holds_everything_to_resume_and_loads_weights_only(root):
    fit(root, params(steps=3, keep_checkpoints=1, optimizer="muon", guidance_scale_dino=2.5))
    ckpt = train_state.latest(root / "runs/nanodit/checkpoints")
    assert ckpt.name == "step-000003"
    state = train_state.load_state(ckpt)  # torch.load(weights_only=True)
    assert set(state) == {"optimizers", "schedulers", "loader", "rng", "counters", "window"}
    assert len(state["optimizers"]) == 2  # AdamW + Muon
    assert state["loader"][0]["batches"] > 0 and {"python", "numpy", "torch"} <= set(state["rng"])
    meta = train_state.read_meta(ckpt)
    assert meta["step"] == 3 and meta["data"] == {"text_dim": 8, "dino_dim": 16, "dino_pool": 1}
    assert meta["params"]["preset"] == "tiny"
    assert meta["sampling"]["scale_dino"] == 2.5  # generate's default for dual guidance


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
    # Settings that do not change the computation resume as they are; gradient checkpointing
    # too (turned on after running out of memory, it recomputes the same values).
    fit(root, params(steps=3, checkpoint_every=1), stop_at=1)
    assert Trainer(params(steps=3, checkpoint_every=1, sample_every=5, log_every=2, gradient_checkpointing=True),
                   root=root, params_file=root / "params.yaml").step == 1
    assert len(list((root / "runs").glob("nanodit.superseded-*"))) == 1


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
    positions, a resumed 2-process run continues exactly (its losses are those of a 2-process run
    that never stopped), and a run started over moves the old one aside once for both ranks."""
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
    resumed = losses(root / "runs/nanodit")
    assert [s for s, _ in resumed] == [1, 2, 3, 4]
    # The same run from scratch, uninterrupted: rank 0 moves the resumed run aside (resume: never).
    doc["train"].update(resume="never")
    (root / "params.yaml").write_text(yaml.safe_dump(doc))
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    aside = list((root / "runs").glob("nanodit.superseded-*"))
    assert len(aside) == 1 and losses(aside[0]) == resumed
    assert losses(root / "runs/nanodit") == resumed, "the resumed 2-process run differs from an uninterrupted one"

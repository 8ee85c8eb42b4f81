"""`train` with trainer=sdxl-full (deployment train/sdxl-full) on the tiny pipeline and a real
Prefect server: the full fine-tune under DVC, its sweep through the flow-match sampler, and nothing
again when DVC says it is fresh. (Apart from test_train_flow.py so that xdist can run it beside.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import run
from tests.test_train_flow import dvc

pytestmark = pytest.mark.slow


def test_the_sdxl_full_trainer_runs_latents_then_train_sdxl_then_sweeps(tiny_repo, prefect_server):
    from flows.train import train

    root = tiny_repo
    doc = yaml.safe_load((root / "params.yaml").read_text())
    doc["train_sdxl"].update(steps=2, checkpoint_every=2, sample_steps=2, sweep_scenes=["juggling"], sweep_seeds=[0])
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run(["git", "commit", "-qam", "small full fine-tune"], root)
    dvc(root, "repro", "caption")
    result = train(root=str(root), skip_dataset=True, trainer="sdxl-full")
    ckpt = Path(result["checkpoint"])
    assert result["ran"] and ckpt.name == "step-000002" and (ckpt / "model_index.json").is_file()
    assert next(ckpt.glob("sdxl-full-step-000002.safetensors")).stat().st_size > 0
    layout = json.loads(Path(result["sweep"]).with_suffix(".json").read_text())
    assert len(layout["rows"]) == 1
    assert "up to date" in dvc(root, "status", "--with-deps", "train_sdxl").stdout
    metrics = json.loads((root / "metrics/train_sdxl.json").read_text())
    assert metrics["step"] == 2
    again = train(root=str(root), skip_dataset=True, trainer="sdxl-full")
    assert not again["ran"] and again["sweep"] is None

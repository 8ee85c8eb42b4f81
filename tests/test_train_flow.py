"""`train` in dvc.yaml and as a Prefect flow, on the tiny pipeline: DVC decides, the flow and
`dvc repro` agree, a stopped run resumes, and `dvc exp run -S` runs an ablation."""
from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, run

pytestmark = pytest.mark.slow

SMALL = {"steps": 4, "checkpoint_every": 2, "sample_every": 2, "sample_steps": 1, "log_every": 1,
         "optimizer": "adamw", "num_workers": 0, "image_scale": 0.125}


def dvc(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], repo, check=check)


@pytest.fixture
def train_repo(tiny_repo):
    doc = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    doc["train"].update(SMALL)
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run(["git", "commit", "-qam", "small training"], tiny_repo)
    return tiny_repo


def test_train_flow_builds_the_data_trains_and_agrees_with_dvc(train_repo, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import train

    root = train_repo
    result = train(root=str(root))
    assert result["ran"] and result["metrics"]["step"] == 4
    assert Path(result["checkpoint"]).name == "step-000004"
    assert sorted(p.name for p in (root / "runs/nanodit/samples").iterdir()) == ["step-000002.png",
                                                                               "step-000004.png"]
    assert "up to date" in dvc(root, "status", "--with-deps", "train").stdout  # validate is not train's
    assert not train(root=str(root))["ran"]  # DVC: fresh
    shown = json.loads(dvc(root, "metrics", "show", "--json").stdout)
    assert any("train" in str(v) for v in shown.values())

    async def artifacts():
        async with get_client() as client:
            # By key: an unfiltered read returns only the API's default page of 200.
            keys = ["train-metrics", "train-run", "build-dataset-summary"]
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
            return {a.key for a in arts if a.key}
    assert {"train-metrics", "train-run", "build-dataset-summary"} <= asyncio.run(artifacts())


def test_stopped_training_resumes_under_dvc_repro_and_an_ablation_runs_as_an_experiment(train_repo):
    root = train_repo
    dvc(root, "repro", "shard")
    # A run stopped at step 2 (as if killed after its checkpoint) ...
    run([str(BIN / "python"), "-m", "tasks.train", "--stop-at", "2"], root)
    # ... continues from it under `dvc repro`.
    out = dvc(root, "repro", "train")
    assert "resumed from runs/nanodit/checkpoints/step-000002" in out.stdout + out.stderr
    assert (root / "runs/nanodit/checkpoints/step-000004").is_dir()
    run(["git", "add", "-A"], root)
    run(["git", "commit", "-qm", "trained"], root)
    # The seed's ablation grid is `dvc exp run -S`: here TREAD off and plain AdamW.
    dvc(root, "exp", "run", "-S", "train.tread=false", "-S", "train.repa=false")
    rows = json.loads(dvc(root, "exp", "show", "--json").stdout)
    found = [(d["params"]["params.yaml"]["data"]["train"], d["metrics"].get("metrics/train.json", {}).get("data", {}),
              d["rev"]) for d in _exp_data(rows)]
    exp = [rev for t, m, rev in found
           if rev != "workspace" and t["tread"] is False and t["repa"] is False and m.get("step") == 4]
    assert len(exp) == 1, found
    # dvclive's figures are versioned but not a metric (a dozen columns): `dvc metrics diff --targets` reads them.
    live = json.loads(dvc(root, "metrics", "diff", "--all", "--json", "HEAD", exp[0], "--targets",
                          "runs/nanodit/live/metrics.json").stdout)["runs/nanodit/live/metrics.json"]
    assert live["step"]["new"] == 4 and live.get("train.repa_loss", {}).get("new") is None, live  # REPA off
    # The changed settings started a new run; the old one was moved aside, not deleted.
    assert list((root / "runs").glob("nanodit.superseded-*/checkpoints/step-000004"))


def _exp_data(node):
    """Every revision's `data` in `dvc exp show --json` (nested: rev → experiments → revs)."""
    if isinstance(node, list):
        for x in node:
            yield from _exp_data(x)
    elif isinstance(node, dict):
        data = node.get("data")
        if isinstance(data, dict) and "params" in data and data.get("metrics"):
            yield data
        for key in ("experiments", "revs"):
            if node.get(key):
                yield from _exp_data(node[key])


def test_the_sdxl_trainer_runs_latents_the_negative_lora_and_the_lora_then_sweeps(tiny_repo, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.train import train

    root = tiny_repo
    doc = yaml.safe_load((root / "params.yaml").read_text())
    doc["train_lora"].update(steps=4, checkpoint_every=2, sample_steps=2, sweep_scenes=["juggling"], sweep_seeds=[0])
    (root / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run(["git", "commit", "-qam", "small LoRA"], root)
    dvc(root, "repro", "caption")  # the dataset stages the LoRA reads (build-dataset would also embed and shard)
    result = train(root=str(root), skip_dataset=True, trainer="sdxl")
    assert result["ran"] and Path(result["checkpoint"]).name == "step-000004"
    # This sample set has no rejects: the negative LoRA stage says so and succeeds.
    assert result["negative"] is None and (root / "runs/sdxl-wrong/checkpoints/NO_SAMPLES.txt").is_file()
    layout = json.loads(Path(result["sweep"]).with_suffix(".json").read_text())
    assert len(layout["rows"]) == 2
    for stage in ("latents", "train_wrong", "train_lora"):
        assert "up to date" in dvc(root, "status", "--with-deps", stage).stdout, stage
    again = train(root=str(root), skip_dataset=True, trainer="sdxl")
    assert not again["ran"] and again["sweep"] is None  # DVC: fresh; the grid stands

    async def artifacts():
        async with get_client() as client:
            keys = ["train-lora-metrics", "train-lora-run", "train-lora-sweep"]
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
            return {a.key for a in arts}
    assert asyncio.run(artifacts()) == {"train-lora-metrics", "train-lora-run", "train-lora-sweep"}


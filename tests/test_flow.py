"""Prefect and DVC agree: a real Prefect server, a real DVC repo, the real flow."""
from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from flows.build_dataset import STAGES
from tests.conftest import BIN, SERVE_ENV, run, served

pytestmark = pytest.mark.slow


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run([str(BIN / "dvc"), *args], repo)


def dataset_status(repo: Path) -> str:
    """`dvc status` of the dataset stages (shard and everything it reads); train and validate
    are not build-dataset's business."""
    return dvc(repo, "status", "--with-deps", "shard").stdout


def ran_stages(results) -> list[str]:
    return [r["stage"] for r in results if r["ran"]]


def test_flow_and_dvc_repro_agree(repo, prefect_server):
    from flows.build_dataset import build_dataset

    root, expected = repo
    results = build_dataset(root=str(root))
    assert ran_stages(results) == list(STAGES)
    assert results[0]["metrics"]["quarantined"] >= len(expected)
    # The flow left dvc.lock as `dvc repro` would: everything is up to date ...
    assert "up to date" in dataset_status(root)
    lock = (root / "dvc.lock").read_text()
    assert set(yaml.safe_load(lock)["stages"]) == set(STAGES)
    # ... so `dvc repro` does nothing and leaves the lock as it was,
    repro = dvc(root, "repro", "shard")
    assert "didn't change, skipping" in repro.stdout and "Running stage" not in repro.stdout
    assert (root / "dvc.lock").read_text() == lock
    # ... and neither does the flow.
    assert ran_stages(build_dataset(root=str(root))) == []

    # Changing a bucket parameter makes bucket stale and ingest not, for both
    # front doors; what reads the new pixels follows, in DAG order.
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["bucket"]["resample"] = "bicubic"
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    status = dataset_status(root)
    assert "bucket" in status and "ingest" not in status
    results = build_dataset(root=str(root))
    ran = ran_stages(results)
    assert "ingest" not in ran and ran[0] == "bucket"
    assert {"embed_image", "embed_pose"} <= set(ran)
    assert results[1]["metrics"]["computed"] == results[1]["metrics"]["total"]
    assert "up to date" in dataset_status(root)


def test_dvc_repro_first_then_the_flow_does_nothing(repo, prefect_server):
    from flows.build_dataset import build_dataset

    root, _ = repo
    out = dvc(root, "repro", "shard").stdout
    assert all(f"Running stage '{s}'" in out for s in STAGES)
    assert ran_stages(build_dataset(root=str(root))) == []


async def _flow_run_details(flow_run_id, log_containing: str | None = None, wait: float = 60):
    """The run, its task runs, logs and artifacts. Logs reach the server in batches, after
    the run's final state: with `log_containing`, wait (up to `wait` s) for such a line."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter,
                                                FlowRunFilterId, LogFilter, LogFilterFlowRunId)

    async with get_client() as client:
        run_ = await client.read_flow_run(flow_run_id)
        tasks_ = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        deadline = time.monotonic() + wait
        while True:
            logs = []  # every page: the API returns at most its default limit (200) per call
            while True:
                page = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                              limit=200, offset=len(logs))
                logs += page
                if len(page) < 200:
                    break
            if (log_containing is None or any(log_containing in entry.message for entry in logs)
                    or time.monotonic() > deadline):
                break
            await asyncio.sleep(0.5)
        arts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return run_, tasks_, logs, arts


def test_deployment_runs_through_the_server_with_logs_and_counts(repo, prefect_server):
    """`prefect deployment run build-dataset/local` against a served deployment."""
    root, _ = repo
    with served(root, ("build-dataset/local",)):
        out = run([str(BIN / "prefect"), "deployment", "run", "build-dataset/local", "--watch",
                   "--watch-timeout", "300"], root, env={**os.environ, **SERVE_ENV}, timeout=330)
        assert "Completed" in out.stdout + out.stderr
        import re
        flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)

    run_, task_runs, logs, arts = asyncio.run(_flow_run_details(flow_run_id, "quarantined data/raw/problems/bomb.png"))
    assert run_.state.is_completed() and run_.parameters == {"root": str(root)}
    assert sorted(t.name for t in task_runs) == sorted(STAGES)
    assert all(t.state.is_completed() for t in task_runs)
    by_task = {t.id: t.name for t in task_runs}
    ingest_lines = [log.message for log in logs if by_task.get(log.task_run_id) == "ingest"]
    # The stage's own log lines (from its DVC subprocess) reach its task run.
    assert any("quarantined data/raw/problems/bomb.png" in m for m in ingest_lines)
    assert any("computed=" in m for m in ingest_lines)
    # A model stage's task run says where it computed and how fast (the same lines on Ray, with
    # the cluster's resources: tests/test_ray_executor.py).
    image_lines = [log.message for log in logs if by_task.get(log.task_run_id) == "embed_image"]
    assert any(re.search(r"items to compute in \d+ batches on local", m) for m in image_lines), image_lines
    assert any(re.search(r"computed, \d+ failed in [\d.]+ s \([\d.]+ items/s; [\d.]+ items/s once the model was up\) on local", m)
               for m in image_lines), image_lines
    keys = {a.key for a in arts}
    assert {"ingest-counts", "bucket-counts", "build-dataset-summary"} <= keys
    counts = next(a for a in arts if a.key == "bucket-counts")
    assert "computed" in str(counts.data)
    assert "up to date" in dataset_status(root)


def test_flow_keeps_dvc_added_raw_data_current(tiny_repo, prefect_server):
    """With `dvc add data/raw`, adding an image and running the flow records the
    new raw version and leaves `dvc status` clean, as `dvc repro` would."""
    from flows.build_dataset import build_dataset
    from tasks.sample.particles import write_particle_dataset

    root = tiny_repo
    dvc(root, "add", "-q", "data/raw")
    assert ran_stages(build_dataset(root=str(root)))[:2] == ["ingest", "bucket"]
    write_particle_dataset(root / "data/raw/figures", 1, seed=0, start=6)
    results = build_dataset(root=str(root))
    assert ran_stages(results)[:2] == ["data/raw.dvc", "ingest"]
    assert next(r for r in results if r["stage"] == "bucket")["metrics"]["computed"] == 1
    assert "up to date" in dataset_status(root)

"""The deployments on a real Prefect server: build-dataset and validate run through the API,
then the run history, task runs, artifacts and the nightly schedule are read back."""
from __future__ import annotations

import asyncio

import pytest
import yaml

from tests.conftest import BIN, run, served
from tests.test_flow import _flow_run_details

pytestmark = pytest.mark.slow
DEPLOYMENTS = ("build-dataset/local", "train/local", "validate/local", "validate-nightly/local")


@pytest.fixture
def trained_repo(tiny_repo):
    doc = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    doc["ingest"]["holdout_max_fraction"] = 0.4  # 6 figures: 2 held out for validation
    doc["train"].update(steps=2, checkpoint_every=2, sample_every=2, sample_steps=1, log_every=1,
                        optimizer="adamw", num_workers=0, image_scale=0.125)
    doc["validate"].update(steps=2, holdout=2, sweep_prompts=["a figure juggling"], sweep_seeds=[0])
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run([str(BIN / "dvc"), "repro", "train"], tiny_repo)
    return tiny_repo


async def _run(name: str):
    from prefect.deployments import run_deployment

    return await run_deployment(name, timeout=600, poll_interval=1)


async def _history(ids):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        nightly = await client.read_deployment_by_name("validate-nightly/local")
        schedules = [s.schedule.cron for s in nightly.schedules]
        # By id: the session's server holds hundreds of scheduled nightly runs by now, and an
        # unfiltered read returns only the API's default page of 200 of them.
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        return schedules, runs


def test_deployments_run_through_the_api_and_publish_history_and_artifacts(trained_repo, prefect_server):
    root = trained_repo
    with served(root, DEPLOYMENTS, "--nightly-cron", "30 3 * * *") as log:
        built = asyncio.run(_run("build-dataset/local"))
        validated = asyncio.run(_run("validate/local"))
        nightly = asyncio.run(_run("validate-nightly/local"))
        schedules, runs = asyncio.run(_history([built.id, validated.id, nightly.id]))
    assert built.state.is_completed(), log.read_text()[-3000:]
    assert validated.state.is_completed(), log.read_text()[-3000:]
    assert nightly.state.is_completed(), log.read_text()[-3000:]
    assert schedules == ["30 3 * * *"]
    # The run history on the server holds the three runs, of their deployments.
    by_id = {r.id: r for r in runs}
    assert {built.id, validated.id, nightly.id} <= set(by_id)
    assert by_id[validated.id].deployment_id != by_id[nightly.id].deployment_id

    run_, task_runs, logs, arts = asyncio.run(_flow_run_details(validated.id))
    assert sorted(t.name for t in task_runs) == ["sweep-and-report", "validate"]
    assert all(t.state.is_completed() for t in task_runs)
    keys = {a.key for a in arts}
    assert {"validation-metrics", "validation-summary"} <= keys
    table = next(a for a in arts if a.key == "validation-metrics")
    assert "reconstruction" in str(table.data) and "cfg_divergence" in str(table.data)
    summary = next(a for a in arts if a.key == "validation-summary")
    assert "NOT comparable" in summary.data and "data:image/jpeg;base64," in summary.data
    assert (root / "runs/nanodit/validation/step-000002/metrics.json").is_file()
    assert (root / "runs/nanodit/report.html").is_file() and (root / "runs/nanodit/sweep.png").is_file()

    # The nightly run found step 2 already validated and did not validate it again.
    _, nightly_tasks, nightly_logs, nightly_arts = asyncio.run(_flow_run_details(nightly.id, "already validated"))
    assert any("already validated" in entry.message for entry in nightly_logs)
    assert not {a.key for a in nightly_arts} & {"validation-metrics", "validation-summary"}
    assert "up to date" in run([str(BIN / "dvc"), "status", "--with-deps", "validate"], root).stdout

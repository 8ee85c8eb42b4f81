"""The deployments on a real Prefect server: build-dataset and validate run through the API,
then the run history, task runs, artifacts and the nightly schedule are read back."""
from __future__ import annotations

import asyncio
import json
import sys

import pytest
import yaml

from tests.conftest import BIN, run, served
from tests.test_flow import _flow_run_details

pytestmark = pytest.mark.slow
DEPLOYMENTS = ("build-dataset/local", "train/local", "validate/local", "validate-nightly/local")


@pytest.fixture
def trained_repo(tiny_repo):
    """The dataset built by DVC and a 4-step run stopped at its first checkpoint (step 2), as a
    person stops one: `dvc repro train` later continues it to step 4, a checkpoint never validated."""
    doc = yaml.safe_load((tiny_repo / "params.yaml").read_text())
    doc["ingest"]["holdout_max_fraction"] = 0.4  # 6 figures: 2 held out for validation
    doc["train"].update(steps=4, checkpoint_every=2, sample_every=2, sample_steps=1, log_every=1,
                        optimizer="adamw", num_workers=0, image_scale=0.125)
    doc["validate"].update(steps=2, holdout=2, sweep_prompts=["a figure juggling"], sweep_seeds=[0])
    (tiny_repo / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    run([str(BIN / "dvc"), "repro", "shard"], tiny_repo)
    run([sys.executable, "-m", "tasks.train", "--stop-at", "2"], tiny_repo)
    return tiny_repo


async def _run(name: str, **parameters):
    from prefect.deployments import run_deployment

    return await run_deployment(name, parameters=parameters or None, timeout=600, poll_interval=1)


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
    dvc = str(BIN / "dvc")
    with served(root, DEPLOYMENTS, "--nightly-cron", "30 3 * * *") as log:
        built = asyncio.run(_run("build-dataset/local"))
        validated = asyncio.run(_run("validate/local"))
        nightly = asyncio.run(_run("validate-nightly/local"))
        schedules, runs = asyncio.run(_history([built.id, validated.id, nightly.id]))
        run([dvc, "repro", "train"], root)  # the stopped run continues: step 4, not validated yet
        fresh = asyncio.run(_run("validate-nightly/local"))
        fresh_status = run([dvc, "status", "--with-deps", "validate"], root).stdout
        metric = (root / "metrics/validate.json").read_bytes()
        backtest = asyncio.run(_run("validate/local", checkpoint="2"))  # an older step of the active run
        # Read while the runner still serves: a flow run's last log lines are sent as its process
        # exits, after its final state; stopping the runner then can kill that process mid-send.
        _, _, back_logs, back_arts = asyncio.run(_flow_run_details(backtest.id, "recorded validate's outputs"))
    assert built.state.is_completed(), log.read_text()[-3000:]
    assert validated.state.is_completed(), log.read_text()[-3000:]
    assert nightly.state.is_completed(), log.read_text()[-3000:]
    assert fresh.state.is_completed(), log.read_text()[-3000:]
    assert backtest.state.is_completed(), log.read_text()[-3000:]
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
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert all("not comparable" in r["lpips"] for r in rows)  # the label on every row of numbers
    summary = next(a for a in arts if a.key == "validation-summary")
    assert "NOT comparable" in summary.data and "data:image/jpeg;base64," in summary.data
    assert (root / "runs/nanodit/validation/step-000002/metrics.json").is_file()
    assert (root / "runs/nanodit/report.html").is_file() and (root / "runs/nanodit/sweep.png").is_file()
    # The sweep: validate.sweep_prompts (never seen) + validate.sweep_seen = 1 training caption.
    swept = json.loads((root / "runs/nanodit/sweep.json").read_text())["prompts"]
    from tasks.sweep import seen_captions
    seen = seen_captions(root / "data/manifest/caption.parquet", 1)
    assert len(seen) == 1 and seen[0].strip() and swept == ["a figure juggling", *seen], swept

    # The nightly run found step 2 already validated and did not validate it again.
    _, nightly_tasks, nightly_logs, nightly_arts = asyncio.run(_flow_run_details(nightly.id, "already validated"))
    assert any("already validated" in entry.message for entry in nightly_logs)
    assert not {a.key for a in nightly_arts} & {"validation-metrics", "validation-summary"}

    # A new checkpoint: the nightly ran the DVC stage on it, so dvc.lock records it.
    _, _, fresh_logs, fresh_arts = asyncio.run(_flow_run_details(fresh.id, "validated by the DVC stage"))
    assert any("step 4 validated by the DVC stage" in entry.message for entry in fresh_logs)
    assert {"validation-metrics", "validation-summary"} <= {a.key for a in fresh_arts}
    assert "# validate: step 4" in next(a for a in fresh_arts if a.key == "validation-summary").data
    assert [r.split("\t")[0] for r in (root / "runs/nanodit/validation/history.tsv").read_text().splitlines()] \
        == ["step", "2", "4"]
    assert (root / "runs/nanodit/validation/step-000004/images/reconstruction").is_dir()
    assert json.loads(metric)["step"] == 4
    assert "up to date" in fresh_status, fresh_status

    # A back-test of step 2, in-process: the stage's INFO lines reach the run; the DVC metric stays step 4's.
    assert any("validate: wrote" in entry.message and "step-000002" in entry.message for entry in back_logs), \
        [entry.message for entry in back_logs][-40:]
    assert {"validation-metrics", "validation-summary"} <= {a.key for a in back_arts}
    assert (root / "metrics/validate.json").read_bytes() == metric
    # ... and its step, added to the stage's output folder, is recorded in dvc.lock (nothing else changed).
    assert any("recorded validate's outputs" in entry.message for entry in back_logs), \
        [entry.message for entry in back_logs][-40:]
    assert "up to date" in run([dvc, "status", "--with-deps", "validate"], root).stdout

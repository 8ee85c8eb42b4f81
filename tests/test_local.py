"""flows.local: the deployment runner that `make demo` and `make serve` start in the background
creates every deployment of flows.serve on the (session's) Prefect server, with the nightly
schedule active; `flows.local stop` stops it (SIGINT) and its deployments are paused."""
from __future__ import annotations

import json
import os
import sys
import time
import urllib.request

import pytest

from flows import local
from tests.conftest import SERVE_ENV, _free_port, run

pytestmark = pytest.mark.slow


def _deployment(api: str, name: str) -> dict:
    with urllib.request.urlopen(f"{api}/deployments/name/{name}", timeout=10) as r:
        return json.loads(r.read())


def test_the_runner_list_is_what_flows_serve_deploys(tmp_path):
    from flows.serve import deployments

    ds = deployments(tmp_path, "15 1 * * *")
    assert tuple(f"{d.flow_name}/{d.name}" for d in ds) == local.DEPLOYMENTS
    nightly = next(d for d in ds if f"{d.flow_name}/{d.name}" == local.NIGHTLY)
    assert [s.schedule.cron for s in nightly.schedules] == ["15 1 * * *"]


def test_the_background_runner_creates_the_deployments_and_the_nightly_schedule(tmp_path, monkeypatch, capsys):
    # A server of its own, started the way `make demo` starts one (and stopped by `stop`): the
    # session's server holds the same deployment names for the flow tests, whose runners must not
    # meet this one's.
    port = _free_port()
    prefect_server = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, **SERVE_ENV, "NICHE_NIGHTLY_CRON": "15 1 * * *", "PREFECT_API_URL": prefect_server,
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    cmd = [sys.executable, "-m", "flows.local"]
    monkeypatch.chdir(tmp_path)  # (flows.local keeps its pid files in ./.niche)
    try:
        run([*cmd, "server", "--port", str(port)], tmp_path, env=env, timeout=240)
        up = run([*cmd, "serve"], tmp_path, env=env, timeout=240).stdout
        status = run([*cmd, "status"], tmp_path, env=env).stdout
        nightly = _deployment(prefect_server, local.NIGHTLY)
        capsys.readouterr()
        t0 = time.monotonic()
        local._stop("serve", local.SERVE_GRACE_S)  # what `stop` does first; the server stays up to be asked
        t_stop = time.monotonic() - t0
        stopped = capsys.readouterr().out
        paused = _deployment(prefect_server, local.NIGHTLY)["paused"]
    finally:
        run([*cmd, "stop"], tmp_path, env=env, timeout=240)
    assert "deployment runner up" in up, up
    assert "deployment runner: up" in status, status
    for name in local.DEPLOYMENTS:
        assert f"  {name}: ready" in up and f"  {name}: ready" in status, status
    assert f"  {local.NIGHTLY}: ready, cron 15 1 * * * (UTC)" in status, status
    assert nightly["paused"] is False and nightly["status"] == "READY"
    assert [(s["schedule"]["cron"], s["active"]) for s in nightly["schedules"]] == [("15 1 * * *", True)]
    assert nightly["parameters"] == {"root": str(tmp_path.resolve())}

    # Stopped with SIGINT, as `make stop` does: Prefect's serve pauses its deployments.
    assert "serve stopped" in stopped and "killed" not in stopped, (stopped, t_stop)
    assert not (tmp_path / ".niche" / "serve.pid").exists()
    assert paused is True

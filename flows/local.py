"""Start, check and stop the local Prefect server and the deployment runner.

    python -m flows.local server [--host 127.0.0.1 --port 4200]
    python -m flows.local serve      # runs flows.serve in the background
    python -m flows.local status
    python -m flows.local stop       # runner first (SIGINT), then the server

Both run in the background with their pid and log in .niche/; the Makefile
targets `server`, `serve`, `status` and `stop` call this (`make demo` starts both,
so the UI shows the deployments and the nightly schedule).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

STATE = Path(".niche")
# What flows.serve creates (tests/test_local.py checks the two agree); read from the API here,
# without importing the flows (torch, DVC) into this small command.
DEPLOYMENTS = ("build-dataset/local", "train/local", "train/sdxl", "train/sdxl-full", "validate/local",
               "validate-nightly/local", "generate-candidates/local")
NIGHTLY = "validate-nightly/local"


def _api() -> str:
    return os.environ.get("PREFECT_API_URL", "http://127.0.0.1:4200/api").rstrip("/")


def _get(path: str, timeout: float = 2.0, body: dict | None = None):
    """GET path (POST body as JSON when given) from the API; None when it does not answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(_api() + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _deployment(name: str) -> dict | None:
    d = _get(f"/deployments/name/{name}")
    return d if isinstance(d, dict) and d.get("id") else None


def _served(d: dict | None) -> bool:
    """Created, not paused and polled by a runner (Prefect's READY)."""
    return d is not None and d.get("paused") is False and d.get("status") == "READY"


def _schedules(d: dict) -> list[str]:
    """The active schedules of a deployment, as text: `cron 0 2 * * * (UTC)`."""
    out = []
    for s in d.get("schedules") or []:
        sch = s.get("schedule") or {}
        if s.get("active") and sch.get("cron"):
            out.append(f"cron {sch['cron']} ({sch.get('timezone') or 'UTC'})")
    return out


def _next_run(d: dict) -> str | None:
    """The expected start of the deployment's next scheduled run, if the server made one yet."""
    runs = _get("/flow_runs/filter", body={
        "flow_runs": {"deployment_id": {"any_": [d["id"]]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
        "sort": "EXPECTED_START_TIME_ASC", "limit": 1})
    if isinstance(runs, list) and runs and runs[0].get("expected_start_time"):
        return runs[0]["expected_start_time"].replace("T", " ")[:16] + " UTC"
    return None


def _describe_deployments() -> None:
    """One line per deployment: served or paused, and its schedule."""
    for name in DEPLOYMENTS:
        d = _deployment(name)
        if d is None:
            print(f"  {name}: not created (make serve creates it)")
            continue
        state = "paused" if d.get("paused") else ("ready" if d.get("status") == "READY" else "not polled")
        sched = _schedules(d)
        nxt = _next_run(d) if sched and not d.get("paused") else None
        print(f"  {name}: {state}" + (f", {', '.join(sched)}" if sched else "")
              + (f", next run {nxt}" if nxt else ""))


def _alive(name: str) -> int | None:
    """The pid recorded for `name` if that process still runs and is ours."""
    pidfile = STATE / f"{name}.pid"
    try:
        pid = int(pidfile.read_text())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    if not cmd:  # mid-exec (or a zombie): the command line reads empty for a moment
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return None
        return pid if state != "Z" else None
    # Right after the fork the child still shows our own command line (flows.local).
    return pid if (b"prefect" in cmd or b"flows." in cmd) else None


def _spawn(name: str, argv: list[str]) -> int:
    STATE.mkdir(exist_ok=True)
    log = open(STATE / f"{name}.log", "ab")
    # A session of its own: it outlives `make`, and stop signals the group.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def _wait(what: str, ok, timeout: float, name: str) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ok():
            return
        if not _alive(name):
            tail = (STATE / f"{name}.log").read_text(errors="replace")[-2000:]
            sys.exit(f"{name} exited before {what}; its log ({STATE / (name + '.log')}) ends:\n{tail}")
        time.sleep(0.5)
    sys.exit(f"{what}: not ready after {timeout:.0f}s; see {STATE / (name + '.log')}")


def server(host: str, port: int) -> None:
    os.environ["PREFECT_API_URL"] = f"http://{host}:{port}/api"
    if _get("/health") is True:
        print(f"Prefect server already running: UI http://{host}:{port}")
        return
    prefect = str(Path(sys.executable).parent / "prefect")
    t0 = time.monotonic()
    _spawn("server", [prefect, "server", "start", "--host", host, "--port", str(port)])
    _wait("the Prefect server answers /api/health", lambda: _get("/health") is True, 180, "server")
    print(f"Prefect server up in {time.monotonic() - t0:.1f}s: UI http://{host}:{port} "
          f"(log {STATE / 'server.log'})")


def serve() -> None:
    if _alive("serve"):
        print("deployment runner already running (flows.serve)")
        return

    def ready() -> bool:
        ds = [_deployment(n) for n in DEPLOYMENTS]
        return all(_served(d) for d in ds) and bool(_schedules(ds[DEPLOYMENTS.index(NIGHTLY)]))

    t0 = time.monotonic()
    _spawn("serve", [sys.executable, "-m", "flows.serve"])
    _wait(f"the deployments ({', '.join(DEPLOYMENTS)}) are ready", ready, 180, "serve")
    print(f"deployment runner up in {time.monotonic() - t0:.1f}s (log {STATE / 'serve.log'}); "
          f"deployments, e.g. `prefect deployment run build-dataset/local --watch`:")
    _describe_deployments()


def _stop(name: str, grace: float) -> None:
    pid = _alive(name)
    if pid is None:
        (STATE / f"{name}.pid").unlink(missing_ok=True)
        return
    os.killpg(pid, signal.SIGINT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < grace and _alive(name):
        time.sleep(0.3)
    if _alive(name):
        os.killpg(pid, signal.SIGKILL)
        print(f"{name}: did not stop within {grace:.0f}s of SIGINT; killed")
    (STATE / f"{name}.pid").unlink(missing_ok=True)
    print(f"{name} stopped")


# How long the runner may take to pause its deployments through the server after SIGINT: on a
# loaded machine (CI's two busy cores) 30 s was seen to be too short.
SERVE_GRACE_S = 90


def stop() -> None:
    # The runner first: it marks its deployments paused through the server.
    _stop("serve", SERVE_GRACE_S)
    _stop("server", 30)


def status() -> None:
    up = _get("/health") is True
    print(f"server: {'up, UI ' + _api().removesuffix('/api') if up else 'down'}; "
          f"deployment runner: {'up' if _alive('serve') else 'down'}")
    if up:
        _describe_deployments()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=4200)
    sub.add_parser("serve")
    sub.add_parser("stop")
    sub.add_parser("status")
    args = ap.parse_args(argv)
    if args.cmd == "server":
        server(args.host, args.port)
    else:
        {"serve": serve, "stop": stop, "status": status}[args.cmd]()


if __name__ == "__main__":
    main()

"""Benchmark: ingest + bucket on N generated images, no-op re-runs, and adding 10.

    .venv/bin/python bench/bench_build.py [--images 1000] [--json bench/results/build.json]

Prints figures and writes them as JSON. Nothing here asserts a time: the
targets (no-op `dvc repro` <= 3 s, no-op flow <= 3 s beyond Prefect's own
start-up, exactly 10 items computed per stage when 10 images are added) are
read off the output.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path, port: int) -> None:
    os.environ.update({
        "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
        "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    })


def _timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def _metrics(repo: Path, stage: str) -> dict:
    return json.loads((repo / "metrics" / f"{stage}.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--json", type=Path, default=Path("bench/results/build.json"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="niche-bench-"))
    port = _port()
    _env(work / "prefect", port)
    from flows.scaffold import scaffold
    from tasks.sample.particles import write_particle_dataset

    repo = scaffold(work / "repo")
    out: dict = {"images": args.images, "cpus": os.cpu_count(), "python": platform.python_version()}

    t0 = time.perf_counter()
    write_particle_dataset(repo / "data/raw/figures", args.images, seed=0)
    out["generate_s"] = round(time.perf_counter() - t0, 2)

    dvc = str(BIN / "dvc")
    out["first_repro_s"] = round(_timed([dvc, "repro"], repo), 2)
    for stage in ("ingest", "bucket"):
        m = _metrics(repo, stage)
        out[f"{stage}_images_per_s"] = round(m["computed"] / m["seconds"], 1)
        out[f"{stage}_stage_s"] = m["seconds"]
    out["ingest_bucket_images_per_s"] = round(
        args.images / (out["ingest_stage_s"] + out["bucket_stage_s"]), 1)
    out["noop_dvc_repro_s"] = round(statistics.median(_timed([dvc, "repro"], repo) for _ in range(3)), 2)

    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        import urllib.request

        t0 = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(os.environ["PREFECT_API_URL"] + "/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        out["prefect_server_start_s"] = round(time.perf_counter() - t0, 1)

        from prefect import flow

        from flows.build_dataset import build_dataset

        @flow(name="empty")
        def empty() -> None:
            return None

        def flow_time(fn, **kw) -> float:
            t = time.perf_counter()
            fn(**kw)
            return time.perf_counter() - t

        flow_time(empty)  # first contact: client set-up, flow registration
        out["prefect_empty_flow_s"] = round(statistics.median(flow_time(empty) for _ in range(3)), 2)
        noop = [flow_time(build_dataset, root=str(repo)) for _ in range(3)]
        out["noop_flow_s"] = round(statistics.median(noop), 2)
        out["noop_flow_beyond_prefect_s"] = round(out["noop_flow_s"] - out["prefect_empty_flow_s"], 2)

        write_particle_dataset(repo / "data/raw/figures", 10, seed=0, start=args.images)
        t0 = time.perf_counter()
        results = build_dataset(root=str(repo))
        out["add10_flow_s"] = round(time.perf_counter() - t0, 2)
        out["add10_computed"] = {r["stage"]: r["metrics"]["computed"] for r in results if r["ran"]}
        out["add10_reused"] = {r["stage"]: r["metrics"]["reused"] for r in results if r["ran"]}
        status = subprocess.run([dvc, "status"], cwd=repo, capture_output=True, text=True).stdout
        out["dvc_status_after_flow"] = status.strip()
        from tasks.core.store import Store

        store = Store(repo / "data/derived/bucket", ".png")
        sizes = [store.size(k) for k in store.keys()]
        out["bucket_png_mean_kb"] = round(sum(sizes) / len(sizes) / 1024, 1)
    finally:
        server.send_signal(2)
        server.wait(30)

    for k, v in out.items():
        print(f"{k:32s} {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}; work folder {work}")


if __name__ == "__main__":
    main()

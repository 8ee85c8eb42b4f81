"""Shared fixtures: real temporary DVC repos and one real Prefect server per session.

Prefect reads its settings from the environment when first imported, so the
quiet, offline, throw-away settings are set here, before any test imports it.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.scaffold import scaffold
from tasks.profile import apply as apply_profile
from tasks.sample.__main__ import make_sample

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HOME = Path(tempfile.mkdtemp(prefix="niche-prefect-"))
_PORT = _free_port()
os.environ.update({
    "PREFECT_HOME": str(_HOME),
    "PREFECT_API_URL": f"http://127.0.0.1:{_PORT}/api",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "dvc",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "Niche Tests", "GIT_AUTHOR_EMAIL": "tests@niche.invalid",
    "GIT_COMMITTER_NAME": "Niche Tests", "GIT_COMMITTER_EMAIL": "tests@niche.invalid",
    # Stages run by DVC as `python -m tasks.x` must find this interpreter.
    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
})


SERVE_ENV = {"PYTHONPATH": str(ROOT), "PREFECT_LOGGING_LEVEL": "INFO"}  # the UI shows INFO lines


async def _deployments_ready(names: tuple[str, ...]) -> bool:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        try:
            ds = [await client.read_deployment_by_name(n) for n in names]
        except Exception:  # noqa: BLE001 — not all registered yet
            return False
        return all(not d.paused for d in ds)


@contextlib.contextmanager
def served(root: Path, names: tuple[str, ...], *args: str, timeout: float = 180):
    """`python -m flows.serve` in `root` for the block, once `names` are ready; stopped with
    SIGINT afterwards, as `make stop` does. Yields the path of its log."""
    import asyncio

    log = root / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "flows.serve", *args], cwd=root,
                            env={**os.environ, **SERVE_ENV}, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        t0 = time.monotonic()
        while not asyncio.run(_deployments_ready(names)):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() - t0 < timeout, "deployments never became ready:\n" + log.read_text()
            time.sleep(0.5)
        yield log
    finally:
        proc.send_signal(signal.SIGINT)
        t_stop = time.monotonic()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if sys.exc_info()[0] is None:  # never hide the block's own failure behind this one
                # `make stop` stops the runner the same way: it must go on its own.
                raise AssertionError(f"flows.serve ignored SIGINT for 90 s (killed):\n{log.read_text()[-3000:]}")
        if time.monotonic() - t_stop > 30:  # slow, not stuck: worth a line in the captured output
            print(f"flows.serve took {time.monotonic() - t_stop:.0f} s to stop after SIGINT")


def run(cmd: list[str], cwd: Path, check: bool = True, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def make_repo(path: Path, figures: int = 6, photos: bool = True, bad: bool = True,
              rejects: int = 0) -> tuple[Path, dict]:
    """A git + DVC repo holding this project's pipeline and a sample dataset, on
    the tiny profile (tests never touch real weights)."""
    scaffold(path)
    cwd = os.getcwd()
    os.chdir(path)
    try:
        expected = make_sample(Path("data/raw"), figures, seed=0, photos=photos, bad_examples=bad, rejects=rejects)
        apply_profile("tiny", Path("params.yaml"))
    finally:
        os.chdir(cwd)
    run(["git", "add", "-A"], path)
    run(["git", "commit", "-qm", "pipeline"], path)
    return path, expected


def bucketed_sample(buckets, figures: int = 6) -> None:
    """Sample figures ingested and bucketed in the current folder: the model stages' input."""
    from tasks.bucket import bucket
    from tasks.ingest import IngestParams, ingest

    make_sample(Path("data/raw"), figures=figures, photos=False, bad_examples=False)
    ingest(IngestParams(), workers=2)
    bucket(buckets, workers=2)


@pytest.fixture
def chdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def tiny_models():
    """The tiny profile's models, built once into this checkout's models/tiny
    (what `python -m tasks.profile tiny` does; a folder already built is kept), so
    every scaffolded repo copies them instead of building them again."""
    from filelock import FileLock

    from tasks.profile import build_tiny

    # pytest-xdist's workers share this checkout: one builds, the others wait and reuse it.
    with FileLock(str(ROOT / "models" / ".tiny.lock")):
        return build_tiny(ROOT / "models" / "tiny")


@pytest.fixture(scope="session")
def sample_repo(tmp_path_factory, tiny_models):
    """A repo with sample data, photos and problem files, created once; copy it before changing it."""
    return make_repo(tmp_path_factory.mktemp("sample") / "repo")


@pytest.fixture(scope="session")
def tiny_sample_repo(tmp_path_factory, tiny_models):
    """A repo with a few figures only: the conditioning stages' workload."""
    return make_repo(tmp_path_factory.mktemp("tiny") / "repo", figures=6, photos=False, bad=False)[0]


def _copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    run([str(BIN / "dvc"), "config", "--local", "core.site_cache_dir", str(dst / ".dvc" / "site")], dst)
    return dst


@pytest.fixture
def tiny_repo(tiny_sample_repo, tmp_path):
    return _copy_repo(tiny_sample_repo, tmp_path / "repo")


@pytest.fixture
def repo(sample_repo, tmp_path):
    src, expected = sample_repo
    # Problem paths are relative to the repo root, so they hold for the copy.
    return _copy_repo(src, tmp_path / "repo"), expected


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 endpoint (moto_server) on 127.0.0.1, with throw-away credentials
    in the environment, as a user's AWS config would provide them."""
    port = _free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    t0 = time.monotonic()
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(10)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.read().strip() == b"true"
    except OSError:
        return False


@pytest.fixture(scope="session")
def prefect_server():
    """A real `prefect server start` on 127.0.0.1, shared by the session."""
    url = os.environ["PREFECT_API_URL"]
    log = open(_HOME / "server.log", "wb")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(_PORT)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    t0 = time.monotonic()
    while not _healthy(url):
        if proc.poll() is not None or time.monotonic() - t0 > 180:
            proc.kill()
            raise RuntimeError("Prefect server did not start:\n" +
                               (_HOME / "server.log").read_text(errors="replace")[-3000:])
        time.sleep(0.5)
    yield url
    # Send the logs and events still queued before the server goes away.
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)
    EventsWorker.drain_all(timeout=10)
    proc.send_signal(2)  # SIGINT: the server's own clean shutdown
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(_HOME, ignore_errors=True)


# The longest files first: with `make test`'s two xdist workers (--dist loadfile), a long file
# left for last runs alone on one core while the other worker idles.
LONGEST_FIRST = ("test_train_flow.py", "test_validate_flow.py", "test_flow.py", "test_ray_executor.py",
                 "test_invalidation.py", "test_dvc_remote.py", "test_train.py", "test_train_lora.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept

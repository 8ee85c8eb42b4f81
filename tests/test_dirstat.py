"""tasks/core/dirstat.py: an unchanged folder dependency is not re-hashed, and every change DVC
sees is still seen.

Real git + DVC repos in tmp_path, one stage depending on a folder; `dvc status` and `dvc repro`
run as commands (the venv's .pth arms the patch in them), DVC without the patch
(NICHE_DIRSTAT=0) computes in this process what the lock must hold after each change.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tasks.core import dirstat
from tests.conftest import BIN, run

ROOT = Path(__file__).resolve().parents[1]
UP_TO_DATE = "Data and pipelines are up to date"
HIT, MISS = "dirstat hit: 'data/raw'", "dirstat miss: 'data/raw'"
FALLBACK = "dirstat fallback: DVC's own walk hashes 'data/raw'"
MODIFIED = {"s": [{"changed deps": {"data/raw": "modified"}}]}


def dvc(root: Path, *args: str, **env: str) -> str:
    p = subprocess.run([str(BIN / "dvc"), *args], cwd=root, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **env})
    assert p.returncode == 0, f"dvc {' '.join(args)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout + p.stderr


def make_tree(raw: Path) -> None:
    for sub in ("a", "b"):
        for i in range(6):
            (raw / sub).mkdir(parents=True, exist_ok=True)
            (raw / sub / f"{i}.jpg").write_bytes(f"image {sub}{i}".encode())
            (raw / sub / f"{i}.txt").write_text(f"caption {sub}{i}")
    (raw / ".curate").mkdir()
    (raw / ".curate" / "decisions.jsonl").write_text("{}\n")


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    run(["git", "init", "-q"], root)
    dvc(root, "init", "-q")
    (root / ".dvcignore").write_text("/data/raw/.curate/\n")
    (root / ".gitignore").write_text("/data/raw/\n")
    make_tree(root / "data" / "raw")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {
        "cmd": "python -c \"open('out.txt', 'w').write('ok')\"", "deps": ["data/raw"], "outs": ["out.txt"]}}}))
    return root


@contextmanager
def dvc_here(root: Path, monkeypatch, patched: bool):
    """DVC in this process (patched by the venv's .pth; NICHE_DIRSTAT=0 turns it off), and the
    dirstat lines it logs."""
    from dvc.repo import Repo

    assert dirstat.active()
    lines: list[str] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("dvc.niche.dirstat")
    old_level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    monkeypatch.setenv(dirstat.ENV, "1" if patched else "0")
    monkeypatch.chdir(root)
    try:
        with Repo(str(root)) as r:
            yield r, lines
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
        monkeypatch.delenv(dirstat.ENV)


def plain(root: Path, monkeypatch) -> tuple[dict, dict]:
    """DVC without the patch: (its status, the stage's dvc.lock entry it would record now)."""
    from dvc.stage.serialize import to_single_stage_lockfile

    with dvc_here(root, monkeypatch, patched=False) as (r, lines):
        status = r.status()
        (stage,) = r.stage.collect("s")
        stage.save_deps()
        entry = to_single_stage_lockfile(stage)
    assert lines == []
    return status, json.loads(json.dumps(entry))


def patched_status(root: Path, monkeypatch) -> tuple[dict, str]:
    with dvc_here(root, monkeypatch, patched=True) as (r, lines):
        return r.status(), "\n".join(lines)


def lock_entry(root: Path) -> dict:
    return yaml.safe_load((root / "dvc.lock").read_text())["stages"]["s"]


def cached(root: Path) -> dict:
    return json.loads((root / ".dvc" / "tmp" / dirstat.CACHE_NAME).read_text())["deps"]


@pytest.mark.slow
def test_status_is_served_from_the_cache_and_every_change_is_seen(repo, monkeypatch):
    raw = repo / "data" / "raw"
    log = dvc(repo, "repro", "-v")
    assert log.count(MISS) == 1 and HIT in log, log  # built once, then recalled (save, run cache)
    assert lock_entry(repo) == plain(repo, monkeypatch)[1]
    (recorded,) = cached(repo).values()
    assert recorded["hash"] == ["md5", lock_entry(repo)["deps"][0]["md5"]]
    out = dvc(repo, "status", "-v")
    assert UP_TO_DATE in out and HIT in out and MISS not in out, out

    # The curation page's log is dvcignored: writing it leaves the fingerprint as it was.
    (raw / ".curate" / "decisions.jsonl").write_text('{"keep": 1}\n')
    (raw / ".curate" / "new.jsonl").write_text("{}\n")
    status, lines = patched_status(repo, monkeypatch)
    assert status == {} and HIT in lines and MISS not in lines, lines

    def edit():  # same size, another mtime
        p = raw / "a" / "1.jpg"
        st = p.stat()
        p.write_bytes(b"IMAGE a1")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))

    def unreadable():
        (raw / "b" / "2.jpg").chmod(0)

    def symlink():
        target = repo.parent / "elsewhere.jpg"
        target.write_bytes(b"another image")
        (raw / "a" / "3.jpg").unlink()
        (raw / "a" / "3.jpg").symlink_to(target)

    changes = [
        ("edit in place", edit, True),
        ("add", lambda: (raw / "b" / "new.jpg").write_bytes(b"new"), True),
        ("delete", lambda: (raw / "a" / "2.txt").unlink(), True),
        ("rename", lambda: (raw / "b" / "3.jpg").rename(raw / "b" / "3-renamed.jpg"), True),
        # A rule that drops files DVC hashed: the files are all still there, the rules changed.
        ("ignore rule", lambda: (repo / ".dvcignore").write_text("/data/raw/.curate/\n/data/raw/a/*.txt\n"), True),
    ]
    if os.geteuid() != 0:  # root reads a file whatever its mode
        changes.append(("chmod 000", unreadable, False))
    changes.append(("symlink", symlink, False))

    for what, change, fast in changes:
        change()
        expected_status, _ = plain(repo, monkeypatch)
        assert expected_status == MODIFIED, (what, expected_status)
        out = dvc(repo, "status", "-v")
        assert "changed deps" in out and "modified:" in out and "data/raw" in out, (what, out)
        assert (MISS if fast else FALLBACK) in out and HIT not in out, (what, out)

        log = dvc(repo, "repro", "-v")
        assert "Running stage 's'" in log, (what, log)
        assert MISS not in log and ((HIT in log) if fast else (FALLBACK in log and HIT not in log)), (what, log)
        assert lock_entry(repo) == plain(repo, monkeypatch)[1], what

        status, lines = patched_status(repo, monkeypatch)
        assert status == {}, (what, status)
        assert (HIT if fast else FALLBACK) in lines and MISS not in lines, (what, lines)


@pytest.mark.slow
def test_repro_right_after_a_change_hashes_the_folder_once(repo, monkeypatch):
    dvc(repo, "repro")
    (repo / "data" / "raw" / "b" / "added.jpg").write_bytes(b"added")
    log = dvc(repo, "repro", "-v")
    assert "Running stage 's'" in log and log.count(MISS) == 1 and HIT in log, log
    assert lock_entry(repo) == plain(repo, monkeypatch)[1]


@pytest.mark.slow
def test_a_corrupt_or_foreign_cache_is_a_miss(repo, monkeypatch):
    dvc(repo, "repro")
    cache = repo / ".dvc" / "tmp" / dirstat.CACHE_NAME
    good = cache.read_text()
    for bad in ("{not json", json.dumps({"schema": 999, "deps": {}}), json.dumps({"schema": 1, "deps": {
            str(repo / "data" / "raw"): {"key": "0" * 64, "meta": {}, "hash": ["md5", "bogus.dir"]}}})):
        cache.write_text(bad)
        status, lines = patched_status(repo, monkeypatch)
        assert status == {} and MISS in lines and HIT not in lines, (bad, lines)
        assert json.loads(cache.read_text()) == json.loads(good)  # recorded again
    # Turned off: nothing read, nothing written.
    cache.unlink()
    assert plain(repo, monkeypatch)[0] == {}
    assert not cache.exists()


def test_the_fingerprint_sees_every_stat_and_refuses_odd_trees(tmp_path):
    top = tmp_path / "raw"
    make_tree(top)
    first, n = dirstat.fingerprint(str(top))
    assert n == 25 and dirstat.fingerprint(str(top))[0] == first  # (no ignore object here: .curate counts)
    f = top / "a" / "0.jpg"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 1))
    second = dirstat.fingerprint(str(top))[0]
    assert second != first
    f.chmod(0o600)  # ctime and mode
    assert dirstat.fingerprint(str(top))[0] != second
    (top / "a" / "empty").mkdir()  # a folder DVC does not hash: a miss, never a wrong hit
    assert dirstat.fingerprint(str(top))[0] != second

    trees = iter(range(100))

    def odd(make) -> str:
        bad = tmp_path / f"odd{next(trees)}"
        make_tree(bad)
        make(bad)
        with pytest.raises(dirstat.Odd) as e:
            dirstat.fingerprint(str(bad))
        return str(e.value)

    assert "neither a regular file nor a folder" in odd(lambda d: os.mkfifo(d / "a" / "pipe.jpg"))
    assert "neither" in odd(lambda d: (d / "b" / "link.jpg").symlink_to(d / "b" / "0.jpg"))
    assert "neither" in odd(lambda d: (d / "b" / "dirlink").symlink_to(d / "a"))
    assert "neither" in odd(lambda d: (d / "b" / "dangling.jpg").symlink_to(d / "nowhere"))
    assert "not UTF-8" in odd(lambda d: open(os.fsencode(d / "a") + b"/caf\xe9.jpg", "wb").close())
    assert ".dvcignore" in odd(lambda d: (d / "b" / ".dvcignore").write_text("*.txt\n"))

    def sock(d):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / "a" / "s"))
        s.close()

    if len(str(tmp_path / "odd99" / "a" / "s")) < 100:  # AF_UNIX path limit
        assert "neither" in odd(sock)
    if os.geteuid() != 0:  # root reads and lists whatever the mode
        assert "not readable" in odd(lambda d: (d / "a" / "1.txt").chmod(0))
        assert "cannot list" in odd(lambda d: (d / "b").chmod(0))
        for d in tmp_path.glob("odd*/b"):
            d.chmod(0o755)  # so that tmp_path can be removed


def test_the_venv_pth_arms_it_and_check_says_when_it_is_missing(tmp_path):
    code = ("import sys; before = 'tasks' in sys.modules or 'dvc' in sys.modules; "
            "import dvc.dependency.base as b; d = b.Dependency; "
            "print(before, getattr(d._build, '__niche_dirstat__', False), getattr(d.save, '__niche_dirstat__', False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"], (
        f"DVC in {sys.prefix} re-hashes folder deps: run `{sys.executable} -m tasks.core.rawfs install`")
    unarm = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if not hasattr(f, '__niche_dirstat__')]; "
    for module in ("rawfs", "dirstat"):
        ok = run([sys.executable, "-m", f"tasks.core.{module}", "check"], ROOT)
        assert "does not re-hash a folder dependency" in ok.stdout, ok.stdout
        missing = run([sys.executable, "-c", unarm + f"from tasks.core.{module} import main; main(['check'])"],
                      ROOT, check=False)
        assert missing.returncode == 1 and "Dependency._build is not patched" in missing.stderr, (module, missing)


def test_a_file_the_user_may_not_read_is_left_to_dvc(tmp_path, monkeypatch):
    """What rawfs makes DVC skip (os.access fails) is refused by the mode bits, for the owner,
    the group and the others (faked ids: the suite may run as root, who reads everything)."""
    top = tmp_path / "raw"
    make_tree(top)
    f = top / "a" / "0.jpg"
    st = f.stat()
    monkeypatch.setattr(os, "getgroups", lambda: [])
    for uid, gid, mode, readable in ((st.st_uid, 4242, 0o400, True), (st.st_uid, st.st_gid, 0o044, False),
                                     (4242, st.st_gid, 0o040, True), (4242, st.st_gid, 0o404, False),
                                     (4242, 4242, 0o004, True), (4242, 4242, 0o440, False)):
        if uid == 0 and not readable:
            continue  # root (real) reads it anyway
        monkeypatch.setattr(os, "getuid", lambda uid=uid: uid)
        monkeypatch.setattr(os, "getgid", lambda gid=gid: gid)
        f.chmod(mode)
        if readable:
            dirstat.fingerprint(str(top))
        else:
            with pytest.raises(dirstat.Odd, match="not readable"):
                dirstat.fingerprint(str(top))
    f.chmod(0o644)

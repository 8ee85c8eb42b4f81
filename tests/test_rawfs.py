"""tasks.core.rawfs: what counts as a readable regular file, and DVC's local walk that skips
the rest — installed into every process of this venv by its .pth (make venv)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core import rawfs
from tests.rawkit import make_odd_entries, no_hang, png


@pytest.fixture
def odd(tmp_path):
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "good.png").write_bytes(png())
    (folder / "sub").mkdir()
    (folder / "sub" / "caption.txt").write_text("a caption\n")
    return folder, make_odd_entries(folder / "odd")


def test_classify_gives_every_odd_entry_its_reason(odd):
    folder, expected = odd
    got = {}
    for name in os.listdir(os.fsencode(folder / "odd")):
        path = os.fsdecode(os.path.join(os.fsencode(folder / "odd"), name))
        kind, detail = rawfs.classify(path)
        got[rawfs.display(path)] = kind
        assert (kind in (rawfs.FILE, rawfs.DIR)) == (detail == ""), (path, kind, detail)
    assert {p: k for p, k in got.items() if k not in (rawfs.FILE, rawfs.DIR)} == expected
    assert got[f"{(folder / 'odd').as_posix()}/here"] == rawfs.DIR
    assert rawfs.classify(folder / "gone.png") == (rawfs.VANISHED, "listed, then gone before it could be read")


def test_open_regular_refuses_what_is_not_a_file_without_blocking(odd):
    folder, _ = odd
    o = folder / "odd"
    with no_hang():
        for name, code in [("pipe.png", "not_a_file"), ("via_pipe.png", "not_a_file"), ("sock.png", "not_a_file"),
                           ("loop.png", "symlink_loop"), ("dangling.png", "broken_symlink"),
                           ("gone.png", "vanished")] + [("zero.png", "not_a_file")] * (o / "zero.png").exists():
            with pytest.raises(rawfs.Unusable) as e:
                rawfs.open_regular(o / name)
            assert e.value.code == code, (name, e.value)
        with rawfs.open_regular(folder / "good.png") as f:
            assert f.read() == (folder / "good.png").read_bytes()


def test_dvc_walk_skips_odd_entries_and_keeps_every_file(odd):
    from dvc_objects.fs.local import FsspecLocalFileSystem, LocalFileSystem

    folder, _ = odd
    rawfs.install()
    fs = LocalFileSystem()
    good = {f"{folder}/good.png", f"{folder}/sub/caption.txt", f"{folder}/odd/with_pipe_caption.png"}
    with no_hang():
        assert set(fs.find(str(folder))) == good
        walked = {f"{root}/{n}": info["type"] for root, _, files in fs.walk(str(folder), detail=True)
                  for n, info in files.items()}
    assert walked == dict.fromkeys(good, "file")
    # A tree of plain files walks exactly as DVC's own walk does.
    plain = folder / "sub"
    orig = FsspecLocalFileSystem.walk.__wrapped__
    assert list(fs.walk(str(plain))) == list(orig(fs.fs, str(plain)))


def test_every_process_of_the_venv_has_dvc_patched_and_nothing_imported_at_start(tmp_path):
    """The .pth arms an import hook only: DVC's module is patched when DVC imports it, and
    `tasks` is not imported at start-up (a scaffolded repo's own tasks/ must win for `python -m`)."""
    code = ("import sys; before = 'tasks' in sys.modules or 'dvc_objects' in sys.modules; "
            "from dvc.repo import Repo; import dvc_objects.fs.local as l; "
            "print(before, getattr(l.FsspecLocalFileSystem.walk, '__niche_rawfs__', False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"], (
        f"DVC in {sys.prefix} is not patched: run `make venv` "
        f"(or `{sys.executable} -m tasks.core.rawfs install`)\n{out.stdout}{out.stderr}")
    check = subprocess.run([sys.executable, "-m", "tasks.core.rawfs", "check"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parents[1])
    assert check.returncode == 0, check.stderr


def test_the_same_pth_arms_the_store_unprotect_skip_and_check_says_when_it_is_missing(tmp_path):
    """tasks/core/storelinks.py: DVC's Output.unprotect is patched in every process of the venv
    (armed by the same .pth), and `rawfs check` / `storelinks check` fail without it."""
    from tasks.core import storelinks
    from tasks.core.store import STORE_MARKER

    assert storelinks.MARKER == STORE_MARKER
    code = ("import sys; before = 'tasks' in sys.modules or 'dvc' in sys.modules; "
            "import dvc.output as o; print(before, getattr(o.Output.unprotect, '__niche_storelinks__', False))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True"], (
        f"DVC in {sys.prefix} still unprotects stores: run `{sys.executable} -m tasks.core.rawfs install`")
    repo = Path(__file__).resolve().parents[1]
    unarm = "import sys; sys.meta_path[:] = [f for f in sys.meta_path if not hasattr(f, '__niche_storelinks__')]; "
    for module in ("rawfs", "storelinks"):
        ok = subprocess.run([sys.executable, "-m", f"tasks.core.{module}", "check"], capture_output=True,
                            text=True, cwd=repo)
        assert ok.returncode == 0 and "leaves stores" in ok.stdout, ok.stderr
        missing = subprocess.run([sys.executable, "-c", unarm + f"from tasks.core.{module} import main; main(['check'])"],
                                 capture_output=True, text=True, cwd=repo)
        assert missing.returncode == 1 and "Output.unprotect is not patched" in missing.stderr, (module, missing)


def test_unprotect_is_skipped_only_for_a_local_folder_holding_the_marker(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from tasks.core import storelinks

    calls = []
    patched = storelinks._wrap_unprotect(lambda out: calls.append(out.fs_path))
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / storelinks.MARKER).write_text("x")
    (tmp_path / "run").mkdir()
    local, remote = SimpleNamespace(protocol="local"), SimpleNamespace(protocol="s3")

    def out(path, fs=local, use_cache=True):
        return SimpleNamespace(fs_path=str(tmp_path / path), fs=fs, use_cache=use_cache)

    for o in (out("store"), out("run"), out("store/" + storelinks.MARKER), out("store", fs=remote)):
        patched(o)
    assert calls == [str(tmp_path / p) for p in ("run", "store/" + storelinks.MARKER, "store")]

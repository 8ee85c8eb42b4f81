"""What a raw folder may hold besides files, and a DVC that walks past it.

Why this exists. DVC hashes every folder a stage depends on (data/raw, for ingest
and bucket) before it decides what is stale and again after the stage ran: it walks
the folder with os.walk, stats every entry and opens every one it lists as a file.
An entry that is not a readable regular file stops it: a FIFO blocks `open`
forever (so `dvc repro` hangs), a socket fails with ENXIO, a dangling symlink with
ENOENT, a self-referential one with ELOOP, a name that is not UTF-8 fails when DVC
writes it to its state database, a file without read permission (when not root)
with EACCES. `.dvcignore` cannot match by file type nor hold a name that is not
UTF-8, and DVC has no plugin hook; an ignore list written by ingest comes too late
(plain `dvc repro` hashes before ingest runs) and an `always_changed` stage would
leave `dvc status` never clean.

The design: one rule, `classify`, says what an entry is — a regular file we can read,
a folder, or why it is neither (a stable reason code) — and both sides apply it:

- ingest walks the sources with it and quarantines every other entry with its
  reason, so a person sees each one;
- DVC's local walk (`FsspecLocalFileSystem.walk` in dvc_objects, the one walk
  behind every local dependency and output hash, `dvc status`, `dvc add` and
  the search for dvc.yaml files) is wrapped to drop exactly those entries, so
  DVC only ever stats and opens readable regular files. Every one of them stays
  in its hash: adding, editing, renaming or deleting a file still makes ingest
  stale. Trees without odd entries hash exactly as before.

The wrap is loaded into every Python process of the virtual environment by a
`.pth` file (`python -m tasks.core.rawfs install`, which `make venv` runs), so it
holds for the `dvc` command, the stages it runs, and in-process `Repo(...)` calls
(flows/dvc_stage.py, so the build-dataset flow) alike; `install()` patches a process
by hand. At start-up the `.pth` only arms an import hook; DVC's module is patched
when DVC itself imports it, and nothing else is imported, so other programs of the
venv pay nothing (the hook is tasks/core/importhook.py, shared with storelinks). This
file is loaded by path there (not as `tasks.core.rawfs`, which would import the `tasks`
package at start-up, and a scaffolded repo's own `tasks/` must win for `python -m
tasks.x`), so it imports nothing but the standard library (and importhook, by path). Without the `.pth` (a venv not made by `make venv`), `python -m
tasks.core.rawfs check` fails with the command to run, and ingest warns when it
lists entries that DVC would trip on. The same `.pth` arms tasks/core/storelinks.py (DVC
leaves the per-sample stores linked to its cache when their stage re-runs), and `check`
fails when that one is missing too.

Limits, said once: an entry DVC skips does not count for staleness, so adding or
removing only a FIFO (or a dangling link, an undecodable name...) does not re-run
ingest; it is listed the next time ingest runs. A regular file deleted in the
instant between DVC listing and reading it still fails that one DVC command (a
race with a writer, not something a folder can hold).

    python -m tasks.core.rawfs install   # write the .pth into this interpreter's site-packages
    python -m tasks.core.rawfs check     # exit 1 unless DVC here skips odd entries and keeps store links
"""
from __future__ import annotations

import errno
import os
import stat
import sys

# Stable reason codes (quarantine.parquet's `reason`); "file" and "dir" are the good kinds.
FILE, DIR = "file", "dir"
BROKEN_SYMLINK = "broken_symlink"
SYMLINK_LOOP = "symlink_loop"
NOT_A_FILE = "not_a_file"        # a FIFO, a socket, a device
NAME_NOT_UTF8 = "name_not_utf8"
VANISHED = "vanished"            # listed, then gone before it was read
UNREADABLE = "unreadable"

PTH_NAME = "niche-rawfs.pth"
_MARK = "__niche_rawfs__"        # set on the patched walk and on the import hook
_TARGET = "dvc_objects.fs.local"


class Unusable(Exception):
    """An entry that is not a readable regular file; `code` is a reason code above."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail = code, detail


def utf8(name: str) -> bool:
    """False for a name holding bytes that are not UTF-8 (surrogate escapes from os.fsdecode)."""
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def display(path: str | os.PathLike) -> str:
    """A path as text that can be stored and printed: bytes that are not UTF-8 as \\xNN."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _kind_of(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return f"not a regular file (mode {stat.filemode(mode)})"


def classify(path: str | os.PathLike) -> tuple[str, str]:
    """(FILE or DIR, "") for a readable regular file or a folder (symlinks followed);
    otherwise (reason code, what a person reads). Never opens anything, never raises."""
    p = os.fspath(path)
    if not utf8(os.path.basename(p)):
        return NAME_NOT_UTF8, "the name is not valid UTF-8 (its bytes shown as \\xNN); rename it"
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return VANISHED, "listed, then gone before it could be read"
    except OSError as e:
        return UNREADABLE, f"cannot stat it: {e.strerror}"
    via = ""
    if stat.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(p)
        except OSError:
            target = "?"
        via = f"symlink to {display(target)}: "
        try:
            st = os.stat(p)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return SYMLINK_LOOP, f"{via}a loop of symlinks that never reaches a file"
            if e.errno in (errno.ENOENT, errno.ENOTDIR):
                if not os.path.lexists(p):
                    return VANISHED, "listed, then gone before it could be read"
                return BROKEN_SYMLINK, f"{via}the target does not exist"
            return UNREADABLE, f"{via}cannot stat the target: {e.strerror}"
    if stat.S_ISDIR(st.st_mode):
        return DIR, ""
    if not stat.S_ISREG(st.st_mode):
        return NOT_A_FILE, f"{via}{_kind_of(st.st_mode)}, not a file"
    if not os.access(p, os.R_OK):
        return UNREADABLE, f"{via}no permission to read it"
    return FILE, ""


def open_regular(path: str | os.PathLike):
    """Open a regular file for reading, or raise Unusable. Never blocks: the file is
    opened non-blocking and checked with fstat, so an entry swapped for a FIFO after
    it was listed is refused instead of waited on."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        code, detail = classify(path)  # a dangling link or really gone
        raise Unusable(code if code not in (FILE, DIR) else VANISHED,
                       detail or "listed, then gone before it could be read") from None
    except OSError as e:
        code, detail = classify(path)
        if code in (FILE, DIR):
            code, detail = UNREADABLE, f"cannot open it: {e.strerror}"
        raise Unusable(code, detail) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Unusable(NOT_A_FILE, f"{_kind_of(st.st_mode)}, not a file")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --- DVC ------------------------------------------------------------------------------------

def _plain_files(folder: str) -> set[str] | None:
    """Names the listing itself says are regular files, not links (d_type: no stat each), or None."""
    try:
        with os.scandir(folder) as it:
            return {e.name for e in it if e.is_file(follow_symlinks=False)}
    except OSError:
        return None


def _usable(folder: str, name: str, plain: set[str]) -> bool:
    """classify(...) == FILE, at one access(2) for the common case (70,000 images: 140,000 files
    DVC walks whenever data/raw changed): a plain regular file needs only a UTF-8 name and read
    permission; anything else goes through the whole rule."""
    path = os.path.join(folder, name)
    if name in plain:
        return utf8(name) and os.access(path, os.R_OK)
    return classify(path)[0] == FILE


def _wrap_walk(orig):
    def walk(self, path, maxdepth=None, topdown=True, detail=False, **kwargs):
        for root, dirs, files in orig(self, path, maxdepth=maxdepth, topdown=topdown, detail=False, **kwargs):
            # In place: os.walk prunes by the very list it yielded.
            dirs[:] = [d for d in dirs if utf8(d)]
            files[:] = [f for f in files if _usable(root, f, plain)] if (plain := _plain_files(root)) is not None \
                else [f for f in files if classify(os.path.join(root, f))[0] == FILE]
            if not detail:
                yield root, dirs, files
                continue
            dirs_dict = {n: self.info(os.path.join(root, n)) for n in dirs}
            files_dict = {n: self.info(os.path.join(root, n)) for n in files}
            yield root, dirs_dict, files_dict
            dirs[:] = list(dirs_dict)

    walk.__doc__ = (orig.__doc__ or "") + "\n(niche: entries that are not readable regular files are skipped)"
    walk.__wrapped__ = orig
    setattr(walk, _MARK, True)
    return walk


def _patch(module) -> None:
    cls = module.FsspecLocalFileSystem
    if not getattr(cls.walk, _MARK, False):
        cls.walk = _wrap_walk(cls.walk)


def install() -> None:
    """Patch DVC's local walk in this process now (idempotent)."""
    import dvc_objects.fs.local as local

    _patch(local)


def active() -> bool:
    """True when DVC in this process skips odd entries (patched, or armed to be)."""
    mod = sys.modules.get(_TARGET)
    if mod is not None:
        return getattr(mod.FsspecLocalFileSystem.walk, _MARK, False)
    return _hooks().armed(_MARK)


def _hooks():
    """tasks/core/importhook.py, loaded by path (this file may be, too: see importhook's docstring)."""
    import importlib.util

    name = "_niche_importhook"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(
            os.path.realpath(__file__)), "importhook.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def arm() -> None:
    """Patch DVC's walk when DVC imports it (what the .pth calls at start-up)."""
    _hooks().arm(_TARGET, _patch, _MARK)


def pth_line() -> str:
    src = os.path.realpath(__file__)
    return ("import importlib.util as u; s = u.spec_from_file_location('_niche_rawfs', " + repr(src)
            + "); m = u.module_from_spec(s); s.loader.exec_module(m); m.arm()\n")


def write_pth(site_dir: str | None = None) -> str:
    import sysconfig

    from tasks.core import dirstat, storelinks  # (not at the top: this file is loaded by path at start-up)

    site_dir = site_dir or sysconfig.get_paths()["purelib"]
    path = os.path.join(site_dir, PTH_NAME)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("# Written by `python -m tasks.core.rawfs install` (make venv): DVC skips entries\n"
                "# that are not readable regular files (FIFOs, sockets, dangling links...). See that module.\n")
        f.write(pth_line())
        f.write("# ...and leaves Niche's stores linked to its cache when their stage re-runs: tasks/core/storelinks.py.\n")
        f.write(storelinks.pth_line())
        f.write("# ...and does not re-hash a folder dependency that did not change: tasks/core/dirstat.py.\n")
        f.write(dirstat.pth_line())
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("install", "check"))
    args = ap.parse_args(argv)
    if args.action == "install":
        print(f"wrote {write_pth()}")
        return
    install_hint = f"run `make venv` or `{sys.executable} -m tasks.core.rawfs install`"
    if not active():
        sys.exit(f"DVC in {sys.prefix} would stop on odd entries in data/raw (no {PTH_NAME}): {install_hint}")
    from tasks.core import dirstat, storelinks

    for why in (storelinks.problem(), dirstat.problem()):
        if why is not None:
            sys.exit(why)
    print(f"ok: DVC in {sys.prefix} skips entries that are not readable regular files")
    print(f"ok: DVC in {sys.prefix} leaves stores ({storelinks.MARKER}) linked to the cache when their stage re-runs")
    print(f"ok: DVC in {sys.prefix} does not re-hash a folder dependency that did not change ({dirstat.CACHE_NAME})")


if __name__ == "__main__":
    main()

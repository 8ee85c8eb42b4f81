"""A DVC that does not re-hash a folder dependency which has not changed since it last hashed it.

Why this exists. Before `dvc status` or `dvc repro` decides whether a stage is stale, DVC
3.67 rebuilds the hash of every folder the stage depends on (`Dependency.workspace_status`
→ `changed_checksum` → `get_hash` → `_get_hash_meta` → `_build`); a `dvc repro` that runs the
stage builds it again for the run cache (dvc/stage/cache.py: `_can_hash`, `deps_cached`),
after the run (`Output.save`) and for the run cache's entry: ten builds of the same folder in
one `dvc repro`. DVC finds each file's md5 in its state database, but it walks, stats and
looks up file by file: 6 to 8 s a build for data/raw at 70,000 images (140,000 files with the
`.txt`/`.tags` sidecars), paid by every `dvc status` and every no-op `dvc repro` (about
50 s for a `dvc repro` after adding 10 images).

The design: a fingerprint of the folder, and a cache that maps it to what DVC computed.

- The fingerprint is one `os.scandir` walk (no per-file lookups) of what DVC would hash:
  for every file, (relative path, st_size, st_mtime_ns, st_ctime_ns, st_ino, st_mode); for
  every folder, its relative path and the `.dvcignore` rules that apply in it. Folders are
  pruned with DVC's own ignore object, the way DVC's walk prunes them
  (`DvcIgnoreFilter._get_trie_pattern` and the pattern's own filter, per folder, not per
  file), so data/raw/.curate/ (dvcignored, written by the curation page) is never listed.
  Files are not matched one by one (that costs as much as the walk itself): every file of
  a folder DVC walks is in the fingerprint, ignored or not, and the rules in force are
  part of it, so a change of a rule is a miss. The key also holds the hash name, DVC's,
  dvc-data's, dvc-objects' and pathspec's versions, the folder's absolute path and device,
  and the user and groups (what decides which files rawfs lets DVC read).
- The cache is `.dvc/tmp/niche-dirstat.json`: per dependency path, the last fingerprint and
  the (Meta, HashInfo) DVC computed for it. It is written atomically (a temporary file and
  `os.replace`); a missing, corrupt or foreign cache is a miss, never an error.
- `Dependency._build` (the one call `_get_hash_meta`, so `get_hash`, and `save` make to hash
  a dependency) is wrapped, on `Dependency`, so `Output._build` stays DVC's own for outputs. For a dependency that is a local folder (`fs.protocol ==
  "local"`, not version-aware, md5, the exact call DVC makes for a dependency: a dry run
  with the repo's ignore object) it fingerprints the folder; on a hit it returns DVC's
  earlier result without DVC's walk; on a miss it calls DVC's own code and records the
  result, but only when a second fingerprint taken after DVC's walk is the same as the first
  (nothing changed while DVC read the folder). `Dependency.save` is wrapped too: after a
  hit the dependency holds meta and hash_info as DVC would, and `obj` is None, which is
  what a dependency read from dvc.lock holds (`get_obj()` resolves it if anything asks;
  nothing in status, repro, commit or the run cache does for a dependency). Outputs, files,
  params and remote or repo dependencies are untouched.
- Anything in the tree but regular files and folders (a symlink, a FIFO, a socket, a device),
  a name that is not UTF-8, a file that the mode bits say we cannot read, a folder we
  cannot list, a `.dvcignore` inside the folder: no fingerprint, DVC's own code (and
  tasks/core/rawfs.py's walk, which handles those entries) hashes it, every time. DirEntry's
  d_type tells files, folders and the rest apart without an extra syscall.

Why a hit is DVC's result. A file's md5 in DVC's state database is keyed by (inode, mtime,
size); the fingerprint holds those and more (ctime, mode) for every file DVC reads (and
possibly a few ignored ones), plus the rules that decide which files DVC reads and the
user that decides which it can. Equal fingerprints mean DVC would find the same files with
the same state keys and compute the same tree. The one hole is the one DVC's state database
has too: a file rewritten with the same size within one tick of the file system's clock
after it was listed keeps its stat.

Long on purpose: a cache hit must be exactly DVC's own result, and every case that can make it
differ (ignore rules, odd entries, permissions, a folder changing while DVC reads it) is
handled here, in one place a reader can check.

`NICHE_DIRSTAT=0` in the environment turns the fast path off (DVC's own code for every
folder, nothing read or written in the cache): what the tests compare against.

Armed like rawfs and storelinks (tasks/core/importhook.py): `python -m tasks.core.rawfs
install` (`make venv`) writes a line of the venv's `.pth` for each; the line loads this file by
path and arms an import hook, and `dvc.dependency.base` is patched when DVC imports it (not
`dvc.output`, which storelinks hooks: importhook patches a module through the first hook
that finds it, so two hooks must not share a module). This file imports nothing but the
standard library at module level. `python -m tasks.core.rawfs
check` fails when this patch is missing, and so does:

    python -m tasks.core.dirstat check   # exit 1 unless DVC here skips re-hashing unchanged folder deps

`dvc status -v` shows a `dirstat hit`, `dirstat miss` or `dirstat fallback` line per folder.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import sys
import time

CACHE_NAME = "niche-dirstat.json"   # in the repo's .dvc/tmp/
ENV = "NICHE_DIRSTAT"               # "0" (or false/no/off): DVC's own code for every folder
_SCHEMA = 1                         # of the cache file and of the fingerprint
_MAX_ENTRIES = 256                  # dependency paths kept in the cache (the oldest go first)
_META_FIELDS = {"isdir", "size", "nfiles"}  # what DVC's Meta of a built tree holds
_MARK = "__niche_dirstat__"         # set on the patched methods and on the import hook
_TARGET = "dvc.dependency.base"
log = logging.getLogger("dvc.niche.dirstat")  # under "dvc": `dvc -v` shows it


class Odd(Exception):
    """The folder holds something the fast walk does not vouch for: DVC's own code hashes it."""


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _pattern_key(pattern) -> str:
    """The rules a DvcIgnorePatterns applies: its folder and its pattern lines."""
    return json.dumps([pattern.dirname, pattern.sep, [p.patterns for p in pattern.pattern_list]])


def fingerprint(top: str, ignore=None, header: str = "") -> tuple[str, int]:
    """(digest, number of files) of the folder `top` as DVC would walk it with `ignore`
    (DVC's DvcIgnoreFilter, or None). Raises Odd for a tree DVC's own code must hash."""
    uid = os.getuid()
    gids = set(os.getgroups())
    gids.add(os.getgid())
    try:
        root = os.stat(top)
    except OSError as e:
        raise Odd(f"cannot stat it: {e.strerror}") from None
    if not stat.S_ISDIR(root.st_mode):
        raise Odd("not a folder")
    get_pattern = None
    if ignore is not None:
        get_pattern = getattr(ignore, "_get_trie_pattern", None)
        if get_pattern is None:
            raise Odd(f"an ignore object this file does not know ({type(ignore).__name__})")
    h = hashlib.blake2b(digest_size=32)
    # Every token is followed by \0, which no name holds; a record's first token says how
    # many follow ("F": 6, "D": 2), so no two trees give the same byte string.
    h.update(f"{_SCHEMA}\0{header}\0{uid}\0{sorted(gids)}\0{root.st_dev}\0".encode())
    pattern_keys: dict[int, str] = {}
    nfiles = 0
    stack = [(os.path.normpath(top), "")]
    while stack:
        folder, rel = stack.pop()
        dirs: list[str] = []
        files = []
        try:
            with os.scandir(folder) as it:
                for e in it:
                    name = e.name
                    if not name.isascii() and not _utf8(name):
                        raise Odd(f"a name that is not UTF-8 in {folder!r}")
                    if e.is_file(follow_symlinks=False):  # d_type: no syscall
                        files.append((name, e))
                    elif e.is_dir(follow_symlinks=False):
                        dirs.append(name)
                    else:
                        raise Odd(f"{os.path.join(folder, name)!r} is neither a regular file nor a folder")
        except OSError as err:
            raise Odd(f"cannot list {folder!r}: {err.strerror}") from None
        files.sort()
        if any(name == ".dvcignore" for name, _ in files):
            raise Odd(f"a .dvcignore in {folder!r} (DVC refuses it in a folder it hashes)")
        pkey = ""
        if get_pattern is not None:
            # What DvcIgnoreFilter.__call__ does for each folder DVC's walk yields.
            pattern = get_pattern(folder, dnames=dirs, ignore_subrepos=True)
            if pattern:
                dirs, _ = pattern(folder, dirs, [])
                pkey = pattern_keys.get(id(pattern)) or pattern_keys.setdefault(id(pattern), _pattern_key(pattern))
        out = [f"D\0{rel}\0{pkey}\0"]
        for name, e in files:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError as err:
                raise Odd(f"cannot stat {os.path.join(folder, name)!r}: {err.strerror}") from None
            mode = st.st_mode
            if not stat.S_ISREG(mode):
                raise Odd(f"{os.path.join(folder, name)!r} changed kind while listed")
            if uid != 0 and not mode & (stat.S_IRUSR if st.st_uid == uid else
                                        stat.S_IRGRP if st.st_gid in gids else stat.S_IROTH):
                raise Odd(f"{os.path.join(folder, name)!r} is not readable")
            out.append(f"F\0{rel}{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0{mode}\0")
        nfiles += len(files)
        h.update("".join(out).encode("utf-8"))
        for name in sorted(dirs, reverse=True):
            stack.append((folder + os.sep + name, f"{rel}{name}/"))
    return h.hexdigest(), nfiles


# --- the cache ------------------------------------------------------------------------------

def _load(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("schema") != _SCHEMA or not isinstance(data.get("deps"), dict):
        return {}
    return data["deps"]


def _lookup(path: str, dep: str, key: str):
    """(meta dict, [hash name, value]) recorded for `dep` under `key`, or None."""
    entry = _load(path).get(dep)
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    meta, hi = entry.get("meta"), entry.get("hash")
    if not (isinstance(meta, dict) and meta.get("isdir") is True and set(meta) <= _META_FIELDS
            and all(type(v) in (int, bool) for v in meta.values())):
        return None
    if not (isinstance(hi, list) and len(hi) == 2 and all(isinstance(x, str) for x in hi) and hi[1].endswith(".dir")):
        return None
    return meta, hi


def _record(path: str, dep: str, key: str, meta: dict, hi: list) -> None:
    deps = _load(path)
    deps.pop(dep, None)
    deps[dep] = {"key": key, "meta": meta, "hash": hi}
    while len(deps) > _MAX_ENTRIES:
        deps.pop(next(iter(deps)))
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"schema": _SCHEMA, "deps": deps}, f)
        os.replace(tmp, path)
    except OSError as e:
        log.debug("dirstat: cannot write %s: %s", path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass


# --- DVC ------------------------------------------------------------------------------------

_header: str | None = None


def _versions() -> str:
    global _header
    if _header is None:
        from importlib.metadata import PackageNotFoundError, version

        parts = []
        for dist in ("dvc", "dvc-data", "dvc-objects", "pathspec"):
            try:
                parts.append(f"{dist}={version(dist)}")
            except PackageNotFoundError:
                parts.append(f"{dist}=?")
        _header = " ".join(parts)
    return _header


_recalled_cls = None


def _recalled(path, fs, hash_info):
    """What `_build` returns as the object on a hit: a HashFile with DVC's earlier hash that
    the wrapped `save` knows to drop (a hit never builds the Tree)."""
    global _recalled_cls
    if _recalled_cls is None:
        from dvc_data.hashfile.obj import HashFile

        _recalled_cls = type("RecalledHashFile", (HashFile,), {"__slots__": (), _MARK: True})
    return _recalled_cls(path, fs, hash_info)


def _plan(self, args, kwargs):
    """(folder, ignore, cache file) when this `_build` call may take the fast path, else None."""
    if not enabled() or not getattr(self, "IS_DEPENDENCY", False) or len(args) != 4:
        return None
    _odb, path, fs, name = args
    if set(kwargs) - {"ignore", "dry_run", "no_progress_bar"} or kwargs.get("dry_run") is not True:
        return None
    if name != "md5" or getattr(self, "hash_name", None) != "md5" or fs is not getattr(self, "fs", None):
        return None
    if path != getattr(self, "fs_path", None) or getattr(fs, "protocol", None) != "local":
        return None
    if getattr(fs, "version_aware", False):
        return None
    from dvc_objects.fs.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem) or not isinstance(path, str) or not os.path.isabs(path):
        return None
    tmp_dir = getattr(getattr(self, "repo", None), "tmp_dir", None)
    if not tmp_dir:
        return None
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return None
    except OSError:
        return None
    return path, kwargs.get("ignore"), os.path.join(tmp_dir, CACHE_NAME)


def _wrap_build(orig):
    def _build(self, *args, **kwargs):
        try:
            plan = _plan(self, args, kwargs)
        except Exception as e:  # the shortcut must never be what breaks DVC
            log.debug("dirstat: not for '%s' (%s: %s)", self, type(e).__name__, e)
            plan = None
        if plan is None:
            return orig(self, *args, **kwargs)
        path, ignore, cache = plan
        try:
            header = f"md5\0{_versions()}\0{path}"
            t0 = time.perf_counter()
            key, n = fingerprint(path, ignore, header)
            took = time.perf_counter() - t0
            found = _lookup(cache, path, key)
            if found is not None:
                from dvc_data.hashfile.hash_info import HashInfo
                from dvc_data.hashfile.meta import Meta

                meta_d, (hname, value) = found
                hit = None, Meta.from_dict(meta_d), _recalled(path, args[2], HashInfo(hname, value))
        except Exception as e:  # Odd, or anything unexpected: DVC's own code, as without this file
            why = str(e) if isinstance(e, Odd) else f"{type(e).__name__}: {e}"
            log.debug("dirstat fallback: DVC's own walk hashes '%s': %s", self, why)
            return orig(self, *args, **kwargs)
        if found is not None:
            log.debug("dirstat hit: '%s' (%d files listed in %.2f s) is as DVC last hashed it: %s",
                      self, n, took, value)
            return hit
        log.debug("dirstat miss: '%s' (%d files listed in %.2f s) changed or was never hashed: "
                  "DVC's own walk hashes it", self, n, took)
        staging, meta, obj = orig(self, *args, **kwargs)
        try:
            _remember(self, path, ignore, header, key, cache, meta, obj)
        except Exception as e:
            log.debug("dirstat: '%s' not recorded (%s: %s)", self, type(e).__name__, e)
        return staging, meta, obj

    _build.__doc__ = (orig.__doc__ or "") + "\n(niche: an unchanged local folder dependency is not re-hashed)"
    _build.__wrapped__ = orig
    setattr(_build, _MARK, True)
    return _build


def _remember(self, path, ignore, header, key, cache, meta, obj) -> None:
    from dvc_data.hashfile.meta import Meta

    hi = getattr(obj, "hash_info", None)
    if hi is None or not hi.value or hi.name != "md5" or not hi.isdir or not meta.isdir:
        return
    meta_d = meta.to_dict()
    if set(meta_d) - _META_FIELDS or Meta.from_dict(meta_d) != meta:  # a field the cache would lose
        return
    try:
        again, _ = fingerprint(path, ignore, header)
    except Odd:
        again = None
    if again != key:
        log.debug("dirstat: '%s' changed while DVC hashed it: not recorded", self)
        return
    _record(cache, path, key, meta_d, [hi.name, hi.value])


def _wrap_save(orig):
    def save(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        if getattr(self.obj, _MARK, False):
            self.obj = None  # as read from dvc.lock: the hit built no Tree
        return result

    save.__doc__ = (orig.__doc__ or "") + "\n(niche: after a dirstat hit, obj is None as for a dep read from dvc.lock)"
    save.__wrapped__ = orig
    setattr(save, _MARK, True)
    return save


def _patch(module) -> None:
    cls = module.Dependency
    if not getattr(cls._build, _MARK, False):
        cls._build = _wrap_build(cls._build)
    if not getattr(cls.save, _MARK, False):
        cls.save = _wrap_save(cls.save)


def install() -> None:
    """Patch DVC's Dependency in this process now (idempotent)."""
    import dvc.dependency.base as base

    _patch(base)


def active() -> bool:
    """True when DVC in this process skips re-hashing unchanged folder deps (patched, or armed to be)."""
    mod = sys.modules.get(_TARGET)
    if mod is not None and hasattr(mod, "Dependency"):
        cls = mod.Dependency
        return getattr(cls._build, _MARK, False) and getattr(cls.save, _MARK, False)
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
    """Patch DVC's Dependency when DVC imports it (what the .pth calls at start-up)."""
    _hooks().arm(_TARGET, _patch, _MARK)


def pth_line() -> str:
    """The line of the venv's .pth that arms this file (written by `rawfs install`)."""
    src = os.path.realpath(__file__)
    return ("import importlib.util as u; s = u.spec_from_file_location('_niche_dirstat', " + repr(src)
            + "); m = u.module_from_spec(s); s.loader.exec_module(m); m.arm()\n")


def problem() -> str | None:
    """What `check` reports, or None when DVC here skips re-hashing unchanged folder deps."""
    if active():
        return None
    return (f"DVC in {sys.prefix} re-hashes every folder dependency on each `dvc status` "
            f"(Dependency._build is not patched): run `make venv` or `{sys.executable} -m tasks.core.rawfs install`")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("check",))
    ap.parse_args(argv)
    if (why := problem()) is not None:
        sys.exit(why)
    print(f"ok: DVC in {sys.prefix} does not re-hash a folder dependency that did not change ({CACHE_NAME})")


if __name__ == "__main__":
    main()

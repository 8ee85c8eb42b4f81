"""A DVC that leaves Niche's per-sample stores linked to its cache when their stage re-runs.

Why this exists. With `cache.type = hardlink` (.dvc/config, flows/scaffold.py) every file
of a store (data/derived/<stage>, a `persist: true` out) *is* its cache object. Before a
stage with a persisted out re-runs, DVC 3.67 "unprotects" that out
(`Stage.remove_outs` → `Output.unprotect` → `LocalHashFileDB.unprotect` in dvc_data): it
copies every linked file to a private file, so that a command writing *into* a file cannot
damage the cache, and after the run `Output.commit` links them back. For a store that copy
is pure cost — at 70,000 images the whole store (hundreds of GB) is copied before every
re-run and the disk peaks at about 1.4x (bench/bench_cache.py) — because a store is never
written into: `tasks/core/store.py` writes each item to a new temporary file and
`os.replace`s it over its key, and removes only files (stale temporaries) it owns.

The design: the Store says so on disk. Before its first write a `Store` puts a marker file,
`.niche-store` (`tasks.core.store.STORE_MARKER`; its text says what it means), at its root.
`dvc.output.Output.unprotect` is wrapped: for a local directory out holding that marker it
logs at debug level (`dvc repro -v` shows it) and returns; every other out — a file, a
folder without the marker (a training run's checkpoints, a store written before this
change until its stage writes again), a remote out — gets DVC's own unprotect. The
marker is an ordinary tracked file: it enters the store's directory hash once, when the
store is first written after this change (a run that changes the hash anyway).
Left read-only and linked, a store's files stay exactly what DVC cached, and the commit
after the run finds them already linked (same inode, nothing copied or re-hashed).

The skip applies wherever DVC calls `Output.unprotect` for such an out: a re-run
(`dvc repro`, the flows' `Repo(...).reproduce`), and `dvc remove <stage>` / `dvc destroy`,
which then leave the store's files as they are (read-only, still linked to the cache
objects; a store replaces files, so both are harmless). `dvc unprotect <path>`, a
person's explicit request, does not go through `Output.unprotect` and still copies.

Why a sibling of tasks/core/rawfs.py and not part of it: rawfs is about what a raw folder
may hold (ingest and DVC's walk share its `classify`); this is about the cache links of the
stores, a different rule with a different reader. Both patch DVC the same way and are armed
by the same `.pth` (`python -m tasks.core.rawfs install` writes one line for each; `make
venv` runs it), and `python -m tasks.core.rawfs check` fails when either is missing. Like
rawfs this file is loaded by path at start-up, so it imports nothing but the standard
library, and it only arms an import hook: `dvc.output` is patched when DVC imports it.

    python -m tasks.core.storelinks check   # exit 1 unless DVC here skips unprotecting stores
"""
from __future__ import annotations

import logging
import os
import sys

MARKER = ".niche-store"          # = tasks.core.store.STORE_MARKER (tests/test_rawfs.py checks)
_MARK = "__niche_storelinks__"   # set on the patched unprotect and on the import hook
_TARGET = "dvc.output"
log = logging.getLogger("dvc.niche.storelinks")  # under "dvc": `dvc -v` shows it


def is_store(path: str) -> bool:
    """True for a folder that a Niche Store marked as write-once."""
    return os.path.isfile(os.path.join(path, MARKER))


def _wrap_unprotect(orig):
    def unprotect(self):
        fs_path = getattr(self, "fs_path", None)
        local = getattr(getattr(self, "fs", None), "protocol", None) == "local"
        if local and fs_path and self.use_cache and is_store(fs_path):
            log.debug("Not unprotecting '%s': it holds %s (a Niche store: files are replaced, "
                      "never written into), so its files stay linked to the cache", self, MARKER)
            return None
        return orig(self)

    unprotect.__doc__ = (orig.__doc__ or "") + f"\n(niche: skipped for a folder holding {MARKER})"
    unprotect.__wrapped__ = orig
    setattr(unprotect, _MARK, True)
    return unprotect


def _patch(module) -> None:
    cls = module.Output
    if not getattr(cls.unprotect, _MARK, False):
        cls.unprotect = _wrap_unprotect(cls.unprotect)


def install() -> None:
    """Patch DVC's Output.unprotect in this process now (idempotent)."""
    import dvc.output as output

    _patch(output)


def active() -> bool:
    """True when DVC in this process leaves stores linked (patched, or armed to be)."""
    mod = sys.modules.get(_TARGET)
    if mod is not None and hasattr(mod, "Output"):
        return getattr(mod.Output.unprotect, _MARK, False)
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
    """Patch DVC's Output.unprotect when DVC imports it (what the .pth calls at start-up)."""
    _hooks().arm(_TARGET, _patch, _MARK)


def pth_line() -> str:
    """The line of the venv's .pth that arms this file (written by `rawfs install`)."""
    src = os.path.realpath(__file__)
    return ("import importlib.util as u; s = u.spec_from_file_location('_niche_storelinks', " + repr(src)
            + "); m = u.module_from_spec(s); s.loader.exec_module(m); m.arm()\n")


def problem() -> str | None:
    """What `check` reports, or None when DVC here leaves stores linked."""
    if active():
        return None
    return (f"DVC in {sys.prefix} copies every file of a store before its stage re-runs (Output.unprotect "
            f"is not patched): run `make venv` or `{sys.executable} -m tasks.core.rawfs install`")


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=("check",))
    ap.parse_args(argv)
    if (why := problem()) is not None:
        sys.exit(why)
    print(f"ok: DVC in {sys.prefix} leaves stores ({MARKER}) linked to the cache when their stage re-runs")


if __name__ == "__main__":
    main()

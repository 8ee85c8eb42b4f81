"""Patch a module of another package at the moment it is imported, importing nothing earlier.

What rawfs (DVC's local walk) and storelinks (DVC's unprotect) arm from the venv's `.pth` at
start-up: a finder at the front of `sys.meta_path` that, for one module name, asks the other
finders for the spec and wraps its loader so that `patch(module)` runs right after the module
executes. Standard library only, and loaded by path (`load()`), like those two: a start-up hook
must not import the `tasks` package (a scaffolded repo's own `tasks/` must win for
`python -m tasks.x`).
"""
from __future__ import annotations

import sys
from typing import Callable

HOOK = "__niche_import_hook__"  # on every finder made here, whichever copy of this file made it


class _PatchingLoader:
    def __init__(self, loader, patch: Callable):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_data, is_package... as the real loader
        return getattr(self._loader, name)


class PatchOnImport:
    """Finds `target` through the other finders and patches it once executed."""

    def __init__(self, target: str, patch: Callable, mark: str):
        self.target, self.patch = target, patch
        setattr(self, HOOK, True)
        setattr(self, mark, True)  # the arming module's own mark: its `active()` looks for it

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.target:
            return None
        for finder in sys.meta_path:
            if getattr(finder, HOOK, False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _PatchingLoader(spec.loader, self.patch)
        return spec


def arm(target: str, patch: Callable, mark: str) -> None:
    """Patch `target` now if it is imported already, else when it is (once per mark)."""
    if target in sys.modules:
        patch(sys.modules[target])
    elif not any(getattr(f, mark, False) for f in sys.meta_path):
        sys.meta_path.insert(0, PatchOnImport(target, patch, mark))


def armed(mark: str) -> bool:
    return any(getattr(f, mark, False) for f in sys.meta_path)

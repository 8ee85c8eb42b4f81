"""Find a model's files: a local folder, or a Hugging Face hub id already cached.

Nothing is downloaded unless the user says so (NICHE_ALLOW_DOWNLOAD=1): a
missing model is an error that names the parameter, the model, and how to get
it. The resolved revision (the hub commit, or a fingerprint of a local folder)
goes into every item key, so new weights mean new items.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("niche.models")

ALLOW_DOWNLOAD_ENV = "NICHE_ALLOW_DOWNLOAD"
TINY_MARKER = "NICHE_TINY_RANDOM_WEIGHTS.txt"  # written into every tiny model folder
# Files up to this size are hashed whole; larger ones (weights) by name, size and
# mtime — hashing 50 GB of weights on every run would cost minutes, and a copy
# or an edit changes the mtime, which errs on the side of recomputing.
_HASH_WHOLE = 64 << 20


class SetupError(RuntimeError):
    """Something a person fixes in the setup (a missing model, an unreachable
    server, no GPU): the stage stops with the message alone, no traceback."""


class ModelMissing(SetupError):
    """The configured model is not on this machine."""


@dataclass(frozen=True)
class ResolvedModel:
    id: str  # as configured
    path: Path  # a folder (or, for single-file models like ONNX, the file)
    revision: str  # hub commit hash, or "local-<fingerprint>"
    tiny: bool  # random weights, built by models.tiny: outputs mean nothing

    def key(self) -> str:
        """What goes into item keys."""
        return f"{self.id}@{self.revision}"


def fingerprint(path: Path) -> str:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.name if f == path else f.relative_to(path).as_posix()
        h.update(f"{rel}\0{st.st_size}\0".encode())
        if st.st_size <= _HASH_WHOLE:
            h.update(hashlib.sha256(f.read_bytes()).digest())
        else:
            h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def _is_tiny(path: Path) -> bool:
    folder = path if path.is_dir() else path.parent
    return (folder / TINY_MARKER).is_file()


# Once per model and process: validation and sweeps resolve the text encoder for every prompt.
_WARNED_TINY: set[tuple[str, str]] = set()


def resolve(model: str, param: str, revision: str | None = None,
            allow_patterns: list[str] | None = None) -> ResolvedModel:
    """`model` is a local path (file or folder) or a hub repo id.

    `param` is the params key that named it (e.g. "embed_text.model"), for errors.
    """
    local = Path(model).expanduser()
    if local.exists():
        r = ResolvedModel(model, local, f"local-{fingerprint(local)}", _is_tiny(local))
        if r.tiny and (param, model) not in _WARNED_TINY:
            _WARNED_TINY.add((param, model))
            log.warning("%s = %s: a TINY model with RANDOM weights (tiny profile); "
                        "its outputs are meaningless except for testing the pipeline", param, model)
        return r
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelMissing(f"{param}: {model!r} is neither an existing local path nor a hub id "
                           "like 'org/name'")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(model, revision=revision, local_files_only=True,
                                 allow_patterns=allow_patterns)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        if os.environ.get(ALLOW_DOWNLOAD_ENV) != "1":
            raise ModelMissing(
                f"{param}: model {model!r}{f' (revision {revision})' if revision else ''} is not on "
                f"this machine. Download it once with `hf download {model}` (or run with "
                f"{ALLOW_DOWNLOAD_ENV}=1 to let Niche fetch it), or set {param} to a local folder. "
                "For a CPU-only trial of the pipeline: `python -m tasks.profile tiny`.") from None
        log.info("%s: downloading %s (%s=1)", param, model, ALLOW_DOWNLOAD_ENV)
        path = snapshot_download(model, revision=revision, allow_patterns=allow_patterns)
    return ResolvedModel(model, Path(path), Path(path).name, False)


def resolve_here(r: ResolvedModel, param: str, allow_patterns: list[str] | None = None) -> ResolvedModel:
    """`r` (resolved on the driver) resolved again on this machine — a Ray worker's, which may be
    another host with its own hub cache — refusing anything but the very same weights."""
    import socket

    revision = None if r.revision.startswith("local-") else r.revision
    here = resolve(r.id, param, revision=revision, allow_patterns=allow_patterns)
    if here.key() != r.key():
        raise SetupError(f"{param}: on {socket.gethostname()} {r.id!r} is {here.key()}, but the driver "
                         f"resolved {r.key()}; give every node the same files or revision")
    return here


def mark_tiny(folder: Path, what: str) -> None:
    """Label a folder as a tiny random-weight model, for people and for `resolve`."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TINY_MARKER).write_text(
        f"{what}: a TINY model with RANDOM weights, built locally by `python -m models.tiny`.\n"
        "It exists to run the pipeline on a CPU with no network; its outputs mean nothing.\n")


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str, device: str):
    """'auto' → bf16 on a GPU, fp32 on a CPU; or an explicit 'float32' / 'bfloat16'."""
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]

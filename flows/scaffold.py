"""Create a fresh pipeline repository (git + DVC) from this checkout.

    python -m flows.scaffold ../my-dataset

Copies the stage code and the DVC definitions — what `dvc repro` needs — into a
new folder with its own git and DVC repos, so one checkout of Niche can serve
several datasets. Tests and benchmarks build their throw-away repos with it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CACHE_TYPE = "hardlink"
FILES = ["tasks", "models", "profiles", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore", "data/prompts"]


def scaffold(dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
        else:
            shutil.copy2(src, dst / name)
    dvc = str(Path(sys.executable).parent / "dvc")
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"],
                # Outputs are hardlinks to the cache, not second copies (why only "hardlink":
                # this checkout's .dvc/config). Committed with the repo, so clones link too.
                [dvc, "config", "cache.type", CACHE_TYPE],
                # DVC's state db stays inside the repo, not in a machine-wide folder.
                [dvc, "config", "--local", "core.site_cache_dir", str(dst / ".dvc" / "site")]):
        subprocess.run(cmd, cwd=dst, check=True, capture_output=True)
    return dst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dst", type=Path)
    args = ap.parse_args(argv)
    if args.dst.exists() and any(args.dst.iterdir()):
        sys.exit(f"{args.dst}: exists and is not empty")
    print(f"pipeline repo ready: {scaffold(args.dst)} — put images in data/raw, then `dvc repro`")


if __name__ == "__main__":
    main()

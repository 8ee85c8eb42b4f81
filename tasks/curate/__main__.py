"""Curate candidates and the dataset in a browser; materialise the decision log; the hit rate.

    python -m tasks.curate [serve] [--port 8765] [--host 127.0.0.1] [--set curated]   (make curate)
    python -m tasks.curate materialise     # make data/raw match the log again (idempotent)
    python -m tasks.curate stats           # hit rate per generator / template / word -> metrics/curate.json

The page: candidates (data/manifest/candidates.parquet, from `dvc repro candidates`) and the
dataset (data/raw, with ingest's quarantine reasons), driven from the keyboard (press ? on the
page). A kept candidate goes to data/raw/<set>/ with its caption, a rejected one to
data/raw/rejected/ (the negative LoRA's input); then `dvc repro` takes them in.

`stats` is also written when the server stops. metrics/curate.json is a DVC metric
(`dvc metrics show`): kept, rejected, seen and the hit rate overall; the per-generator,
per-template and per-word figures are in metrics/curate.details.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import yaml

from tasks.core.stage import setup_logging
from tasks.curate.decisions import DecisionLog
from tasks.curate.library import write_stats
from tasks.curate.materialise import MaterialiseError, materialise_all, safe_set

log = logging.getLogger("niche.curate")
DEFAULT_PORT = 8765


def caption_ext(root: Path) -> str:
    """ingest.caption_ext from params.yaml (sidecars must be named as ingest reads them)."""
    try:
        doc = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
        return str((doc.get("ingest") or {}).get("caption_ext") or ".txt")
    except (OSError, yaml.YAMLError):
        return ".txt"


def serve(root: Path, host: str, port: int, dest: str) -> None:
    import uvicorn

    from tasks.curate.server import make_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("curate: serving on %s: anyone who can reach this address can change data/raw", host)
    app = make_app(root, dest, caption_ext(root), hosts=(host,) if host not in ("0.0.0.0", "::") else ("*",))
    print(f"curation page: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/  "
          f"(kept -> data/raw/{dest}/, rejected -> data/raw/rejected/; Ctrl-C stops)", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        stats = write_stats(root)
        o = stats["overall"]
        print(f"hit rate: {o['kept']} kept of {o['seen']} seen"
              + (f" ({o['hit_rate']:.0%})" if o["hit_rate"] is not None else "") + " -> metrics/curate.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.curate", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="serve", choices=("serve", "materialise", "stats"))
    ap.add_argument("--root", default=".", help="the project (default: here)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT)
    ap.add_argument("--set", default="curated", help="kept images go to data/raw/<set>/ (default: curated)")
    args = ap.parse_args(argv)
    setup_logging()
    root = Path(args.root).resolve()
    try:
        dest = safe_set(args.set)
    except MaterialiseError as e:
        sys.exit(f"--set: {e}")
    if args.command == "serve":
        serve(root, args.host, args.port, dest)
    elif args.command == "materialise":
        dlog = DecisionLog.at(root)
        failed = materialise_all(root, dlog, caption_ext(root))
        n = len(dlog.state())
        dlog.close()
        print(f"{n - len(failed)} of {n} decided items match the log" + (f"; {len(failed)} could not:" if failed else ""))
        for item, why in failed.items():
            print(f"  {item}: {why}")
        sys.exit(1 if failed else 0)
    else:
        print(json.dumps(write_stats(root), indent=2))


if __name__ == "__main__":
    main()

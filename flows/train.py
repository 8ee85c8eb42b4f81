"""Flow `train`: bring the dataset up to date, then the `train` DVC stage (NanoDiT).

DVC decides, as everywhere: the dataset stages run only when stale, and train
only when its code, its params section or the shards changed. A stopped or
crashed training resumes from its newest checkpoint on the next run (the
stage's outputs persist; see tasks/train.py). The trainer's log lines reach the
task run; the final metrics are posted as a table artifact and the run's state
(newest checkpoint, sample grid) as a markdown artifact.

    python -m flows.train [--root .] [--skip-dataset]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import dvc_stage
from flows.build_dataset import build_dataset


def run_dir(root: Path) -> Path:
    doc = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    return root / "runs" / (doc.get("train") or {}).get("run", "nanodit")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


@task(task_run_name="train", cache_policy=NO_CACHE, persist_result=False)
def train_stage(root: str) -> dict:
    logger = get_run_logger()
    root_p = Path(root)
    ran = dvc_stage.reproduce("train", root_p, logger)
    run = run_dir(root_p)
    summary = run / "live" / "metrics.json"
    metrics = _flat(json.loads(summary.read_text())) if summary.is_file() else {}
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    grids = sorted((run / "samples").glob("step-*.png"))
    if not ran:
        logger.info("train: up to date according to DVC; nothing to do")
    if metrics:
        create_table_artifact(key="train-metrics", table=[{"metric": k, "value": v} for k, v in metrics.items()],
                              description=f"`train`: the latest logged values of {run.relative_to(root_p)}")
    create_markdown_artifact(
        key="train-run",
        markdown="\n".join([
            f"# train: `{run.relative_to(root_p)}`",
            f"- ran this time: {'yes' if ran else 'no (fresh according to DVC)'}",
            f"- step: {metrics.get('step', '?')}, loss: {metrics.get('train/loss', '?')}",
            f"- newest checkpoint: `{ckpts[-1].relative_to(root_p) if ckpts else 'none'}`",
            f"- newest sample grid: `{grids[-1].relative_to(root_p) if grids else 'none'}`",
            "",
            "Generate: `python -m tasks.generate --checkpoint "
            f"{run.relative_to(root_p)} --prompt \"...\" --out out.png`",
        ]),
        description="The training run's state after this flow run")
    return {"stage": "train", "ran": ran, "metrics": metrics,
            "checkpoint": str(ckpts[-1]) if ckpts else None}


@flow(name="train", log_prints=True)
def train(root: str = ".", skip_dataset: bool = False) -> dict:
    """build-dataset (as a subflow, unless skipped) → train."""
    root = str(Path(root).resolve())
    if not skip_dataset:
        build_dataset(root=root)
    return train_stage(root)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--skip-dataset", action="store_true", help="do not bring the dataset up to date first")
    args = ap.parse_args(argv)
    state = train(root=args.root, skip_dataset=args.skip_dataset, return_state=True)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()

"""Flow `build-dataset`: the dataset stages in DAG order, one task run each.

Each task asks DVC to reproduce its stage; DVC runs it only when it is stale
and records it in dvc.lock, so this flow and `dvc repro` never disagree. The
stage's log lines and its counts (computed / reused / failed) appear on the
task run in the Prefect UI, the counts also as a table artifact.

    python -m flows.build_dataset [--root .] [--report]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import dvc_stage
from flows.dvc_stage import DATASET_STAGES as STAGES
from flows.report import print_report


def _counts_table(metrics: dict) -> list[dict]:
    return [{"metric": k, "value": v} for k, v in metrics.items() if not isinstance(v, dict)]


# Task caching stays off: DVC is the one judge of what is fresh.
@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def run_stage(stage: str, root: str) -> dict:
    logger = get_run_logger()
    ran = dvc_stage.reproduce(stage, Path(root), logger)
    if not ran:
        logger.info("%s: up to date according to DVC; nothing to do", stage)
        return {"stage": stage, "ran": False}
    metrics = dvc_stage.stage_metrics(stage, Path(root))
    if not metrics:  # a `dvc add`-ed source: DVC recorded its new version
        logger.info("%s: new version recorded", stage)
        return {"stage": stage, "ran": True}
    logger.info("%s: %s", stage, ", ".join(f"{k}={v}" for k, v in metrics.items()))
    slug = stage.replace("_", "-")  # artifact keys: lowercase letters, digits, dashes
    create_table_artifact(
        key=f"{slug}-counts",
        table=_counts_table(metrics),
        description=f"`{stage}`: items computed, reused and failed in this run",
    )
    for name, sub in metrics.items():
        if isinstance(sub, dict) and sub:
            create_table_artifact(key=f"{slug}-{name.replace('_', '-')}",
                                  table=[{"key": k, "count": v} for k, v in sub.items()],
                                  description=f"`{stage}`: {name.replace('_', ' ')}")
    return {"stage": stage, "ran": True, "metrics": metrics}


@flow(name="build-dataset", log_prints=True)
def build_dataset(root: str = ".") -> list[dict]:
    """Ingest → bucket → caption → T5 / DINOv3 / DWPose embeddings → shards."""
    root = str(Path(root).resolve())
    # Inputs versioned with `dvc add` (e.g. data/raw.dvc) are brought up to date
    # first, as `dvc repro` does, so that dvc status is clean afterwards.
    sources = sorted(p.relative_to(root).as_posix() for p in Path(root).glob("data/*.dvc"))
    results = [run_stage(stage, root) for stage in (*sources, *STAGES)]
    ran = [r["stage"] for r in results if r["ran"]]
    create_markdown_artifact(
        key="build-dataset-summary",
        markdown="\n".join([
            "# build-dataset",
            f"Repository: `{root}`",
            "",
            "| stage | ran | computed | reused | failed |",
            "|---|---|---|---|---|",
            *(f"| {r['stage']} | {'yes' if r['ran'] else 'no (fresh)'} | "
              f"{r.get('metrics', {}).get('computed', '')} | {r.get('metrics', {}).get('reused', '')} | "
              f"{r.get('metrics', {}).get('failed', '')} |" for r in results),
        ]),
        description="What this run of build-dataset did",
    )
    logger = get_run_logger()
    logger.info("stages run: %s", ", ".join(ran) or "none (all fresh)")
    if ran:
        logger.info("dvc.lock updated; to record this dataset version: git add dvc.lock metrics && git commit")
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--report", action="store_true", help="print what the dataset holds afterwards")
    args = ap.parse_args(argv)
    state = build_dataset(root=args.root, return_state=True)
    if args.report:
        print_report(Path(args.root), state)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()

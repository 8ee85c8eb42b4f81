"""Flows `validate` and `validate-nightly`: the prx-tg suite on a checkpoint, then the
checkpoint sweep and the run's HTML report, with the results as Prefect artifacts.

validate(root, checkpoint=None): no checkpoint → the `validate` DVC stage (the active
run's newest checkpoint; DVC decides whether it is stale). A checkpoint (a path or a
step) → tasks.validate directly, outside DVC: back-testing any checkpoint of any run
with today's validation logic, touching neither training nor dvc.lock.
validate-nightly(root): the newest checkpoint of the active run, skipped when its step
is already in the run's validation history. Served on a cron (flows/serve.py).

Artifacts on the flow run: `validation-metrics` (a table: every check's mean / p50 /
p90) and `validation-summary` (markdown with the grids, alarms, and checks worse than
the run's best by `validate.regress_margin`, also logged as warnings).

    python -m flows.validate [--root .] [--checkpoint PATH|STEP] [--nightly]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
from pathlib import Path

from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import dvc_stage
from tasks import train_state
from tasks.params import load_section
from tasks.validate import ValidateParams, run_dir_of, validate as run_validation

TESTS = ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence")


class _ToPrefect(logging.Handler):
    """The stage's own log lines (logger `niche`) on the task run, when it runs in-process."""

    def __init__(self, logger):
        super().__init__(logging.INFO)
        self.target = logger

    def emit(self, record):
        self.target.log(record.levelno, record.getMessage())


def _params(root: Path) -> ValidateParams:
    return load_section(ValidateParams, "validate", root / "params.yaml")


def _thumb(path: Path, width: int = 512) -> str:
    img = Image.open(path).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


@task(task_run_name="validate", cache_policy=NO_CACHE, persist_result=False)
def validate_task(root: str, checkpoint: str | None, nightly: bool) -> dict:
    logger, root_p = get_run_logger(), Path(root)
    p = _params(root_p)
    run_dir = root_p / "runs" / p.run
    if checkpoint is None and not nightly:
        ran = dvc_stage.reproduce("validate", root_p, logger)
        if not ran:
            logger.info("validate: up to date according to DVC; nothing to do")
        metrics_file = root_p / "metrics" / "validate.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return {"ran": ran, "metrics": metrics, "run_dir": str(run_dir)}
    if nightly:
        newest = train_state.latest(run_dir / "checkpoints")
        if newest is None:
            logger.warning("validate-nightly: %s has no checkpoint yet; nothing to validate", run_dir)
            return {"ran": False, "metrics": {}, "run_dir": str(run_dir), "skipped": "no checkpoint"}
        checkpoint = str(newest)
    handler = _ToPrefect(logger)
    logging.getLogger("niche").addHandler(handler)
    try:
        metrics = run_validation(p, root=root_p, checkpoint=checkpoint, skip_validated=nightly)
    finally:
        logging.getLogger("niche").removeHandler(handler)
    if metrics.get("already_validated"):
        logger.info("validate: step %s of %s is already validated; skipped", metrics.get("step"), run_dir)
        return {"ran": False, "metrics": metrics, "run_dir": str(run_dir), "skipped": "already validated"}
    ckpt = Path(metrics["checkpoint"])  # relative to the repo when inside it
    return {"ran": True, "metrics": metrics, "run_dir": str(run_dir_of(ckpt if ckpt.is_absolute() else root_p / ckpt))}


@task(task_run_name="sweep-and-report", cache_policy=NO_CACHE, persist_result=False)
def sweep_and_report(root: str, run_dir: str) -> dict:
    from tasks.run_report import write_report
    from tasks.sweep import NanoDiTSampler, sweep

    logger, run = get_run_logger(), Path(run_dir)
    p = _params(Path(root))
    out = {}
    if train_state.step_dirs(run / "checkpoints"):
        out["sweep"] = str(sweep(NanoDiTSampler(run, steps=p.steps, guidance=p.guidance, scale=p.scale),
                                 list(p.sweep_prompts), list(p.sweep_seeds), p.sweep_negative or None,
                                 run / "sweep.png"))
        logger.info("sweep: %s", out["sweep"])
    out["report"] = str(write_report(run))
    logger.info("report: %s", out["report"])
    return out


def publish(result: dict, views: dict, margin: float) -> None:
    logger, m = get_run_logger(), result["metrics"]
    tests = m.get("tests", {})
    rows = [{"check": t, **{k: tests[t].get(k) for k in ("n", "mean", "p50", "p90", "max")}}
            for t in TESTS if t in tests]
    label = m.get("lpips", {}).get("label", "LPIPS")
    if rows:
        create_table_artifact(key="validation-metrics", table=rows,
                              description=f"validate: step {m.get('step')} — {label}")
    for line in m.get("flags", []) + m.get("alarms", []):
        logger.warning("validate: %s", line)
    step_dir = Path(result["run_dir"]) / "validation" / f"step-{m.get('step', 0):06d}"
    grids = [f"### {g.stem}\n![{g.stem}]({_thumb(g)})" for g in sorted(step_dir.glob("*.png"))]
    lines = [f"# validate: step {m.get('step', '?')}",
             f"Checkpoint: `{m.get('checkpoint', '?')}` ({m.get('weights', 'ema')} weights), {label}"]
    if m.get("lpips", {}).get("comparable") is False:
        lines.append("\n> **LPIPS on a random backbone: these numbers are NOT comparable** to real LPIPS.")
    lines += ["", "| check | mean | p50 | p90 |", "|---|---|---|---|",
              *(f"| {r['check']} | {r['mean']:.4f} | {r['p50']:.4f} | {r['p90']:.4f} |"
                for r in rows if r.get("mean") is not None)]
    if m.get("flags"):
        lines += ["", f"## ⚠ Worse than the run's best (margin {margin})", *(f"- {f}" for f in m["flags"])]
    if m.get("alarms"):
        lines += ["", "## ⚠ Alarms", *(f"- {a}" for a in m["alarms"])]
    lines += ["", f"Report: `{views.get('report', '-')}`  Sweep: `{views.get('sweep', '-')}`", "", *grids]
    create_markdown_artifact(key="validation-summary", markdown="\n".join(lines),
                             description="The validation of this flow run, with its grids")


def _validate(root: str, checkpoint: str | None, nightly: bool) -> dict:
    root = str(Path(root).resolve())
    result = validate_task(root, checkpoint, nightly)
    if result.get("skipped") or not result["metrics"]:  # nothing new: the sweep and report stand
        return result
    views = sweep_and_report(root, result["run_dir"])
    publish(result, views, _params(Path(root)).regress_margin)
    return {**result, **views}


@flow(name="validate", log_prints=True)
def validate(root: str = ".", checkpoint: str | None = None) -> dict:
    """The newest checkpoint through DVC, or any checkpoint given as a path or a step."""
    return _validate(root, checkpoint, nightly=False)


@flow(name="validate-nightly", log_prints=True)
def validate_nightly(root: str = ".") -> dict:
    """The active run's newest checkpoint, unless already validated."""
    return _validate(root, None, nightly=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--checkpoint", default=None, help="a checkpoint path or step (default: DVC's validate stage)")
    ap.add_argument("--nightly", action="store_true", help="the newest checkpoint unless already validated")
    args = ap.parse_args(argv)
    if args.nightly:
        state = validate_nightly(root=args.root, return_state=True)
    else:
        state = validate(root=args.root, checkpoint=args.checkpoint, return_state=True)
    if state.is_completed():
        result = state.result()
        if result.get("report"):
            print(f"report: {Path(result['report']).resolve()}")
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()

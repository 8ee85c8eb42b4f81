"""Flows `validate` and `validate-nightly`: the prx-tg suite on a checkpoint, then the
checkpoint sweep and the run's HTML report, with the results as Prefect artifacts.

validate(root, checkpoint=None): no checkpoint → the `validate` DVC stage (the active
run's newest checkpoint; DVC decides whether it is stale). A checkpoint (a path or a
step) → tasks.validate directly, outside DVC: back-testing any checkpoint of any run
with today's validation logic, touching neither training nor the stage's metric
(metrics/validate.json). A back-test of the active run adds its step to the stage's
output folder; when nothing else about the stage changed, that is recorded in dvc.lock
(dvc commit), so `dvc status` stays clean.
validate-nightly(root): the newest checkpoint of the active run, skipped when its step
is already in the run's validation history; otherwise through the DVC stage, so that
dvc.lock records it and `dvc status` stays clean. Only when DVC cannot run it (busy:
its lock is held, e.g. training under `dvc repro` / `dvc exp run`), or when it ran
but the step is still not in the history (up to date by DVC's reckoning, or
validate.checkpoint names another checkpoint), is the step validated directly, into
the run's folder and history but not metrics/validate.json, and recorded like a
back-test (or by the next `dvc repro` while DVC is busy). Served on a cron (flows/serve.py).

Artifacts on the flow run, published before the checkpoint sweep and the report (a
failure there is a warning and loses nothing): `validation-metrics` (a table: every
check's n / mean / p50 / p90 / max and the LPIPS label, "not comparable" for a
random backbone) and `validation-summary` (markdown with the grids, alarms, and
checks worse than the run's best by `validate.regress_margin`, also logged as warnings).

    python -m flows.validate [--root .] [--checkpoint PATH|STEP] [--nightly]
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from dvc.lock import LockError
from PIL import Image
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import dvc_stage
from tasks.training import checkpoints as train_state
from tasks.core.params import load_section
from tasks.validate import ValidateParams, read_history, run_dir_of, validate as run_validation

TESTS = ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence")


class _ToPrefect(logging.Handler):
    """The stage's own log lines (logger `niche`) on the task run, when it runs in-process."""

    def __init__(self, logger):
        super().__init__(logging.INFO)
        self.target = logger

    def emit(self, record):
        self.target.log(record.levelno, record.getMessage())


@contextmanager
def _stage_logs(logger):
    """The stage's lines on the task run while it runs in-process. `niche` is set to INFO for
    the while: under Prefect's logging config the root logger is at WARNING, and `niche`
    (level unset) would drop its INFO lines before any handler saw them. It stops propagating
    meanwhile: the run logger's copy reaches the console already, the root's would be a second."""
    niche = logging.getLogger("niche")
    handler, level, propagate = _ToPrefect(logger), niche.level, niche.propagate
    niche.addHandler(handler)
    if not niche.isEnabledFor(logging.INFO):
        niche.setLevel(logging.INFO)
    niche.propagate = False
    try:
        yield
    finally:
        niche.removeHandler(handler)
        niche.setLevel(level)
        niche.propagate = propagate


def _lock_error(exc: BaseException) -> LockError | None:
    """The LockError behind a failed reproduce, if DVC was busy: its repo lock held (raised as
    is), or the checkpoints being written by a stage that `dvc repro` / `dvc exp run` is running
    (its rwlock; DVC wraps that one in a ReproductionError)."""
    for _ in range(10):  # a short chain; bounded in case of a cycle
        if exc is None or isinstance(exc, LockError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _step_metrics(run_dir: Path, step: int) -> dict:
    done = run_dir / "validation" / f"step-{step:06d}" / "metrics.json"
    return json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {"step": step}


def nightly_validation(p: ValidateParams, root: Path, logger) -> dict:
    """validate-nightly's work (the module doc), the flow's result dict; a plain function, so
    that a test can run it while DVC's lock is held."""
    run_dir = root / "runs" / p.run
    found = train_state.step_dirs(run_dir / "checkpoints")
    if not found:
        logger.warning("validate-nightly: %s has no checkpoint yet; nothing to validate", run_dir)
        return {"ran": False, "metrics": {}, "run_dir": str(run_dir), "skipped": "no checkpoint"}
    step, newest = found[-1]

    def validated() -> bool:
        return any(r["step"] == step for r in read_history(run_dir / "validation" / "history.tsv"))

    if validated():
        logger.info("validate: step %d of %s is already validated; skipped", step, run_dir)
        return {"ran": False, "metrics": _step_metrics(run_dir, step), "run_dir": str(run_dir),
                "skipped": "already validated"}
    busy = None
    if p.checkpoint != "latest":
        why = f"the DVC stage validates validate.checkpoint {p.checkpoint}, not the newest checkpoint"
    else:
        try:
            ran = dvc_stage.reproduce("validate", root, logger)
        except Exception as e:
            busy = _lock_error(e)
            if busy is None:
                raise
            why = f"DVC is busy ({str(busy).splitlines()[0]})"
        else:
            if validated():
                logger.info("validate-nightly: step %d validated by the DVC stage; dvc.lock records it", step)
                return {"ran": True, "metrics": _step_metrics(run_dir, step), "run_dir": str(run_dir)}
            why = (f"the DVC stage ran, yet step {step} is not in the history" if ran else
                   f"DVC says the stage is up to date, yet step {step} is not in the history")
    logger.warning("validate-nightly: %s: validating step %d outside DVC, into %s and its history.tsv "
                   "(metrics/validate.json left as it is)", why, step, run_dir / "validation")
    metrics = run_validation(p, root=root, checkpoint=newest)
    if busy is None:  # while training holds DVC, its checkpoints are still changing: nothing to record
        dvc_stage.record_outputs("validate", root, logger)
    else:
        logger.info("validate-nightly: the next `dvc repro` records step %d in dvc.lock", step)
    return {"ran": True, "metrics": metrics, "run_dir": str(run_dir)}


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
        # The stage's whole summary (its DVC metric, metrics/validate.json, is three columns of it).
        metrics_file = root_p / "metrics" / "validate.details.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        return {"ran": ran, "metrics": metrics, "run_dir": str(run_dir)}
    with _stage_logs(logger):
        if nightly:
            return nightly_validation(p, root_p, logger)
        metrics = run_validation(p, root=root_p, checkpoint=checkpoint)  # a back-test: never the DVC metric
    ckpt = Path(metrics["checkpoint"])  # relative to the repo when inside it
    of_run = run_dir_of(ckpt if ckpt.is_absolute() else root_p / ckpt)
    if of_run.resolve() == run_dir.resolve():  # the stage's output folder gained the back-tested step
        dvc_stage.record_outputs("validate", root_p, logger)
    return {"ran": True, "metrics": metrics, "run_dir": str(of_run)}


@task(task_run_name="sweep-and-report", cache_policy=NO_CACHE, persist_result=False)
def sweep_and_report(root: str, run_dir: str) -> dict:
    from tasks.report.page import write_report
    from tasks.nanodit.sampler import NanoDiTSampler
    from tasks.report.sweep_grid import sweep
    from tasks.sweep import CAPTIONS, seen_captions

    logger, run = get_run_logger(), Path(run_dir)
    p = _params(Path(root))
    out = {}
    if train_state.step_dirs(run / "checkpoints"):
        try:
            prompts = list(p.sweep_prompts) + seen_captions(Path(root) / CAPTIONS, p.sweep_seen)
            out["sweep"] = str(sweep(NanoDiTSampler(run, steps=p.steps, guidance=p.guidance, scale=p.scale),
                                     prompts, list(p.sweep_seeds), p.sweep_negative or None, run / "sweep.png"))
            logger.info("sweep: %s", out["sweep"])
        # Any failure: the sweep is a view of the checkpoints; the validation is published
        # already and the report shows what there is.
        except Exception as e:  # noqa: BLE001
            logger.warning("sweep: failed, no new sweep.png (%s: %s); the report follows", type(e).__name__, e)
    out["report"] = str(write_report(run))
    logger.info("report: %s", out["report"])
    return out


def publish(result: dict, margin: float) -> None:
    logger, m = get_run_logger(), result["metrics"]
    tests = m.get("tests", {})
    label = m.get("lpips", {}).get("label", "LPIPS")
    # The label on every row: a table copied elsewhere keeps "not comparable" with its numbers.
    rows = [{"check": t, **{k: tests[t].get(k) for k in ("n", "mean", "p50", "p90", "max")}, "lpips": label}
            for t in TESTS if t in tests]
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
    run_dir = Path(result["run_dir"])
    lines += ["", f"Sweep and report: drawn after this summary, `{run_dir / 'sweep.png'}` and "
                  f"`{run_dir / 'report.html'}` (the sweep-and-report task's log says when)", "", *grids]
    create_markdown_artifact(key="validation-summary", markdown="\n".join(lines),
                             description="The validation of this flow run, with its grids")


def _validate(root: str, checkpoint: str | None, nightly: bool) -> dict:
    root = str(Path(root).resolve())
    result = validate_task(root, checkpoint, nightly)
    if result.get("skipped") or not result["metrics"]:  # nothing new: the sweep and report stand
        return result
    # Published first: a failure in the sweep or the report must not lose the validation.
    publish(result, _params(Path(root)).regress_margin)
    views = sweep_and_report(root, result["run_dir"])
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

"""What both SDXL trainers (LoRA: trainer.py, full fine-tune: full.py) do alike around a step:
skip a non-finite one and stop after `nan_patience` in a row, and write a log point (dvclive's
curves, the log line, the stage's two-column DVC metric). `t` is either trainer: it has p, step,
counters, opt, device, root and run_dir."""
from __future__ import annotations

import logging
from pathlib import Path

from tasks.core.store import atomic_write_json
from tasks.training.run import TrainError, peak_memory_gb

log = logging.getLogger("niche.sdxl")


def skip(t, step: int, loss: float, grad_norm: float, last_checkpoint: Path | None) -> None:
    """Forget this step's gradients and count it; TrainError (naming the last good checkpoint)
    after nan_patience non-finite steps in a row."""
    t.opt.zero_grad(set_to_none=True)
    t.counters["skipped_steps"] += 1
    t.counters["nonfinite_in_a_row"] += 1
    n, section = t.counters["nonfinite_in_a_row"], t.p.SECTION
    log.warning("%s: step %d skipped: loss %s, grad norm %s (%d in a row)", section, step + 1, loss, grad_norm, n)
    if n >= t.p.nan_patience:
        raise TrainError(f"{section}: {n} steps in a row had a non-finite loss or gradient ({section}.nan_patience "
                         f"= {t.p.nan_patience}); stopped at step {step}. The last good checkpoint is "
                         f"{last_checkpoint or 'none yet'}; lower the lr.")


def log_point(t, live, figures: dict, samples_per_s: float) -> None:
    live.step = t.step
    live.log_metric("train/loss", figures["loss"])
    live.log_metric("train/grad_norm", figures["grad_norm"])
    for g in t.opt.param_groups:
        live.log_metric(f"train/lr_{g['name']}", g["lr"] * g.get("d", 1.0))  # prodigy: its estimate d
    live.log_metric("train/skipped_steps", t.counters["skipped_steps"])
    live.log_metric("sys/samples_per_s", samples_per_s)
    live.log_metric("memory/peak_gb", peak_memory_gb(t.device))
    live.next_step()
    log.info("%s: step %d/%d loss %.4f grad %.3f %.2f samples/s", t.p.SECTION, t.step, t.p.steps, figures["loss"],
             figures["grad_norm"], samples_per_s)
    # The stage's DVC metric: two columns of `dvc metrics show` (the curves are dvclive's).
    atomic_write_json(t.root / "metrics" / f"{t.p.SECTION}.json", {"step": t.step, "loss": round(figures["loss"], 6)})

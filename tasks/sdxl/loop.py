"""What both SDXL trainers (LoRA: trainer.py, full fine-tune: full.py) do alike in and around a
step: the UNet's loss on a batch, skipping a non-finite step (stopping after `nan_patience` in a
row), and a log point (dvclive's curves, the log line, the stage's two-column DVC metric). `t` is
either trainer: it has p, step, counters, opt, device, bf16, prompts, root and run_dir."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from tasks.core.store import atomic_write_json
from tasks.training.run import TrainError, peak_memory_gb

log = logging.getLogger("niche.sdxl")


def unet_loss(t, unet, texts: list[str], time_ids: list, noisy: torch.Tensor, timesteps: torch.Tensor,
              target: torch.Tensor) -> torch.Tensor:
    """MSE of `unet`'s prediction (the trainer's UNet, or its DDP wrapper) against `target`, the
    prompts encoded through the trainer's cache, all under bf16 autocast when the run uses it."""
    with torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=t.bf16):
        embeds, pooled = t.prompts.encode(texts)
        ids = torch.tensor(time_ids, device=t.device, dtype=embeds.dtype)
        pred = unet(noisy, timesteps, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
    return F.mse_loss(pred.float(), target.float())


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

"""What a NanoDiT run shows a person: the dvclive metrics of each log step and the fixed
4-image grid every `sample_every` steps (the conditioning images on top, the EMA's samples
below), in runs/<run>/samples/ (dvc.yaml shows the folder as image plots)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from models.flow_matching import euler_sample
from models.nanodit import NanoDiT
from tasks.nanodit.data import to_inputs
from tasks.nanodit.params import TrainParams
from tasks.training.live import grid, save_png, to_uint8

log = logging.getLogger("niche.train")

# The loop's figures → dvclive's metric names.
NAMES = {"loss": "train/loss", "mse": "train/mse", "repa": "train/repa_loss", "grad_norm": "train/grad_norm",
         "velocity_rms": "train/velocity_rms", "active_tokens": "sys/active_tokens"}


def grid_guidance(p: TrainParams) -> str:
    """The guidance for the sample grid and the checkpoint's sampling default: `sample_guidance`,
    except "self" (dense vs TREAD-routed) becomes "cfg" when the run trains without TREAD, since
    a model that never trained routed has no meaningful routed prediction to guide against."""
    if p.sample_guidance == "self" and not p.tread:
        log.info("train: sample_guidance self needs TREAD (train.tread is false); sampling with cfg instead")
        return "cfg"
    return p.sample_guidance


def log_step(live, p: TrainParams, step: int, figures: dict, extra: dict) -> None:
    """One logged point: the window's mean figures and the run's state (`extra`: lr, image scale,
    skipped steps, samples/s, peak memory) at optimizer step `step`."""
    live.step = step
    for k, name in NAMES.items():
        if k in figures:
            live.log_metric(name, figures[k])
    for name, value in extra.items():
        live.log_metric(name, value)
    live.next_step()
    log.info("train: step %d/%d loss %.4f grad %.3f %.2f samples/s", step, p.steps, figures["loss"],
             figures["grad_norm"], extra["sys/samples_per_s"])


@torch.no_grad()
def sample_grid(ema: NanoDiT, fixed: list[dict], p: TrainParams, step: int, guidance: str,
                device: torch.device, bf16: bool, run_dir: Path) -> Path:
    refs, outs = [], []
    scale = p.scale_at(step - 1)  # the size the step just taken trained at (resolution_schedule)
    for i, batch in enumerate(fixed):
        x0, cond = to_inputs(batch, scale, p.patch_size, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            images = euler_sample(ema, cond, tuple(x0.shape[-2:]), steps=p.sample_steps, guidance=guidance,
                                  scale=p.guidance_scale, scale_dino=p.guidance_scale_dino, route=p.tread_rate,
                                  shift=p.t_shift, seed=p.seed + i)
        refs.append(to_uint8(x0)[0])
        outs.append(to_uint8(images)[0])
    path = run_dir / "samples" / f"step-{step:06d}.png"
    save_png(path, grid([refs, outs]))
    return path

"""NanoDiT's optimizers and schedules: Muon + AdamW (or AdamW alone), warmup + cosine, the EMA ramp."""
from __future__ import annotations

import math

import torch

from models.nanodit import NanoDiT
from tasks.nanodit.params import TrainParams

# The 2-D weights that AdamW trains even under `optimizer: muon`: the layers that read a raw
# signal or write the output. Muon orthogonalises each update (every singular value alike),
# which suits hidden matrices mixing learned features; on the pixels in and out, the sinusoidal
# timestep features, or pose_mlp's rank-3 input (a joint's x, y, confidence) it would spread
# the step evenly over directions the input barely spans.
ADAMW_WEIGHTS = frozenset({"patch_in.weight", "patch_out.weight", "t_embed.0.weight", "pose_mlp.0.weight"})


def lr_factor(p: TrainParams, step: int) -> float:
    """Linear warmup, then cosine from lr to min_lr at the last step."""
    if step < p.warmup_steps:
        return (step + 1) / p.warmup_steps
    span = max(p.steps - p.warmup_steps, 1)
    cos = 0.5 * (1 + math.cos(math.pi * min(step - p.warmup_steps, span) / span))
    return (p.min_lr + (p.lr - p.min_lr) * cos) / p.lr


def ema_decay_at(step: int, p: TrainParams) -> float:
    """The EMA's decay at optimizer step `step` (0-based): 0 (a copy) before `ema_warmup`, then
    (1 + n) / (10 + n) for n = step − ema_warmup, capped at `ema_decay`. The ramp lets the EMA
    forget the early weights: at 0.9999 from the start it would still hold ~58% of its step-500
    weights after 6000 steps. A function of the step alone, so a resumed run's EMA is exact."""
    if step < p.ema_warmup:
        return 0.0
    n = step - p.ema_warmup
    return min(p.ema_decay, (1 + n) / (10 + n))


def optimizers(model: NanoDiT, p: TrainParams) -> list[torch.optim.Optimizer]:
    """Under `muon`: Muon for the 2-D `.weight` matrices except ADAMW_WEIGHTS; AdamW for those,
    the learned embeddings and tokens, biases and norms. Under `adamw`: AdamW for everything."""
    muon, adam = [], []
    for name, param in model.named_parameters():
        (muon if p.optimizer == "muon" and param.dim() == 2 and name.endswith(".weight")
         and name not in ADAMW_WEIGHTS else adam).append(param)
    opts = [torch.optim.AdamW(adam, lr=p.lr, betas=p.adam_betas, weight_decay=p.weight_decay)]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=p.lr, weight_decay=p.weight_decay, momentum=p.muon_momentum,
                                     nesterov=p.muon_nesterov, ns_steps=p.muon_ns_steps,
                                     adjust_lr_fn="match_rms_adamw"))
    return opts


def schedulers(opts: list[torch.optim.Optimizer], p: TrainParams) -> list[torch.optim.lr_scheduler.LambdaLR]:
    return [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(p, s)) for o in opts]


@torch.no_grad()
def ema_update(ema: NanoDiT, model: NanoDiT, step: int, p: TrainParams) -> None:
    decay = ema_decay_at(step, p)
    torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1.0 - decay)

"""The objective and the sampler for NanoDiT, kept apart from the network.

Rectified flow, t in [0, 1] with t = 0 the data and t = 1 the noise:
    x_t = (1 − t)·x0 + t·ε,   velocity v = ε − x0 = (x_t − x0) / t.
The network predicts x0 (pixels in [−1, 1]); the loss is MSE in pixel space.
Timesteps are logit-normal (mean, std) then shifted toward noise by `shift`
(t' = s·t / (1 + (s − 1)·t), as SD3 does for large images).

CFG dropout: each sample falls in one of seven mutually exclusive categories
(uncond, text-only, DINO-CLS-only, DINO-patches-only, drop-pose, pose-only, all),
which says which of the four parts (text, cls, patches, pose) it keeps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from models.nanodit import Conditioning, NanoDiT

#                      text   cls    patches pose
CATEGORIES = {"uncond": (0, 0, 0, 0), "text_only": (1, 0, 0, 0), "dino_cls_only": (0, 1, 0, 0),
              "dino_patches_only": (0, 0, 1, 0), "drop_pose": (1, 1, 1, 0), "pose_only": (0, 0, 0, 1),
              "all": (1, 1, 1, 1)}


@dataclass(frozen=True)
class Objective:
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    # Probabilities of the seven CFG categories, in CATEGORIES' order; they sum to 1.
    cfg: tuple[float, ...] = (0.10, 0.25, 0.05, 0.05, 0.10, 0.05, 0.40)
    repa_weight: float = 0.5
    tread: float = 0.5            # share of image tokens routed past the middle blocks
    velocity_min_t: float = 0.05  # the velocity-norm metric divides by t: skip t near 0


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * t / (1 + (shift - 1) * t)


def sample_t(n: int, obj: Objective, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    z = torch.randn(n, generator=generator, device=device) * obj.t_std + obj.t_mean
    return shift_t(torch.sigmoid(z), obj.t_shift)


def cfg_keep(n: int, probs: tuple[float, ...], generator: torch.Generator | None = None,
             device=None) -> torch.Tensor:
    """(n, 4) bool: which conditioning parts each sample keeps, drawn from the seven categories."""
    table = torch.tensor(list(CATEGORIES.values()), dtype=torch.bool, device=device)
    cat = torch.multinomial(torch.tensor(probs, dtype=torch.float64), n, replacement=True, generator=generator)
    return table[cat.to(table.device)]


def repa_targets(dino_patches: torch.Tensor, grid: tuple[int, int], index: torch.Tensor) -> torch.Tensor:
    """The DINO patch each image token lies in, for the tokens in `index` (B, n) → (B, n, D).
    With pooled shards (patch_pool 2) four tokens share one target."""
    B, h, w, D = dino_patches.shape
    gh, gw = grid
    rows = torch.arange(gh, device=index.device) * h // gh
    cols = torch.arange(gw, device=index.device) * w // gw
    parent = (rows[:, None] * w + cols[None, :]).flatten()            # token → patch
    flat = dino_patches.reshape(B, h * w, D)
    return flat.gather(1, parent[index][..., None].expand(-1, -1, D))


def on_device(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """`generator` itself when it lives on `device` (or is None: the global RNG); else a generator
    on `device` seeded with its seed, so draws there are still a function of that seed."""
    if generator is None or generator.device == device:
        return generator
    return torch.Generator(device).manual_seed(generator.initial_seed())


def loss_terms(model: NanoDiT, x0: torch.Tensor, cond: Conditioning, obj: Objective,
               generator: torch.Generator | None = None, route: float | None = None) -> dict:
    """One forward pass; returns the total loss and the figures worth logging.
    `cond.keep` is used as given (the trainer draws it with cfg_keep)."""
    B = x0.shape[0]
    t = sample_t(B, obj, generator).to(x0.device)
    # The noise (an image's worth every micro-step) and the TREAD routing are drawn where x0 is,
    # not on the host and copied; on a CPU that is the given generator itself.
    local = on_device(generator, x0.device)
    eps = torch.randn(x0.shape, generator=local, device=x0.device).to(x0.dtype)
    tb = t.view(B, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    out = model(x_t, t, cond, route=obj.tread if route is None else route, generator=local)
    pred = out.x0.float()
    mse = F.mse_loss(pred, x0.float())
    terms = {"mse": mse, "active_tokens": out.active_tokens}
    total = mse
    if out.repa is not None and obj.repa_weight > 0:
        p = getattr(model, "module", model).config.patch_size  # DDP wraps the model
        target = repa_targets(cond.dino_patches.float(), (x0.shape[-2] // p, x0.shape[-1] // p), out.repa_index)
        repa = 1 - F.cosine_similarity(out.repa.float(), target, dim=-1).mean()
        terms["repa"] = repa
        total = total + obj.repa_weight * repa
    with torch.no_grad():
        ok = t > obj.velocity_min_t
        if ok.any():
            v = (x_t[ok].float() - pred[ok]) / tb[ok]
            terms["velocity_rms"] = v.pow(2).mean().sqrt()
    terms["loss"] = total
    return terms


# ---------------------------------------------------------------- sampling
GUIDANCE = ("none", "cfg", "self", "dual")


def _keep(cond: Conditioning, *parts: int, pose: bool = False) -> Conditioning:
    """`cond` keeping only `parts`; with `pose`, also the pose wherever `cond` keeps it."""
    keep = torch.zeros_like(cond.keep)
    keep[:, list(parts)] = True
    if pose:
        keep[:, 3] = cond.keep[:, 3]
    return cond.with_keep(keep)


def predict_x0(model: NanoDiT, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: str,
               scale: float, scale_dino: float, route: float, generator: torch.Generator | None,
               negative: Conditioning | None = None):
    """x0 under guidance. cfg: cond vs uncond, or vs `negative` (e.g. a negative prompt's text)
    when given (2 passes). self: dense vs TREAD-routed (2 passes, the routed pass is the weaker
    model). dual: uncond + text-only + DINO-only (3 passes), each with the pose where `cond`
    keeps it, so the pose conditions all three and only text and DINO are guided."""
    if negative is not None and guidance != "cfg":
        raise ValueError(f"a negative conditioning needs guidance 'cfg', not {guidance!r}")
    if guidance == "none":
        return model(x, t, cond).x0
    if guidance == "cfg":
        neg = _keep(cond) if negative is None else negative
        c, u = model(torch.cat([x, x]), torch.cat([t, t]), _cat(cond, neg)).x0.chunk(2)
        return u + scale * (c - u)
    if guidance == "self":
        dense = model(x, t, cond).x0
        routed = model(x, t, cond, route=route, generator=generator).x0
        return routed + scale * (dense - routed)
    if guidance == "dual":
        u, txt, dino = model(torch.cat([x, x, x]), torch.cat([t, t, t]),
                             _cat(_keep(cond, pose=True), _keep(cond, 0, pose=True),
                                  _keep(cond, 1, 2, pose=True))).x0.chunk(3)
        return u + scale * (txt - u) + scale_dino * (dino - u)
    raise ValueError(f"guidance {guidance!r}: expected one of {', '.join(GUIDANCE)}")


def pad_text(cond: Conditioning, length: int) -> Conditioning:
    """The conditioning with its T5 tokens padded to `length` (masked out: they change nothing)."""
    n = length - cond.t5.shape[1]
    if n <= 0:
        return cond
    B, _, D = cond.t5.shape
    t5 = torch.cat([cond.t5, cond.t5.new_zeros(B, n, D)], 1)
    mask = torch.cat([cond.t5_mask, cond.t5_mask.new_zeros(B, n)], 1)
    return Conditioning(t5, mask, cond.dino_cls, cond.dino_patches, cond.pose, cond.keep)


def _cat(*conds: Conditioning) -> Conditioning:
    """One batch of several conditionings (prompts of different lengths are padded)."""
    length = max(c.t5.shape[1] for c in conds)
    conds = tuple(pad_text(c, length) for c in conds)
    fields = ("t5", "t5_mask", "dino_cls", "dino_patches", "pose", "keep")
    return Conditioning(*(torch.cat([getattr(c, f) for c in conds]) for f in fields))


@torch.no_grad()
def euler_sample(model: NanoDiT, cond: Conditioning, size: tuple[int, int], *, steps: int = 50,
                 guidance: str = "cfg", scale: float = 3.0, scale_dino: float = 1.5, route: float = 0.5,
                 shift: float = 1.0, seed: int = 0, noise: torch.Tensor | None = None,
                 negative: Conditioning | None = None) -> torch.Tensor:
    """Images (B, 3, H, W) in [−1, 1] from noise, `steps` Euler steps from t = 1 to t = 0.
    One generator per call, seeded: the same seed gives the same image. `negative`: guide
    against it instead of the unconditional prediction (cfg only)."""
    if guidance not in GUIDANCE:
        raise ValueError(f"guidance {guidance!r}: expected one of {', '.join(GUIDANCE)}")
    g = torch.Generator().manual_seed(seed)
    B, device = cond.t5.shape[0], cond.t5.device
    dtype = next(model.parameters()).dtype
    x = (torch.randn(B, 3, *size, generator=g) if noise is None else noise.clone()).to(device, torch.float32)
    ts = shift_t(torch.linspace(1.0, 0.0, steps + 1), shift).tolist()
    for t_now, t_next in zip(ts[:-1], ts[1:]):
        t = torch.full((B,), t_now, device=device)
        x0 = predict_x0(model, x.to(dtype), t, cond, guidance, scale, scale_dino, route, g, negative).float()
        if t_next == 0.0:
            x = x0
            break
        x = x + (t_next - t_now) * (x - x0) / t_now
    return x.clamp(-1, 1)

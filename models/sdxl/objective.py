"""What the SDXL UNet is trained to predict, and the sampler that matches it.

`ddpm`: the base model's own objective — uniform timesteps on its DDPM schedule,
noise (or v) prediction, as diffusers' LoRA scripts train. `flow`: bigASP's
rectified flow — t from a logit-normal shifted toward noise, x_t = (1 − t)·x + t·ε,
target ε − x, the UNet's timestep t × 1000 (what ComfyUI's ModelSamplingSD3 and
diffusers' FlowMatchEulerDiscreteScheduler feed it).

All randomness comes from a CPU generator and is moved to the device, so a run
draws the same numbers on any device and resumes exactly.
"""
from __future__ import annotations

import math

import torch

TRAIN_TIMESTEPS = 1000


def randn(shape, g: torch.Generator, device, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def offset_noise(latents: torch.Tensor, offset: float, g: torch.Generator) -> torch.Tensor:
    """ε plus a per-sample, per-channel constant: without it the model cannot move an image's mean
    brightness far, so pure white backgrounds drift grey (the particleArt seed's 0.0357)."""
    noise = randn(latents.shape, g, latents.device)
    if offset:
        noise = noise + offset * randn((latents.shape[0], latents.shape[1], 1, 1), g, latents.device)
    return noise


class Objective:
    def __init__(self, kind: str, scheduler_config: dict, noise_offset: float = 0.0, t_shift: float = 3.0):
        self.kind, self.noise_offset, self.t_shift = kind, noise_offset, t_shift
        if kind == "ddpm":
            from diffusers import DDPMScheduler

            self.ddpm = DDPMScheduler.from_config(scheduler_config)
            self.prediction = self.ddpm.config.prediction_type  # epsilon | v_prediction
        elif kind != "flow":
            raise ValueError(f"objective: expected ddpm or flow, got {kind!r}")

    def prepare(self, latents: torch.Tensor, g: torch.Generator):
        """(noisy latents, UNet timesteps, target) for a batch of scaled latents."""
        B = latents.shape[0]
        noise = offset_noise(latents, self.noise_offset, g)
        if self.kind == "flow":
            t = torch.sigmoid(math.log(self.t_shift) + torch.randn(B, generator=g)).to(latents.device)
            tb = t.view(B, 1, 1, 1)
            return (1 - tb) * latents + tb * noise, t * TRAIN_TIMESTEPS, noise - latents
        t = torch.randint(0, self.ddpm.config.num_train_timesteps, (B,), generator=g).to(latents.device)
        noisy = self.ddpm.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else self.ddpm.get_velocity(latents, noise, t)
        return noisy, t, target

    def at(self, latents: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
        """(noisy, UNet timesteps, target) at given t in (0, 1) and noise: the held-out loss's fixed
        points (t is the flow's noise level; for ddpm its place on the DDPM schedule)."""
        if self.kind == "flow":
            tb = t.view(-1, 1, 1, 1)
            return (1 - tb) * latents + tb * noise, t * TRAIN_TIMESTEPS, noise - latents
        steps = (t * (self.ddpm.config.num_train_timesteps - 1)).round().long()
        noisy = self.ddpm.add_noise(latents, noise, steps)
        return noisy, steps, noise if self.prediction == "epsilon" else self.ddpm.get_velocity(latents, noise, steps)

    def sampler(self, scheduler_config: dict, shift: float):
        """The scheduler that inverts this objective at inference."""
        if self.kind == "flow":
            from diffusers import FlowMatchEulerDiscreteScheduler

            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=shift)
        from diffusers import EulerDiscreteScheduler

        return EulerDiscreteScheduler.from_config(scheduler_config)


def time_ids(orig_hw: tuple[int, int], crop_tl: tuple[int, int], target_hw: tuple[int, int]) -> list[int]:
    """SDXL's micro-conditioning: original size, crop top-left, target size (h, w order)."""
    return [int(orig_hw[0]), int(orig_hw[1]), int(crop_tl[0]), int(crop_tl[1]), int(target_hw[0]), int(target_hw[1])]


@torch.no_grad()
def denoise(unet, scheduler, cond: tuple[torch.Tensor, torch.Tensor], uncond: tuple[torch.Tensor, torch.Tensor] | None,
            time_ids_: torch.Tensor, latent_hw: tuple[int, int], steps: int, guidance: float,
            seed: int, dtype=torch.float32) -> torch.Tensor:
    """Euler sampling with classifier-free guidance against `uncond` (the negative prompt's
    embeddings). Returns unscaled-by-VAE latents (B=1). The same seed gives the same latents."""
    device = next(unet.parameters()).device
    g = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = randn((1, unet.config.in_channels, *latent_hw), g, device) * float(getattr(scheduler, "init_noise_sigma", 1.0))
    embeds, pooled = cond
    if uncond is not None and guidance != 1.0:
        # Encode both in one encode_prompts call: chunked prompts are then padded with empty chunks alike.
        assert uncond[0].shape == embeds.shape, "prompt and negative prompt embeddings differ in length"
        embeds, pooled = torch.cat([uncond[0], embeds]), torch.cat([uncond[1], pooled])
    twice = embeds.shape[0] == 2
    ids = time_ids_.to(device).repeat(embeds.shape[0], 1)
    for t in scheduler.timesteps:
        xin = torch.cat([x, x]) if twice else x
        if hasattr(scheduler, "scale_model_input"):
            xin = scheduler.scale_model_input(xin, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            pred = unet(xin, t.to(device), encoder_hidden_states=embeds.to(device),
                        added_cond_kwargs={"text_embeds": pooled.to(device), "time_ids": ids}).sample.float()
        if twice:
            u, c = pred.chunk(2)
            pred = u + guidance * (c - u)
        x = scheduler.step(pred, t, x, generator=g).prev_sample
    return x

"""The SDXL LoRA trainer's parameters (params.yaml sections `train_lora` and `train_wrong`).

The defaults are the particleArt seed's final table (rank 32, UNet lr 9e-5, text
encoder lr 2.5e-4, constant schedule, warmup 100, ti_frac 0.5, 1900 steps, noise
offset 0.0357, bf16, a checkpoint every 100 steps); `profiles/particleart.yaml`
restates it and `profiles/bigasp.yaml` switches to the flow-matching objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from models.sdxl.pipeline import DEFAULT_MODEL

# Settings that change neither the trajectory nor the checkpoints' contents: a run resumes across them.
NOT_TRAJECTORY = frozenset({"steps", "checkpoint_every", "keep_states", "log_every", "nan_patience",
                            "resume", "device", "text_cache_gb", "prompt_template", "negative_prompt",
                            "sample_steps", "guidance_scale", "sample_shift", "negative_lora",
                            "negative_lora_scale", "sweep_scenes", "sweep_seeds", "sample_size"})


@dataclass(frozen=True)
class LoraParams:
    SECTION: ClassVar[str] = "train_lora"

    run: str = "sdxl"                       # runs/<run>/
    model: str = DEFAULT_MODEL              # the base SDXL: hub id or diffusers folder
    revision: str | None = None
    # --- data: the latents stage's rows of this split, with their captions or one fixed prompt
    split: str = "train"                    # train | rejected (the negative LoRA) | holdout
    prompt: str | None = None               # every image's prompt (the negative LoRA: "wrong"); null: captions
    # The words new tokens stand for, one abstraction each: <s0><s1> for the first, <s2><s3> for the
    # next (a caption holding none of them gets the first prepended).
    trigger: tuple[str, ...] = ("TOK",)
    text_cache_gb: float = 8.0              # host memory for frozen text encoders' outputs (~0.6 MB a prompt)
    latent_sample: bool = True              # draw from the VAE posterior (diffusers' scripts) or use its mean
    # --- objective
    objective: Literal["ddpm", "flow"] = "ddpm"  # the base model's noise prediction, or bigASP's flow matching
    noise_offset: float = 0.0357            # per-channel offset: lets the model reach pure white and black
    t_shift: float = 3.0                    # flow: logit-normal timesteps shifted toward noise (SD3: 3)
    caption_dropout: float = 0.0            # share of prompts replaced by "" (flow matching: 0.05 for CFG)
    max_chunks: int = 1                     # 75-token chunks per prompt (bigASP: 3); 1: SDXL's own truncation
    # --- LoRA and pivotal tuning
    rank: int = 32
    alpha: float = 32.0
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    text_encoder_lora: bool = False         # also LoRA on both text encoders (q, k, v, out projections)
    ti: bool = True                         # textual inversion of new tokens <s0><s1> standing for `trigger`
    ti_tokens: int = 2
    ti_frac: float = 0.5                    # the new tokens train for this share of the steps, then freeze
    ti_init: str | None = None              # a word to start the tokens from; null: random, scaled like the table
    # --- optimisation
    steps: int = 1900
    batch_size: int = 1
    grad_accum: int = 4
    optimizer: Literal["adamw", "prodigy"] = "adamw"  # prodigy estimates its own step size: set lr 1.0
    lr: float = 9.0e-05                     # UNet LoRA
    text_encoder_lr: float = 0.00025        # TI embeddings and text-encoder LoRA
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 100
    weight_decay: float = 0.0001
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA (fp16 gave blue dots)
    gradient_checkpointing: bool = True
    seed: int = 0
    # --- checkpoints and logs
    checkpoint_every: int = 100             # every checkpoint keeps its LoRA + TI embeddings (for sweeps)
    keep_states: int = 2                    # optimizer states kept for resuming (the newest N)
    log_every: int = 10
    nan_patience: int = 5
    resume: Literal["auto", "never"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # --- inference: sweeps and samples
    prompt_template: str = "TOK, a figure {scene}, white background"
    negative_prompt: str = ("photorealistic, detailed, shading, gradient, gray, color, dense, beige, tan, "
                            "sepia, parchment")
    negative_lora: str | None = None        # a negative ("wrong") LoRA run folder; adds `wrong` to the negative
    negative_lora_scale: float = 1.0
    sample_steps: int = 30
    guidance_scale: float = 5.0
    sample_shift: float = 3.0               # flow: the Euler schedule's shift (bigASP: 3 to 6)
    sample_size: tuple[int, int] | None = None  # (width, height); null: the size trained on most
    sweep_scenes: tuple[str, ...] = ("juggling three balls", "dancing", "riding a bicycle")
    sweep_seeds: tuple[int, ...] = (0, 1)

    def validate(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{self.SECTION}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not self.run or "/" in self.run:
            raise bad("run", "a folder name under runs/")
        if self.objective not in ("ddpm", "flow"):
            raise bad("objective", "ddpm or flow")
        if self.optimizer not in ("adamw", "prodigy"):
            raise bad("optimizer", "adamw or prodigy")
        if self.schedule not in ("constant", "cosine"):
            raise bad("schedule", "constant or cosine")
        for key in ("rank", "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_states",
                    "log_every", "nan_patience", "ti_tokens", "max_chunks", "sample_steps"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        if self.max_chunks > 3:
            raise bad("max_chunks", "1, 2 or 3 (CLIP's positions are reused per chunk; bigASP stops at 3)")
        for key in ("ti_frac", "caption_dropout", "lora_dropout"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "a share in [0, 1]")
        for key in ("lr", "alpha", "t_shift", "sample_shift"):
            if getattr(self, key) <= 0:
                raise bad(key, "a positive number")
        for key in ("text_encoder_lr", "text_cache_gb", "noise_offset", "weight_decay", "grad_clip",
                    "warmup_steps", "guidance_scale", "negative_lora_scale"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")
        if not self.target_modules:
            raise bad("target_modules", "at least one module name")
        if self.ti and (not self.trigger or len(set(self.trigger)) != len(self.trigger)
                        or any(not t or t != t.strip() or any(c in t for c in " ,\n") for t in self.trigger)):
            raise bad("trigger", "one or more distinct words (no spaces or commas) for the new tokens (ti is on)")
        if "{scene}" not in self.prompt_template:
            raise bad("prompt_template", "a template with {scene}")
        if self.sample_size is not None and (len(self.sample_size) != 2 or any(s % 64 for s in self.sample_size)):
            raise bad("sample_size", "[width, height], multiples of 64")

    def ti_steps(self) -> int:
        """Optimizer steps during which the new token embeddings train."""
        return round(self.ti_frac * self.steps) if self.ti else 0

    def prompt_for(self, caption: str | None) -> str:
        """What the model reads for one image (before the trigger becomes <s0><s1>)."""
        if self.prompt is not None:
            return self.prompt
        import re

        from tasks.caption import apply_trigger
        text = caption or ""
        if not self.ti or any(re.search(rf"(?<!\w){re.escape(t)}(?!\w)", text) for t in self.trigger):
            return text
        return apply_trigger(text, self.trigger[0])


@dataclass(frozen=True)
class WrongParams(LoraParams):
    """The negative LoRA (the third seed's `wrong` method): the curator's rejects, one fixed
    prompt, no new tokens; applied at inference with `wrong` in the negative prompt."""
    SECTION: ClassVar[str] = "train_wrong"

    run: str = "sdxl-wrong"
    split: str = "rejected"
    prompt: str | None = "wrong"
    ti: bool = False
    steps: int = 1000
    lr: float = 0.0001
    checkpoint_every: int = 250


# The params.yaml sections an SDXL LoRA run is read from.
SECTIONS = {"train_lora": LoraParams, "train_wrong": WrongParams}

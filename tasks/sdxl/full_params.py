"""The SDXL full fine-tune's parameters (params.yaml section `train_sdxl`).

The defaults are the bigASP v2.5 recipe (the third seed; `profiles/bigasp.yaml` restates them):
the whole UNet trains with flow matching on shifted logit-normal timesteps (shift 3), AdamW lr
1e-4, weight decay 0.1, fp32 master weights under bf16 autocast, gradient clipping 1.0, both text
encoders frozen, prompts built on the fly (the caption, or the shuffled tag string 20% of the time
when an image has tags; 5% dropped for CFG, half to "" and half to the quality string), up to three
75-token chunks, batches grouped by aspect bucket and chunk count, gradient checkpointing.

Effective batch = batch_size (per device) x grad_accum x world size (torchrun's processes).
bigASP trained at 4096 (16 per GPU x 8 x 32 GPUs) with lr 1e-4; a vertical dataset on one node
trains at a far smaller batch. `lr_scaling` says what to do with lr then: `none` uses it as
written (the default: the user picked it for their batch), `sqrt` multiplies it by
sqrt(effective / lr_reference_batch) (the usual rule for Adam), `linear` by effective /
lr_reference_batch. The run logs the effective batch and lr it trains with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from models.sdxl.pipeline import DEFAULT_MODEL

# Settings that change neither the trajectory nor the checkpoints' contents: a run resumes across
# them. `parallel` is one of them (DDP and FSDP compute the same step), and so is the world size:
# a run resumes on other GPUs when batch_size x world (the global batch) is unchanged.
NOT_TRAJECTORY = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "log_every", "nan_patience",
                            "spike_factor", "resume", "device", "text_cache_gb", "parallel",
                            "gradient_checkpointing", "export_dtype", "val_timesteps", "prompt_template",
                            "negative_prompt",
                            "sample_steps", "guidance_scale", "sample_shift", "sample_size", "sweep_scenes",
                            "sweep_seeds", "batch_size"})


@dataclass(frozen=True)
class FullParams:
    SECTION: ClassVar[str] = "train_sdxl"

    run: str = "sdxl-full"                  # runs/<run>/
    model: str = DEFAULT_MODEL              # the model fine-tuned: hub id or diffusers folder
    revision: str | None = None
    # --- data: the latents stage's rows of this split, with their captions and tags
    split: str = "train"
    prompt: str | None = None               # every image's prompt; null: captions (and tags)
    text_cache_gb: float = 8.0              # host memory for frozen text encoders' outputs of captions
    latent_sample: bool = True              # draw from the VAE posterior (else its mean)
    # --- prompts built on the fly (bigASP)
    tag_share: float = 0.2                  # the tag string instead of the caption, when an image has tags
    quality_tags: tuple[str, ...] = ("masterpiece", "best quality", "high quality", "good quality",
                                     "normal quality", "low quality", "worst quality")
    quality_share: float = 0.9              # a tag string leads with the image's quality tags this often
    important_tags: tuple[str, ...] = ("watermark",)  # never dropped from a tag string
    ucg: float = 0.05                       # prompts dropped for classifier-free guidance...
    ucg_quality_share: float = 0.5          # ...this share of them to the quality tags alone, the rest to ""
    max_chunks: int = 3                     # 75-token chunks per prompt, BOS/EOS each
    # --- objective
    objective: Literal["ddpm", "flow"] = "flow"
    t_shift: float = 3.0                    # flow: logit-normal timesteps shifted toward noise (SD3: 3)
    noise_offset: float = 0.0
    # --- what trains
    train_text_encoders: bool = False       # bigASP froze both (their gradients spiked first)
    text_encoder_lr: float = 1.0e-05
    ema: bool = False
    ema_decay: float = 0.9999
    # --- optimisation
    steps: int = 10000
    batch_size: int = 16                    # per device and micro-step (bigASP: 16 on an H100)
    grad_accum: int = 8
    lr: float = 1.0e-04
    lr_scaling: Literal["none", "sqrt", "linear"] = "none"
    lr_reference_batch: int = 4096          # the effective batch `lr` was chosen for (bigASP: 4096)
    schedule: Literal["constant", "cosine"] = "cosine"  # cosine to 0 after the warmup (bigASP)
    warmup_steps: int = 250                 # bigASP: 1M samples at 4096
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1.0e-08
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA; weights stay fp32
    gradient_checkpointing: bool = True
    parallel: Literal["ddp", "fsdp"] = "ddp"  # under torchrun; fsdp = FSDP2, SHARD_GRAD_OP
    seed: int = 0
    # --- checkpoints and logs
    checkpoint_every: int = 500
    keep_checkpoints: int = 3               # the newest K checkpoints stay whole
    export_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"  # the single .safetensors file's
    log_every: int = 10
    val_timesteps: int = 8                  # held-out loss at each checkpoint at this many fixed t; 0: none
    nan_patience: int = 5
    spike_factor: float = 3.0
    resume: Literal["auto", "never"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # --- inference: sweeps and samples (the flow-match Euler sampler)
    prompt_template: str = "{scene}"
    negative_prompt: str = "low quality, worst quality"
    sample_steps: int = 30
    guidance_scale: float = 4.0             # bigASP: CFG 3 to 6
    sample_shift: float = 6.0               # trained at 3; the seed found 6 better at inference
    sample_size: tuple[int, int] | None = None
    sweep_scenes: tuple[str, ...] = ("a photograph of a woman reading in a cafe", "a cat on a windowsill")
    sweep_seeds: tuple[int, ...] = (0, 1)

    negative_lora: ClassVar[None] = None    # the LoRA sampler's option; a full run has none

    def validate(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{self.SECTION}.{key}: expected {expected}, got {getattr(self, key)!r}")

        if not self.run or "/" in self.run:
            raise bad("run", "a folder name under runs/")
        for key, allowed in (("objective", ("ddpm", "flow")), ("schedule", ("constant", "cosine")),
                             ("lr_scaling", ("none", "sqrt", "linear")), ("parallel", ("ddp", "fsdp")),
                             ("export_dtype", ("fp16", "bf16", "fp32")), ("precision", ("auto", "bf16", "fp32"))):
            if getattr(self, key) not in allowed:
                raise bad(key, " or ".join(allowed))
        for key in ("steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints", "log_every",
                    "nan_patience", "max_chunks", "sample_steps", "lr_reference_batch"):
            if getattr(self, key) < 1:
                raise bad(key, "an integer >= 1")
        if self.max_chunks > 3:
            raise bad("max_chunks", "1, 2 or 3 (CLIP's positions are reused per chunk; bigASP stops at 3)")
        for key in ("tag_share", "quality_share", "ucg", "ucg_quality_share", "ema_decay"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise bad(key, "a share in [0, 1]")
        for key in ("lr", "t_shift", "sample_shift", "spike_factor"):
            if getattr(self, key) <= 0:
                raise bad(key, "a positive number")
        for key in ("val_timesteps", "text_encoder_lr", "text_cache_gb", "noise_offset", "weight_decay", "grad_clip",
                    "warmup_steps", "guidance_scale", "adam_eps"):
            if getattr(self, key) < 0:
                raise bad(key, ">= 0")
        if "{scene}" not in self.prompt_template:
            raise bad("prompt_template", "a template with {scene}")
        if self.sample_size is not None and (len(self.sample_size) != 2 or any(s % 64 for s in self.sample_size)):
            raise bad("sample_size", "[width, height], multiples of 64")

    def prompt_for(self, caption: str | None) -> str:
        """The caption a row carries (the on-the-fly prompt starts from it)."""
        return self.prompt if self.prompt is not None else (caption or "")

    def effective_batch(self, world: int) -> int:
        return self.batch_size * self.grad_accum * world

    def scaled_lr(self, world: int) -> float:
        """`lr` under `lr_scaling` for this run's effective batch."""
        ratio = self.effective_batch(world) / self.lr_reference_batch
        return self.lr * {"none": 1.0, "sqrt": math.sqrt(ratio), "linear": ratio}[self.lr_scaling]

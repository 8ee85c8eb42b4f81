"""The `train` section of params.yaml (NanoDiT). Defaults are the prx-tg seed's production run."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from models.flow_matching import CATEGORIES, GUIDANCE, Objective
from models.nanodit import PRESETS


@dataclass(frozen=True)
class CfgDropout:
    """Shares of the seven mutually exclusive conditioning categories; they sum to 1."""
    uncond: float = 0.10
    text_only: float = 0.25
    dino_cls_only: float = 0.05
    dino_patches_only: float = 0.05
    drop_pose: float = 0.10
    pose_only: float = 0.05
    all: float = 0.40

    def probs(self) -> tuple[float, ...]:
        return tuple(getattr(self, k) for k in CATEGORIES)

    def validate(self) -> None:
        bad = [k for k in CATEGORIES if not 0.0 <= getattr(self, k) <= 1.0]
        if bad:
            raise ValueError(f"train.cfg_dropout.{bad[0]}: expected a probability in [0, 1]")
        if abs(sum(self.probs()) - 1.0) > 1e-6:
            raise ValueError(f"train.cfg_dropout: the seven shares must sum to 1, they sum to {sum(self.probs()):g}")


@dataclass(frozen=True)
class TrainParams:
    run: str = "nanodit"                  # runs/<run>/
    shards: str = "data/shards"           # a folder or s3://bucket/prefix
    endpoint_url: str | None = None       # S3-compatible endpoint (MinIO, R2, ...)
    preset: Literal["tiny", "small", "baseline", "production"] = "production"
    patch_size: int = 16
    steps: int = 6000                     # optimizer steps
    batch_size: int = 1                   # per rank and micro-step
    grad_accum: int = 256
    lr: float = 3.0e-4
    min_lr: float = 1.0e-6
    warmup_steps: int = 500
    weight_decay: float = 0.0
    optimizer: Literal["muon", "adamw"] = "muon"  # muon: Muon for hidden 2-D weights + AdamW for the rest
    muon_momentum: float = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: int = 5
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    gradient_checkpointing: bool = True
    ema_decay: float = 0.9999
    ema_warmup: int = 500                 # the EMA copies the weights until this step, then ramps to ema_decay
    image_scale: float = 1.0              # train at this fraction of the bucket size (CPU runs)
    resolution_schedule: tuple[tuple[int, float], ...] = ((3000, 0.5),)  # [until_step, scale]; then 1.0
    t_mean: float = 0.0                   # logit-normal timesteps
    t_std: float = 1.0
    t_shift: float = 1.0
    cfg_dropout: CfgDropout = field(default_factory=CfgDropout)
    repa: bool = True
    repa_weight: float = 0.5
    repa_block: int = -1                  # the output of this many blocks; -1: depth // 2
    tread: bool = True
    tread_rate: float = 0.5               # share of image tokens routed past blocks [start, end)
    tread_start: int = 1
    tread_end: int = -1                   # -1: depth - 1
    flip: float = 0.5
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 128
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 100               # the fixed 4-image grid
    sample_steps: int = 30
    sample_guidance: str = "self"         # none | cfg | self | dual
    guidance_scale: float = 3.0
    guidance_scale_dino: float = 1.5      # dual guidance: the DINO term's scale (the text's is guidance_scale)
    log_every: int = 10
    nan_patience: int = 5                 # this many non-finite steps in a row stop the run
    spike_factor: float = 3.0             # a loss this many times its running mean is logged as a spike
    resume: Literal["auto", "never"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        positive = ("patch_size", "steps", "batch_size", "grad_accum", "checkpoint_every", "keep_checkpoints",
                    "sample_every", "sample_steps", "log_every", "nan_patience")
        for k in positive:
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k}: expected >= 1, got {getattr(self, k)}")
        for k in ("lr", "image_scale", "t_std", "t_shift", "grad_clip", "spike_factor"):
            if getattr(self, k) <= 0:
                raise ValueError(f"train.{k}: expected > 0, got {getattr(self, k)}")
        for k in ("flip", "tread_rate", "ema_decay"):
            if not 0.0 <= getattr(self, k) <= 1.0 or (k == "tread_rate" and getattr(self, k) >= 1.0):
                raise ValueError(f"train.{k}: expected a share in [0, 1), got {getattr(self, k)}")
        if self.preset not in PRESETS:
            raise ValueError(f"train.preset: expected one of {', '.join(PRESETS)}")
        if self.sample_guidance not in GUIDANCE:
            raise ValueError(f"train.sample_guidance: expected one of {', '.join(GUIDANCE)}")
        if self.image_scale > 1:
            raise ValueError("train.image_scale: at most 1 (the bucket size)")
        last = 0
        for i, (until, scale) in enumerate(self.resolution_schedule):
            if until <= last or not 0 < scale <= 1:
                raise ValueError(f"train.resolution_schedule[{i}]: expected [until_step, scale] with steps "
                                 f"increasing and 0 < scale <= 1, got {[until, scale]}")
            last = until
        self.cfg_dropout.validate()

    def objective(self) -> Objective:
        return Objective(t_mean=self.t_mean, t_std=self.t_std, t_shift=self.t_shift,
                         cfg=self.cfg_dropout.probs(), repa_weight=self.repa_weight if self.repa else 0.0,
                         tread=self.tread_rate if self.tread else 0.0)

    def scale_at(self, step: int) -> float:
        """The image scale for optimizer step `step` (0-based)."""
        for until, scale in self.resolution_schedule:
            if step < until:
                return self.image_scale * scale
        return self.image_scale


# Settings that do not change what is computed: a run may resume under new values
# (gradient_checkpointing recomputes the same activations: it can be turned on after an
# out-of-memory error without starting over).
NOT_TRAJECTORY = ("shards", "endpoint_url", "checkpoint_every", "keep_checkpoints", "sample_every",
                  "sample_steps", "sample_guidance", "guidance_scale", "guidance_scale_dino", "log_every",
                  "nan_patience", "spike_factor", "resume", "device", "gradient_checkpointing")

"""The SDXL trainer's sampler: a LoRA run's checkpoint to an image, loaded the way a user loads
it elsewhere — its diffusers LoRA with `load_lora_weights` and its own TI embeddings with
`load_textual_inversion` into both text encoders, on the base model the run trained on.
The sweep (tasks/report/sweep_grid.py), `python -m tasks.sample_lora` and the train flow's
sweep all go through `SDXLSampler`.

With `negative_lora` (a negative run's folder) its newest LoRA is applied too and `wrong`
joins the negative prompt (the third seed's method). Sampling inverts the run's objective:
the base model's Euler scheduler for `ddpm`, a flow-match Euler schedule with `sample_shift`
for `flow`.

`FullSampler` does the same for a full fine-tune (train_sdxl): each checkpoint's own UNet (and
text encoders, when they trained) replaces the pipeline's, with the same flow-match sampler.

`sample(None, ...)` samples the base model alone (the candidates stage's `sdxl` generator): the
run's style adapter and tokens are unloaded first; a negative LoRA, when configured, stays.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image

from models.hub import torch_device
from models.sdxl import pipeline as sdxl
from models.sdxl.objective import Objective, denoise, time_ids
from models.sdxl.text import encode_prompts
from models.sdxl.ti import expand, load_embeddings
from tasks.report.sweep_grid import SweepError
from tasks.sdxl.checkpoint import finished
from tasks.sdxl.params import LoraParams

log = logging.getLogger("niche.sample_lora")
WRONG = "wrong"


def sample_size(p: LoraParams, meta: dict) -> tuple[int, int]:
    """(width, height): sample_size, else the size the checkpoint's run trained on most (its
    meta.json), else SDXL's 1024 x 1024 (the base model)."""
    if p.sample_size:
        return tuple(p.sample_size)
    return tuple(meta.get("sizes", [[1024, 1024]])[0])


def negative_for(p: LoraParams) -> str:
    parts = [s for s in (p.negative_prompt.strip(), WRONG if p.negative_lora else "") if s]
    return ", ".join(parts)


class SDXLSampler:
    """The sweep's Sampler for one LoRA run (tasks/report/sweep_grid.py)."""

    def __init__(self, p: LoraParams, root: Path = Path("."), device: str = "auto"):
        self.p, self.root = p, Path(root)
        self.run_dir = self.root / "runs" / p.run
        self.device = torch_device() if device == "auto" else device
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.model = sdxl.resolve_sdxl(p.model, f"{p.SECTION}.model")
        self.pipe = sdxl.load_pipeline(self.model, f"{p.SECTION}.model", self.dtype, self.device)
        self.vae_dtype = torch.float32  # the SDXL VAE overflows in fp16 and loses colour in bf16
        if self.pipe.vae.dtype != self.vae_dtype:
            self.pipe.vae.to(self.vae_dtype)
        self.sched_cfg = sdxl.load_scheduler_config(self.model, f"{p.SECTION}.model")
        self.objective = Objective(p.objective, self.sched_cfg, 0.0, p.t_shift)
        self.loaded: Path | None = None
        self.meta: dict = {}
        self.adapters: list[tuple[str, float]] = []
        if p.negative_lora:
            self._load_negative(Path(p.negative_lora))

    def _load_negative(self, run: Path) -> None:
        run = run if run.is_absolute() else self.root / run
        ckpts = finished(run / "checkpoints")
        if not ckpts:
            raise SweepError(f"{self.p.SECTION}.negative_lora: {run} has no checkpoint (train it: dvc repro "
                             f"train_wrong; see {run / 'checkpoints' / 'NO_SAMPLES.txt'} if it had no rejects)")
        self.pipe.load_lora_weights(str(ckpts[-1][1] / "lora"), adapter_name=WRONG)
        self.adapters.append((WRONG, self.p.negative_lora_scale))
        self.pipe.set_adapters([WRONG], [self.p.negative_lora_scale])  # at its scale for the base model too
        log.info("negative LoRA %s at scale %s, with %r in the negative prompt", ckpts[-1][1],
                 self.p.negative_lora_scale, WRONG)

    def checkpoints(self) -> list[tuple[int, Path]]:
        return finished(self.run_dir / "checkpoints")

    def describe(self) -> dict:
        return {"trainer": "sdxl-lora", "run": str(self.run_dir), "objective": self.p.objective,
                "steps": self.p.sample_steps, "guidance_scale": self.p.guidance_scale,
                "negative_lora": self.p.negative_lora, "template": self.p.prompt_template}

    def _use(self, ckpt: Path | None) -> None:
        """`ckpt`'s LoRA and tokens on the pipeline; None: the base model (no style adapter)."""
        if self.loaded == ckpt:
            return
        pipe = self.pipe
        if self.loaded is not None:
            pipe.delete_adapters("style")
            if self.meta.get("tokens"):  # diffusers' default unloads from the first encoder only
                pipe.unload_textual_inversion(self.meta["tokens"], pipe.tokenizer, pipe.text_encoder)
                pipe.unload_textual_inversion(self.meta["tokens"], pipe.tokenizer_2, pipe.text_encoder_2)
            self.loaded, self.meta = None, {}
            if self.adapters:  # the negative LoRA alone again
                names, weights = zip(*self.adapters)
                pipe.set_adapters(list(names), list(weights))
        if ckpt is None:
            return
        self.meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
        pipe.load_lora_weights(str(ckpt / "lora"), adapter_name="style")
        if self.meta.get("tokens"):
            emb = load_embeddings(ckpt / "embeddings.safetensors")
            pipe.load_textual_inversion(emb["clip_l"], token=self.meta["tokens"], text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(emb["clip_g"], token=self.meta["tokens"], text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
        names, weights = zip(*([("style", 1.0)] + self.adapters))
        pipe.set_adapters(list(names), list(weights))
        self.loaded = ckpt

    def size(self) -> tuple[int, int]:
        return sample_size(self.p, self.meta)

    @torch.no_grad()
    def sample(self, ckpt: Path | None, prompt: str, seed: int, negative: str | None) -> Image.Image:
        """One image of `ckpt` (None: the base model without any LoRA of the run)."""
        self._use(ckpt)
        pipe, meta = self.pipe, self.meta
        texts = [expand(t, meta.get("abstractions", {})) for t in (prompt, negative or "")]
        enc = sdxl.TextEncoders(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2)
        embeds, pooled = encode_prompts(enc, texts, self.p.max_chunks, self.device)
        w, h = self.size()
        ids = torch.tensor([time_ids((h, w), (0, 0), (h, w))], dtype=embeds.dtype)
        sched = self.objective.sampler(self.sched_cfg, self.p.sample_shift)
        x = denoise(pipe.unet, sched, (embeds[:1], pooled[:1]), (embeds[1:], pooled[1:]), ids, (h // 8, w // 8),
                    self.p.sample_steps, self.p.guidance_scale, seed, self.dtype)
        scaling = float(meta.get("scaling_factor", pipe.vae.config.scaling_factor))
        image = pipe.vae.decode(x.to(self.vae_dtype) / scaling).sample
        arr = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return Image.fromarray(arr)


class FullSampler(SDXLSampler):
    """The sweep's Sampler for a full fine-tune (train_sdxl): each checkpoint's UNet, and its text
    encoders when they trained, loaded into the one pipeline; the same flow-match Euler sampler."""

    def __init__(self, p, root: Path = Path("."), device: str = "auto"):
        super().__init__(p, root, device)
        self._text_changed = False  # the pipeline holds a checkpoint's trained text encoders

    def checkpoints(self) -> list[tuple[int, Path]]:
        from tasks.sdxl.full_checkpoint import finished as full_finished
        return full_finished(self.run_dir / "checkpoints")

    def describe(self) -> dict:
        return {"trainer": "sdxl-full", "run": str(self.run_dir), "objective": self.p.objective,
                "steps": self.p.sample_steps, "guidance_scale": self.p.guidance_scale,
                "shift": self.p.sample_shift, "template": self.p.prompt_template}

    def _use(self, ckpt: Path | None) -> None:
        from safetensors.torch import load_file

        if self.loaded == ckpt and (ckpt is not None or self.meta == {}):
            return
        src = ckpt if ckpt is not None else self.model.path
        self.pipe.unet.load_state_dict(load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors")))
        self.meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8")) if ckpt is not None else {}
        if self.meta.get("params", {}).get("train_text_encoders") or self._text_changed:
            # Trained text encoders, or back from them: the whole encoders of `src`.
            text = sdxl.load_text_encoders(self.model if ckpt is None else sdxl.resolve_sdxl(str(src), "checkpoint"),
                                           f"{self.p.SECTION}.model", self.dtype, self.device)
            self.pipe.text_encoder, self.pipe.text_encoder_2 = text.text_encoder, text.text_encoder_2
            self._text_changed = ckpt is not None
        self.loaded = ckpt

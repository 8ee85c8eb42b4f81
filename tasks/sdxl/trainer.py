"""The SDXL LoRA + pivotal-tuning loop, read top to bottom in `fit`: a seeded step → micro-batches
(latents, caption dropout, the objective's noisy input and target, the UNet) → clip → (skip a
non-finite step) → optimizer and schedule → tokens freeze at ti_frac → log, checkpoint.

Its parts: tasks/sdxl/data.py (rows and bucket batches), text.py (prompts and their cache),
checkpoint.py (resume and save), loop.py (the skip and the log point, shared with full.py); the
SDXL pieces themselves are models/sdxl/.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from models.hub import SetupError, torch_device
from models.sdxl import pipeline as sdxl
from models.sdxl.objective import Objective
from tasks.core.params import as_dict
from tasks.sdxl import checkpoint, data, loop
from tasks.sdxl.params import NOT_TRAJECTORY, LoraParams
from tasks.sdxl.text import Prompts
from tasks.training.live import Window, open_live
from tasks.training.run import seeded

log = logging.getLogger("niche.train_lora")
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def lr_lambda(p: LoraParams):
    def f(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        if p.schedule == "constant":  # the seed's choice: cosine let SDXL's priors creep back late
            return 1.0
        span = max(p.steps - p.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - p.warmup_steps, span) / span))
    return f


class LoraTrainer:
    def __init__(self, p: LoraParams, root: Path = Path(".")):
        from peft import LoraConfig

        self.p, self.root = p, Path(root)
        dev = torch_device() if p.device == "auto" else p.device
        if dev == "cuda" and not torch.cuda.is_available():
            raise SetupError(f"{p.SECTION}.device: cuda, but torch sees no CUDA device")
        self.device = torch.device(dev)
        self.bf16 = p.precision == "bf16" or (p.precision == "auto" and self.device.type == "cuda")
        self.run_dir = self.root / "runs" / p.run
        self.rows = data.load_rows(self.root, p)
        self.model = sdxl.resolve_sdxl(p.model, f"{p.SECTION}.model")
        base_dtype = torch.bfloat16 if self.bf16 else torch.float32  # frozen weights; LoRA stays fp32
        with torch.random.fork_rng(devices=[]):  # LoRA init and new tokens: a function of the seed alone
            torch.manual_seed(p.seed)
            self.unet = sdxl.load_unet(self.model, f"{p.SECTION}.model", base_dtype, str(self.device))
            self.unet.requires_grad_(False)
            self.unet.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.lora_dropout,
                                             init_lora_weights="gaussian", target_modules=list(p.target_modules)))
            self.text = sdxl.load_text_encoders(self.model, f"{p.SECTION}.model", torch.float32, str(self.device))
            for enc in (self.text.text_encoder, self.text.text_encoder_2):
                enc.requires_grad_(False)
                if p.text_encoder_lora:
                    enc.add_adapter(LoraConfig(r=p.rank, lora_alpha=p.alpha, lora_dropout=p.lora_dropout,
                                               init_lora_weights="gaussian", target_modules=TE_TARGETS))
            self.pivotal = None
            if p.ti:
                from models.sdxl.ti import PivotalTokens
                self.pivotal = PivotalTokens(self.text, trigger=p.trigger, n_tokens=p.ti_tokens, init=p.ti_init,
                                             seed=p.seed)
        self.lora_params = [q for q in self.unet.parameters() if q.requires_grad]
        for q in self.lora_params:
            q.data = q.data.float()
        if p.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.te_lora = [q for enc in (self.text.text_encoder, self.text.text_encoder_2)
                        for q in enc.parameters() if q.requires_grad]
        self.ti_params = self.pivotal.parameters() if self.pivotal else []
        for t in self.ti_params:
            t.requires_grad_(True)
        self.prompts = Prompts(p, self.text, self.pivotal, self.device)
        self.prompts.train_text = bool(self.te_lora or self.ti_params)
        self.batches = data.BucketBatches(self.rows, p.batch_size, p.seed,
                                          self.prompts.chunks([r.prompt for r in self.rows]))
        sched_cfg = sdxl.load_scheduler_config(self.model, f"{p.SECTION}.model")
        self.objective = Objective(p.objective, sched_cfg, p.noise_offset, p.t_shift)
        self.scaling = float(sdxl.load_vae_config(self.model, f"{p.SECTION}.model")["scaling_factor"])
        self.opt = self._optimizer()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(p))
        self.fp = self._fingerprint()
        self.step, self.counters = 0, {"skipped_steps": 0, "nonfinite_in_a_row": 0, "spikes": 0}
        found = checkpoint.resumable(self)
        if found is not None:
            checkpoint.load(self, *found)

    # ------------------------------------------------------------ set-up
    def _optimizer(self) -> torch.optim.Optimizer:
        p = self.p
        groups = [{"params": self.lora_params, "lr": p.lr, "name": "unet"}]
        text = self.te_lora + list(self.ti_params)
        if text:
            groups.append({"params": text, "lr": p.text_encoder_lr, "name": "text"})
        if p.optimizer == "prodigy":
            from prodigyopt import Prodigy
            return Prodigy(groups, betas=p.adam_betas, weight_decay=p.weight_decay, safeguard_warmup=True,
                           use_bias_correction=True)
        return torch.optim.AdamW(groups, betas=p.adam_betas, weight_decay=p.weight_decay)

    def _fingerprint(self) -> str:
        doc = {k: v for k, v in as_dict(self.p).items() if k not in NOT_TRAJECTORY}
        doc.update(model=self.model.key(), rows=[(r.id, r.prompt) for r in self.rows], format=checkpoint.FORMAT)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def freeze_ti(self) -> None:
        for t in self.ti_params:
            t.requires_grad_(False)
            self.opt.state.pop(t, None)  # a state without its parameter in a group breaks state_dict()
        self.opt.param_groups[-1]["params"] = [q for q in self.opt.param_groups[-1]["params"] if q.requires_grad]
        self.prompts.train_text = bool(self.te_lora)
        log.info("%s: step %d: the new tokens %s freeze (ti_frac %.2f); the LoRA goes on", self.p.SECTION,
                 self.step, self.pivotal.tokens, self.p.ti_frac)

    # ------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict:
        p = self.p
        if self.pivotal and self.step >= p.ti_steps() and self.ti_params[0].requires_grad:
            self.freeze_ti()
        live = open_live(self.run_dir / "live", self.step if self.step else None)
        win, t_win, n_win = Window(3.0), time.perf_counter(), 0
        end = p.steps if stop_at is None else min(stop_at, p.steps)
        params = self.lora_params + self.te_lora + list(self.ti_params)
        while self.step < end:
            step = self.step
            g = seeded(p.seed, step)
            loss = sum(self._micro(self.batches.next(), g) for _ in range(p.grad_accum)) / p.grad_accum
            n_win += p.batch_size * p.grad_accum
            grad_norm = float(torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], p.grad_clip))
            loss = float(loss)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._skip(step, loss, grad_norm)
                continue
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            if self.pivotal:
                self.pivotal.sync_rows()  # the matrices follow the trained rows (a plain lookup agrees)
            self.step = step + 1
            self.counters["nonfinite_in_a_row"] = 0
            if win.spike(loss) is not None:
                self.counters["spikes"] += 1
                log.warning("%s: loss spike at step %d: %.4g", p.SECTION, self.step, loss)
            win.add({"loss": loss, "grad_norm": grad_norm})
            if self.pivotal and self.step == p.ti_steps():
                self.freeze_ti()
            if self.step % p.log_every == 0 or self.step == end:
                self._log(live, win.flush(), n_win / (time.perf_counter() - t_win))
                t_win, n_win = time.perf_counter(), 0
            if self.step % p.checkpoint_every == 0 or self.step == end:
                checkpoint.save(self, loss)
        live.end()
        return {"step": self.step, **self.counters}

    def _micro(self, batch: list[data.Row], g: torch.Generator) -> torch.Tensor:
        p = self.p
        latents = data.load_latents(batch, self.scaling, p.latent_sample, g).to(self.device)
        prompts = [("" if torch.rand((), generator=g).item() < p.caption_dropout else r.prompt) for r in batch]
        noisy, t, target = self.objective.prepare(latents, g)
        loss = loop.unet_loss(self, self.unet, prompts, [r.time_ids for r in batch], noisy, t, target)
        (loss / p.grad_accum).backward()
        return loss.detach()

    def _skip(self, step: int, loss: float, grad_norm: float) -> None:
        last = checkpoint.finished(self.run_dir / "checkpoints")
        loop.skip(self, step, loss, grad_norm, last[-1][1] if last else None)

    def _log(self, live, figures: dict, samples_per_s: float) -> None:
        loop.log_point(self, live, figures, samples_per_s)

"""The SDXL full fine-tune (bigASP v2.5), read top to bottom in `fit`: a global batch of one bucket
and chunk count → this rank's slice → per sample: its latent, its on-the-fly prompt, its timestep
and noise → the UNet under bf16 autocast on fp32 weights → gradients averaged over ranks → clip →
(skip a non-finite step) → AdamW, schedule, EMA → log, checkpoint.

One process, or many under torchrun: `parallel: ddp` (DistributedDataParallel) or `fsdp` (FSDP2
`fully_shard` with reshard_after_forward=False, which is FSDP1's SHARD_GRAD_OP: parameters stay
gathered from forward to backward, gradients and optimizer state are sharded). Every sample's
randomness comes from a generator seeded by (seed, step, micro, its place in the global batch),
so a 2-rank run computes the 1-rank run's step with the same global batch, and a resume is exact.

Shared with the LoRA trainer: tasks/sdxl/data.py (rows, bucket batches), text.py (the 75-token
chunks and their cache), models/sdxl/objective.py, the sampler; its checkpoints are
tasks/sdxl/full_checkpoint.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.hub import SetupError
from models.sdxl import pipeline as sdxl
from models.sdxl.objective import Objective
from tasks.core.params import as_dict
from tasks.sdxl import data, full_checkpoint, loop, prompts as on_the_fly
from tasks.sdxl.full_params import NOT_TRAJECTORY, FullParams
from tasks.sdxl.text import Prompts
from tasks.training.live import Window, open_live
from tasks.training.run import distributed, seeded

log = logging.getLogger("niche.train_sdxl")


def lr_lambda(p: FullParams):
    """Linear warmup, then constant or cosine to 0 at the last step (bigASP)."""
    def f(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        if p.schedule == "constant":
            return 1.0
        span = max(p.steps - p.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - p.warmup_steps, span) / span))
    return f


def shard(unet, reshard_after_forward: bool = False) -> None:
    """FSDP2 over the UNet: one unit per down/mid/up block (a block's parameters are gathered for
    its forward and kept for its backward), then the root for the rest (embeddings, conv in/out)."""
    from torch.distributed.fsdp import fully_shard

    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(unet, reshard_after_forward=reshard_after_forward)


class FullTrainer:
    def __init__(self, p: FullParams, root: Path = Path(".")):
        self.p, self.root = p, Path(root)
        if p.parallel == "fsdp" and "LOCAL_RANK" in os.environ and not dist.is_initialized():
            # FSDP on one torchrun process (to measure its overhead) still needs a process group.
            cuda = torch.cuda.is_available()
            dist.init_process_group("nccl" if cuda else "gloo",
                                    device_id=torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else None)
        self.rank, self.world, local = distributed()
        self.device = self._device(local)
        self.bf16 = p.precision == "bf16" or (p.precision == "auto" and self.device.type == "cuda")
        self.run_dir = self.root / "runs" / p.run
        self.rows = data.load_rows(self.root, p)
        self.holdout = self._holdout()
        self.model = sdxl.resolve_sdxl(p.model, f"{p.SECTION}.model")
        param = f"{p.SECTION}.model"
        # fp32 master weights: autocast computes in bf16, AdamW updates fp32 (bigASP: "float32 params, bf16 amp").
        self.unet = sdxl.load_unet(self.model, param, torch.float32, str(self.device)).train()
        text_dtype = torch.float32 if p.train_text_encoders or not self.bf16 else torch.bfloat16
        self.text = sdxl.load_text_encoders(self.model, param, text_dtype, str(self.device))
        self.text_params = []
        for enc in (self.text.text_encoder, self.text.text_encoder_2):
            enc.requires_grad_(p.train_text_encoders)
            if p.train_text_encoders:
                enc.train()
                self.text_params += list(enc.parameters())
                if p.gradient_checkpointing:
                    enc.gradient_checkpointing_enable()
        if p.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.prompts = Prompts(p, self.text, None, self.device)
        self.prompts.train_text = p.train_text_encoders
        self.prompts.cacheable = {r.prompt for r in self.rows} | {""}
        chunks = self.prompts.chunks([r.prompt for r in self.rows])
        self.batches = data.BucketBatches(self.rows, p.batch_size * self.world, p.seed, chunks)
        self.objective = Objective(p.objective, sdxl.load_scheduler_config(self.model, param), p.noise_offset,
                                   p.t_shift)
        self.scaling = float(sdxl.load_vae_config(self.model, param)["scaling_factor"])
        # What a checkpoint holds, by name: "unet.*", and "te1.*" / "te2.*" when the text side trains.
        parts = {"unet": self.unet}
        if p.train_text_encoders:
            parts.update(te1=self.text.text_encoder, te2=self.text.text_encoder_2)
        self.trainable = torch.nn.ModuleDict(parts)
        self.forward_unet = self._wrap()
        self.lr = p.scaled_lr(self.world)
        groups = [{"params": [q for q in self.unet.parameters()], "lr": self.lr, "name": "unet"}]
        if self.text_params:
            groups.append({"params": self.text_params, "lr": p.text_encoder_lr, "name": "text"})
        self.opt = torch.optim.AdamW(groups, betas=p.adam_betas, eps=p.adam_eps, weight_decay=p.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(p))
        # The EMA follows the (possibly sharded) weights shard by shard; saved whole.
        self.ema = ({n: q.detach().clone() for n, q in self.trainable.named_parameters()} if p.ema else None)
        self.fp = self._fingerprint()
        self.step, self.counters = 0, {"skipped_steps": 0, "nonfinite_in_a_row": 0, "spikes": 0}
        self.window = Window(p.spike_factor)
        full_checkpoint.resume(self)
        if self.rank == 0:
            log.info("%s: %d samples, %d rank(s) (%s), effective batch %d (%d per device x %d accumulation x %d), "
                     "lr %.3g (%s scaling)", p.SECTION, len(self.rows), self.world, p.parallel if self.world > 1
                     else "one process", p.effective_batch(self.world), p.batch_size, p.grad_accum, self.world,
                     self.lr, p.lr_scaling)

    # ------------------------------------------------------------ set-up
    def _device(self, local: int) -> torch.device:
        p = self.p
        if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise SetupError(f"{p.SECTION}.device: cuda, but torch sees no CUDA device")
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def _holdout(self) -> list[data.Row]:
        if not self.p.val_timesteps or self.p.split == "holdout":
            return []
        try:
            return data.load_rows(self.root, dataclasses.replace(self.p, split="holdout"))
        except data.NoSamples:
            log.info("%s: no holdout samples: no held-out loss (ingest.holdout_count)", self.p.SECTION)
            return []

    def _wrap(self):
        if self.p.parallel == "fsdp" and dist.is_initialized():
            shard(self.unet)
            return self.unet
        if self.p.parallel == "fsdp":
            log.info("%s: parallel fsdp in one process (not under torchrun): nothing to shard, trained as is",
                     self.p.SECTION)
        if self.world > 1:
            return torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return self.unet

    def _fingerprint(self) -> str:
        doc = {k: v for k, v in as_dict(self.p).items() if k not in NOT_TRAJECTORY}
        doc.update(model=self.model.key(), rows=[(r.id, r.prompt, r.tags) for r in self.rows],
                   global_batch=self.p.batch_size * self.world, format=full_checkpoint.FORMAT)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict:
        p = self.p
        live = open_live(self.run_dir / "live", self.step if self.step else None) if self.rank == 0 else None
        t_win, n_win = time.perf_counter(), 0
        end = p.steps if stop_at is None else min(stop_at, p.steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < end:
            step = self.step
            loss = torch.zeros((), device=self.device)
            for micro in range(p.grad_accum):
                batch = self.batches.next()
                last = micro == p.grad_accum - 1
                loss += self._micro(batch, step, micro, sync=last) / p.grad_accum
                n_win += len(batch)
            self._sync_text_grads()
            grad_norm = self._clip()
            loss = self._mean(loss)
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._skip(step, loss, grad_norm)
                continue
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sched.step()
            self._ema_update(step)
            self.step = step + 1
            self.counters["nonfinite_in_a_row"] = 0
            if self.window.spike(loss) is not None:
                self.counters["spikes"] += 1
                log.warning("%s: loss spike at step %d: %.4g", p.SECTION, self.step, loss)
            self.window.add({"loss": loss, "grad_norm": grad_norm})
            if live is not None and (self.step % p.log_every == 0 or self.step == p.steps):
                self._log(live, self.window.flush(), n_win / (time.perf_counter() - t_win))
                t_win, n_win = time.perf_counter(), 0
            if self.step % p.checkpoint_every == 0 or self.step == end:
                val = self.val_loss()
                if live is not None and val is not None:
                    live.step = self.step
                    live.log_metric("val/loss", val)
                full_checkpoint.save(self, loss, val)
        if live is not None:
            live.end()
        return {"step": self.step, **self.counters}

    def _micro(self, batch: list[data.Row], step: int, micro: int, sync: bool) -> torch.Tensor:
        """This rank's share of one micro-batch, forward and backward; its mean loss (detached)."""
        p = self.p
        places, mine = zip(*data.rank_slice(batch, self.rank, self.world))
        gens = [seeded(p.seed, step, micro, i) for i in places]
        latents = torch.cat([data.load_latents([r], self.scaling, p.latent_sample, g) for r, g in zip(mine, gens)])
        latents = latents.to(self.device)
        texts = [on_the_fly.build(r.prompt, r.tags, p, g) for r, g in zip(mine, gens)]
        parts = [self.objective.prepare(latents[i:i + 1], g) for i, g in enumerate(gens)]
        noisy, t, target = (torch.cat(x) for x in zip(*parts))
        with self._no_sync(sync):
            loss = loop.unet_loss(self, self.forward_unet, texts, [r.time_ids for r in mine], noisy, t, target)
            (loss / p.grad_accum).backward()
        return loss.detach()

    @torch.no_grad()
    def val_loss(self) -> float | None:
        """The objective's loss on the holdout at `val_timesteps` fixed noise levels with fixed noise
        (bigASP's test loss): one number per checkpoint that can be compared, where the training
        loss moves with each step's random timesteps. Every rank computes it alike (FSDP's forward
        needs them all); the UNet is called unwrapped (no gradient, nothing to synchronise)."""
        if not self.holdout:
            return None
        p, k = self.p, self.p.val_timesteps
        t = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        total = 0.0
        for i, r in enumerate(self.holdout):
            g = seeded(p.seed, 2**31, i)  # the same noise at every checkpoint
            x = data.load_latents([r], self.scaling, False, g).expand(k, -1, -1, -1).to(self.device)
            noise = torch.randn(x.shape[1:], generator=g).expand_as(x).to(self.device)
            noisy, steps, target = self.objective.at(x, t.to(self.device), noise)
            total += float(loop.unet_loss(self, self.unet, [r.prompt] * k, [r.time_ids] * k, noisy, steps, target))
        return total / len(self.holdout)

    def _no_sync(self, sync: bool):
        """Gradients are averaged over ranks on the last micro-step of a step only."""
        if self.world == 1 or sync:
            if self.p.parallel == "fsdp" and self.world > 1:
                self.unet.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.p.parallel == "fsdp":
            self.unet.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.forward_unet.no_sync()

    def _sync_text_grads(self) -> None:
        """The text encoders are replicated, not wrapped: their gradients are averaged here."""
        if self.world > 1 and self.text_params:
            for q in self.text_params:
                if q.grad is not None:
                    dist.all_reduce(q.grad)
                    q.grad /= self.world

    def _clip(self) -> float:
        """Clip all trained weights by their joint norm; the norm before clipping. The UNet's and the
        text encoders' norms are taken apart: under FSDP the first are DTensor shards, the others not."""
        groups = [[q.grad for q in self.unet.parameters() if q.grad is not None],
                  [q.grad for q in self.text_params if q.grad is not None]]
        sq = 0.0
        for grads in groups:
            if grads:
                n = torch.nn.utils.get_total_norm(grads)
                sq += float(n.full_tensor() if hasattr(n, "full_tensor") else n) ** 2
        norm = math.sqrt(sq)
        if self.p.grad_clip and math.isfinite(norm) and norm > self.p.grad_clip:
            for grads in groups:  # apart: a foreach op may not mix DTensors and tensors
                if grads:
                    torch._foreach_mul_(grads, self.p.grad_clip / (norm + 1e-6))
        return norm

    def _mean(self, loss: torch.Tensor) -> float:
        if self.world > 1:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= self.world
        return float(loss)

    @torch.no_grad()
    def _ema_update(self, step: int) -> None:
        if self.ema is None:
            return
        decay = min(self.p.ema_decay, (1 + step) / (10 + step))  # the usual ramp: early weights fade out
        params = dict(self.trainable.named_parameters())
        for part in self.trainable:  # apart: under FSDP the UNet's are DTensors, the text encoders' not
            names = [n for n in self.ema if n.startswith(part + ".")]
            torch._foreach_lerp_([self.ema[n] for n in names], [params[n].detach() for n in names], 1.0 - decay)

    def _skip(self, step: int, loss: float, grad_norm: float) -> None:
        last = full_checkpoint.finished(self.run_dir / "checkpoints")
        loop.skip(self, step, loss, grad_norm, last[-1][1] if last else None)

    def _log(self, live, figures: dict, samples_per_s: float) -> None:
        loop.log_point(self, live, figures, samples_per_s)

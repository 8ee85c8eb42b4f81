"""train: NanoDiT, pixel-space flow matching, on the shard stage's tars.

    python -m tasks.train                                  # one process (dvc.yaml runs this)
    torchrun --nproc_per_node 8 -m tasks.train             # DDP; gloo on CPU, NCCL on CUDA
    python -m tasks.train --stop-at 1200                   # checkpoint at 1200 and stop

A run lives in runs/<run>/: checkpoints/ (tasks/training/checkpoints.py), samples/ (the
fixed 4-image grid every `sample_every` steps: the conditioning images on top,
the EMA model's samples below) and live/ (dvclive metrics).

Resume: the newest checkpoint is continued when it was made by the same
settings (the run's fingerprint: every parameter that changes what is computed,
the shards and the number of ranks). Anything else in runs/<run> is moved aside
to runs/<run>.superseded-<fingerprint>/ — never deleted — and training starts
over. Resuming is exact: each micro-step's randomness (timesteps, noise, CFG
categories, TREAD routing) comes from a generator seeded by (seed, step, micro,
rank), the loader continues from its saved position, and the losses after a
resume are those of a run that never stopped.

A non-finite loss or gradient skips the optimizer step (counted); `nan_patience`
such steps in a row stop the run with the last good checkpoint untouched.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.flow_matching import cfg_keep, euler_sample, loss_terms
from models.hub import SetupError
from models.nanodit import Conditioning, NanoDiT
from tasks.training import checkpoints as train_state
from tasks.data.loader import ShardLoader
from tasks.core.params import as_dict
from tasks.core.stage import section_or_exit, setup_logging
from tasks.training.live import Window, grid, open_live, save_png, to_uint8
from tasks.nanodit.params import NOT_TRAJECTORY, TrainParams

log = logging.getLogger("niche.train")
DATASET_SECTIONS = ("bucket", "caption", "embed_text", "embed_image", "embed_pose", "shard")


class TrainError(Exception):
    """The run cannot go on; the message says why and what is intact."""


# ---------------------------------------------------------------- set-up
def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank), starting the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def pick_device(p: TrainParams, local_rank: int) -> torch.device:
    if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError("train.device: cuda, but torch sees no CUDA device (set it to auto or cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seeded(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


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


# The 2-D weights that AdamW trains even under `optimizer: muon`: the layers that read a raw
# signal or write the output. Muon orthogonalises each update (every singular value alike),
# which suits hidden matrices mixing learned features; on the pixels in and out, the sinusoidal
# timestep features, or pose_mlp's rank-3 input (a joint's x, y, confidence) it would spread
# the step evenly over directions the input barely spans.
ADAMW_WEIGHTS = frozenset({"patch_in.weight", "patch_out.weight", "t_embed.0.weight", "pose_mlp.0.weight"})


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


def to_inputs(batch: dict, scale: float, patch: int, device: torch.device) -> tuple[torch.Tensor, Conditioning]:
    x0 = batch["image"].to(device, non_blocking=True).float() / 127.5 - 1
    if scale != 1.0:
        H, W = x0.shape[-2:]
        size = (max(patch, round(H * scale / patch) * patch), max(patch, round(W * scale / patch) * patch))
        x0 = F.interpolate(x0, size=size, mode="bilinear", antialias=True, align_corners=False)
    B = x0.shape[0]
    cond = Conditioning(batch["t5"].to(device).float(), batch["t5_mask"].to(device),
                        batch["dino_cls"].to(device).float(), batch["dino_patches"].to(device).float(),
                        batch["pose"].to(device).float(), torch.ones(B, 4, dtype=torch.bool, device=device))
    return x0, cond


def forever(loader: ShardLoader):
    while True:
        n = 0
        for batch in loader:
            n += 1
            yield batch
        if n == 0:  # an empty split, or every shard of this rank unreadable (skipped, logged)
            raise TrainError("train: a whole epoch gave this rank no batch; see the loader's warnings")


def fingerprint(p: TrainParams, loader: ShardLoader, world: int) -> str:
    doc = {k: v for k, v in as_dict(p).items() if k not in NOT_TRAJECTORY}
    # format 2: the EMA ramp and AdamW for t_embed's and pose_mlp's first layers (a format-1
    # checkpoint's Muon state would not even load into the new split).
    doc.update(shards=loader._config()["shards"], world_size=world, format=2)
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def supersede(run_dir: Path, why: str) -> None:
    parts = [d for d in ("checkpoints", "samples", "live") if (run_dir / d).exists() and any((run_dir / d).iterdir())]
    if not parts:
        return
    dest = run_dir.with_name(f"{run_dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    dest.mkdir(parents=True)
    for d in parts:
        shutil.move(str(run_dir / d), str(dest / d))
    log.warning("train: %s; the previous run's files were moved to %s and training starts over", why, dest)


def grid_guidance(p: TrainParams) -> str:
    """The guidance for the sample grid and the checkpoint's sampling default: `sample_guidance`,
    except "self" (dense vs TREAD-routed) becomes "cfg" when the run trains without TREAD, since
    a model that never trained routed has no meaningful routed prediction to guide against."""
    if p.sample_guidance == "self" and not p.tread:
        log.info("train: sample_guidance self needs TREAD (train.tread is false); sampling with cfg instead")
        return "cfg"
    return p.sample_guidance


def dataset_params(params_file: Path) -> dict:
    import yaml
    doc = yaml.safe_load(params_file.read_text(encoding="utf-8")) or {}
    return {k: doc.get(k) for k in DATASET_SECTIONS}


# ---------------------------------------------------------------- the run
class Trainer:
    def __init__(self, p: TrainParams, root: Path = Path("."), params_file: Path = Path("params.yaml")):
        self.p, self.root = p, Path(root)
        self.rank, self.world, local = distributed()
        self.device = pick_device(p, local)
        self.bf16 = p.precision == "bf16" or (p.precision == "auto" and self.device.type == "cuda")
        self.run_dir = self.root / "runs" / p.run
        shards = p.shards if "://" in p.shards else str(self.root / p.shards)
        try:
            self.loader = ShardLoader(shards, split="train", batch_size=p.batch_size, seed=p.seed,
                                      rank=self.rank, world_size=self.world, num_workers=p.num_workers,
                                      shuffle_buffer=p.shuffle_buffer, flip=p.flip, on_error="skip",
                                      endpoint_url=p.endpoint_url, pin_memory=self.device.type == "cuda")
        except ValueError as e:  # no shards.parquet, no train split
            raise TrainError(f"train.shards: {e}") from None
        empty = [r for r, n in enumerate(self.loader.batches_per_rank()) if n == 0]
        if empty:
            raise TrainError(f"train: rank(s) {empty} get no batches from {p.shards} (split train: "
                             f"{len(self.loader.shards)} shards for {self.world} ranks); rebuild the shards "
                             "with shard.min_shards >= ranks x loader workers")
        self.fixed = self._fixed_samples(shards)
        first = self.fixed[0]
        img, h = first["image"], first["dino_patches"].shape[1]
        self.dims = {"text_dim": int(first["t5"].shape[-1]), "dino_dim": int(first["dino_cls"].shape[-1]),
                     "dino_pool": max(1, int(img.shape[-2]) // (16 * h))}
        with torch.random.fork_rng(devices=[]):  # the initial weights are a function of the seed alone
            torch.manual_seed(p.seed)
            self.model = NanoDiT.preset(p.preset, patch_size=p.patch_size, text_dim=self.dims["text_dim"],
                                        dino_dim=self.dims["dino_dim"], repa_block=p.repa_block if p.repa else None,
                                        tread_start=p.tread_start, tread_end=p.tread_end).to(self.device)
        if p.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opts = optimizers(self.model, p)
        self.scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(p, s)) for o in self.opts]
        self.fp = fingerprint(p, self.loader, self.world)
        self.guidance = grid_guidance(p)
        self.meta_base = {"fingerprint": self.fp, "params": as_dict(p), "data": self.dims,
                          "dataset_params": dataset_params(self.root / params_file), "world_size": self.world,
                          "sampling": {"steps": p.sample_steps, "guidance": self.guidance,
                                       "scale": p.guidance_scale, "scale_dino": p.guidance_scale_dino,
                                       "route": p.tread_rate, "shift": p.t_shift}}
        self.step, self.counters = 0, {"skipped_steps": 0, "nonfinite_in_a_row": 0, "spikes": 0}
        # The figures summed since the last log line, and the spike detector's running mean: part
        # of the checkpoint, so a resumed run logs the very points an uninterrupted one would.
        self.win = Window(p.spike_factor)
        self._resume()
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[local] if self.device.type
                                                              == "cuda" else None)
                    if self.world > 1 else self.model)

    def _fixed_samples(self, shards: str, n: int = 4) -> list[dict]:
        """The grid's samples, one batch of one each (buckets differ): the first `n` of the holdout
        split (then train), the same every time for these shards and seed."""
        found: list[dict] = []
        for split in ("holdout", "train"):
            try:
                with ShardLoader(shards, split=split, batch_size=1, seed=self.p.seed, num_workers=0,
                                 shuffle_buffer=0, on_error="skip", endpoint_url=self.p.endpoint_url) as ld:
                    for batch in ld:
                        found.append(batch)
                        if len(found) == n:
                            return found
            except ValueError as e:  # no such split
                log.info("train: no %s samples for the grid (%s)", split, e)
        if not found:
            raise TrainError(f"train: {self.p.shards} holds no readable samples")
        return found

    def _resume(self) -> None:
        # Rank 0 alone looks and moves the old run aside, and only then tells the others what to
        # load: a rank reading runs/<run>/checkpoints while rank 0 moves it would lose it halfway.
        chosen = [self._resumable_or_supersede() if self.rank == 0 else None]
        if self.world > 1:
            dist.broadcast_object_list(chosen, src=0)
        if chosen[0] is not None:
            self._load(chosen[0], train_state.read_meta(chosen[0]))

    def _resumable_or_supersede(self) -> Path | None:
        """The checkpoint to resume from; None after moving anything else in the run aside."""
        ckpt = train_state.latest(self.run_dir / "checkpoints")
        if ckpt is not None and self.p.resume == "auto":
            meta = train_state.read_meta(ckpt)
            if meta.get("fingerprint") == self.fp:
                return ckpt
            why = f"{ckpt} was made with other settings or shards (fingerprint {meta.get('fingerprint', '?')[:12]})"
        else:
            why = "train.resume is never" if ckpt is not None else "no checkpoint to resume from"
        supersede(self.run_dir, why)
        return None

    def _load(self, ckpt: Path, meta: dict) -> None:
        state = train_state.load_state(ckpt)
        self.model.load_state_dict(NanoDiT.from_pretrained(ckpt / "model").state_dict())
        self.ema.load_state_dict(NanoDiT.from_pretrained(ckpt / "ema").state_dict())
        for o, s in zip(self.opts, state["optimizers"]):
            o.load_state_dict(s)
        for sc, s in zip(self.scheds, state["schedulers"]):
            sc.load_state_dict(s)
        self.loader.load_state_dict(state["loader"][self.rank])
        train_state.set_rng_state(state["rng"])
        self.step, self.counters = int(meta["step"]), dict(state["counters"])
        if "window" in state:
            self.win.load_state_dict(state["window"])
        log.info("train: resumed from %s (step %d of %d)", ckpt, self.step, self.p.steps)

    # ------------------------------------------------------------ one step
    def _micro(self, batch: dict, step: int, micro: int) -> dict:
        p = self.p
        x0, cond = to_inputs(batch, p.scale_at(step), p.patch_size, self.device)
        g = seeded(p.seed, step, micro, self.rank)
        cond = cond.with_keep(cfg_keep(x0.shape[0], p.cfg_dropout.probs(), g, self.device))
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            terms = loss_terms(self.ddp, x0, cond, p.objective(), g)
        (terms["loss"] / p.grad_accum).backward()
        # Left on the device: one host sync per optimizer step, not one per term and micro-step.
        return {k: (v.detach().float() if torch.is_tensor(v) else float(v)) for k, v in terms.items()}

    def _all_finite(self, loss: float, grad_norm: float) -> bool:
        ok = torch.tensor([float(math.isfinite(loss) and math.isfinite(grad_norm))], device=self.device)
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def _mean(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([x], device=self.device, dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    @torch.no_grad()
    def _ema_update(self, step: int) -> None:
        decay = ema_decay_at(step, self.p)
        ema, cur = list(self.ema.parameters()), list(self.model.parameters())
        torch._foreach_lerp_(ema, cur, 1.0 - decay)

    def fit(self, stop_at: int | None = None) -> dict:
        p, batches = self.p, forever(self.loader)
        live = open_live(self.run_dir / "live", self.step if self.step else None) if self.rank == 0 else None
        win, t_win, samples_win = self.win, time.perf_counter(), 0
        end = p.steps if stop_at is None else min(stop_at, p.steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while self.step < end:
            step = self.step
            self.model.train()
            figures: dict[str, float] = {}
            for micro in range(p.grad_accum):
                batch = next(batches)
                sync = micro == p.grad_accum - 1 or self.world == 1
                ctx = self.ddp.no_sync() if not sync else contextlib.nullcontext()
                with ctx:
                    for k, v in self._micro(batch, step, micro).items():
                        figures[k] = figures.get(k, 0.0) + v / p.grad_accum
                samples_win += len(batch["ids"]) * self.world
            figures = {k: float(v) for k, v in figures.items()}
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), p.grad_clip))
            loss = self._mean(figures["loss"])
            if not self._all_finite(figures["loss"], grad_norm):
                self._skip(step, loss, grad_norm)
                continue
            for o in self.opts:
                o.step()
            for o in self.opts:
                o.zero_grad(set_to_none=True)
            for s in self.scheds:
                s.step()
            self._ema_update(step)
            self.step = step + 1
            self.counters["nonfinite_in_a_row"] = 0
            mean = win.spike(loss)
            if mean is not None:
                self.counters["spikes"] += 1
                log.warning("train: loss spike at step %d: %.4g (running mean %.4g)", self.step, loss, mean)
            win.add({**figures, "loss": loss, "grad_norm": grad_norm})
            # Not at a --stop-at step off the log_every grid: its window goes into the checkpoint
            # and the resumed run logs it where an uninterrupted run would.
            if live is not None and (self.step % p.log_every == 0 or self.step == p.steps):
                elapsed = time.perf_counter() - t_win
                self._log(live, win.flush(), samples_win / elapsed)
                t_win, samples_win = time.perf_counter(), 0
            if self.step % p.checkpoint_every == 0 or self.step == end:
                self.save(loss)
            if self.rank == 0 and (self.step % p.sample_every == 0 or self.step == end):
                self.sample_grid()
        if live is not None:
            live.end()
        return {"step": self.step, **self.counters}

    def _skip(self, step: int, loss: float, grad_norm: float) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        self.counters["skipped_steps"] += 1
        self.counters["nonfinite_in_a_row"] += 1
        n = self.counters["nonfinite_in_a_row"]
        log.warning("train: step %d skipped: loss %s, grad norm %s (%d in a row, %d skipped in all)",
                    step + 1, loss, grad_norm, n, self.counters["skipped_steps"])
        if n >= self.p.nan_patience:
            last = train_state.latest(self.run_dir / "checkpoints")
            raise TrainError(f"train: {n} steps in a row had a non-finite loss or gradient (train.nan_patience "
                             f"= {self.p.nan_patience}); stopped at step {step}. The last good checkpoint is "
                             f"{last or 'none yet'}; lower train.lr, check the data, or raise grad clipping.")

    def _log(self, live, figures: dict, samples_per_s: float) -> None:
        live.step = self.step
        names = {"loss": "train/loss", "mse": "train/mse", "repa": "train/repa_loss",
                 "grad_norm": "train/grad_norm", "velocity_rms": "train/velocity_rms",
                 "active_tokens": "sys/active_tokens"}
        for k, name in names.items():
            if k in figures:
                live.log_metric(name, figures[k])
        live.log_metric("train/lr", self.scheds[0].get_last_lr()[0])
        live.log_metric("train/image_scale", self.p.scale_at(self.step - 1))
        live.log_metric("train/skipped_steps", self.counters["skipped_steps"])
        live.log_metric("sys/samples_per_s", samples_per_s)
        live.log_metric("memory/peak_gb", peak_memory_gb(self.device))
        live.next_step()
        log.info("train: step %d/%d loss %.4f grad %.3f %.2f samples/s", self.step, self.p.steps,
                 figures["loss"], figures["grad_norm"], samples_per_s)

    def save(self, loss: float) -> None:
        states = [self.loader.state_dict()]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, states[0])
            states = gathered
        if self.rank == 0:
            state = {"optimizers": [o.state_dict() for o in self.opts],
                     "schedulers": [s.state_dict() for s in self.scheds], "loader": states,
                     "rng": train_state.rng_state(), "counters": dict(self.counters),
                     "window": self.win.state_dict()}
            meta = {**self.meta_base, "step": self.step, "loss": loss, "time": time.time()}
            path = train_state.save(self.run_dir / "checkpoints", self.step, self.model, self.ema, state, meta,
                                    self.p.keep_checkpoints)
            log.info("train: checkpoint %s", path)
        if self.world > 1:
            dist.barrier()

    @torch.no_grad()
    def sample_grid(self) -> Path:
        p, refs, outs = self.p, [], []
        scale = p.scale_at(self.step - 1)  # the size the step just taken trained at (resolution_schedule)
        for i, batch in enumerate(self.fixed):
            x0, cond = to_inputs(batch, scale, p.patch_size, self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                images = euler_sample(self.ema, cond, tuple(x0.shape[-2:]), steps=p.sample_steps,
                                      guidance=self.guidance, scale=p.guidance_scale,
                                      scale_dino=p.guidance_scale_dino, route=p.tread_rate,
                                      shift=p.t_shift, seed=p.seed + i)
            refs.append(to_uint8(x0)[0])
            outs.append(to_uint8(images)[0])
        sheet = grid([refs, outs])
        path = self.run_dir / "samples" / f"step-{self.step:06d}.png"
        save_png(path, sheet)  # dvc.yaml shows this folder as image plots
        return path


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB → GiB (process peak RSS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train NanoDiT on the shards (params.yaml: train).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stop-at", type=int, default=None, help="checkpoint after this step and stop")
    args = ap.parse_args(argv)
    setup_logging()
    p = section_or_exit(TrainParams, "train", args.params)
    try:
        trainer = Trainer(p, params_file=Path(args.params))
        result = trainer.fit(stop_at=args.stop_at)
    except (SetupError, TrainError) as e:
        sys.exit(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log.info("train: done %s", json.dumps(result))


if __name__ == "__main__":
    main()

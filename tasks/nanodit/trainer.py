"""The NanoDiT training loop, read top to bottom in `fit`: batch → micro-steps with their seeded
randomness → clip → (skip a non-finite step) → optimizer, schedule, EMA → log, checkpoint, grid.

The parts it calls each do one job: tasks/nanodit/data.py (batches, inputs, fingerprint),
optim.py (optimizers, schedules, EMA), checkpoint.py (resume and save), log.py (dvclive, grid).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models.flow_matching import cfg_keep, loss_terms
from models.hub import SetupError
from models.nanodit import NanoDiT
from tasks.core.params import as_dict
from tasks.core.store import atomic_write_json
from tasks.nanodit import data, log as runlog, optim
from tasks.nanodit.checkpoint import Checkpointer, RunState
from tasks.nanodit.params import TrainParams
from tasks.training.live import Window, open_live
from tasks.training.run import TrainError, distributed, peak_memory_gb, seeded

log = logging.getLogger("niche.train")


def pick_device(p: TrainParams, local_rank: int) -> torch.device:
    if p.device == "cuda" or (p.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SetupError("train.device: cuda, but torch sees no CUDA device (set it to auto or cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def narrow_warning(model: NanoDiT, p: TrainParams, rank: int = 0) -> None:
    """Warn when the model is under half as wide as a patch has values: its output layer spans
    only `width` of a patch's dimensions, so most of a patch's detail cannot come out and samples
    stay blocky (the tiny preset at patch 16: 64 wide for 768 values). The small preset at patch
    8, as wide as its patch, memorises 4 photographs in 2,000 CPU steps (bench/bench_learn.py);
    JiT's bottleneck results say a narrower model can still generate well, hence only under half."""
    width, values = model.config.hidden_size, model.config.in_channels * p.patch_size ** 2
    if 2 * width < values and rank == 0:
        fitting = 1 << (int((width / model.config.in_channels) ** 0.5).bit_length() - 1)  # a power of two
        log.warning("train: preset %s is %d wide, under half a %d-px patch's %d values: most of a patch's detail "
                    "cannot come out and samples stay blocky; for detail use train.patch_size %d or a wider "
                    "preset", p.preset, width, p.patch_size, values, fitting)


class Trainer:
    def __init__(self, p: TrainParams, root: Path = Path("."), params_file: Path = Path("params.yaml")):
        self.p, self.root = p, Path(root)
        self.rank, self.world, local = distributed()
        self.device = pick_device(p, local)
        self.bf16 = p.precision == "bf16" or (p.precision == "auto" and self.device.type == "cuda")
        self.run_dir = self.root / "runs" / p.run
        self.loader = data.open_loader(p, self.root, self.rank, self.world, pin_memory=self.device.type == "cuda")
        self.fixed = data.fixed_samples(p, self.root)
        self.dims = data.data_dims(self.fixed[0])
        with torch.random.fork_rng(devices=[]):  # the initial weights are a function of the seed alone
            torch.manual_seed(p.seed)
            self.model = NanoDiT.preset(p.preset, patch_size=p.patch_size, text_dim=self.dims["text_dim"],
                                        dino_dim=self.dims["dino_dim"], repa_block=p.repa_block if p.repa else None,
                                        tread_start=p.tread_start, tread_end=p.tread_end).to(self.device)
        if p.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        narrow_warning(self.model, p, self.rank)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.opts = optim.optimizers(self.model, p)
        self.scheds = optim.schedulers(self.opts, p)
        self.fp = data.fingerprint(p, self.loader, self.world)
        self.guidance = runlog.grid_guidance(p)
        self.meta_base = {"fingerprint": self.fp, "params": as_dict(p), "data": self.dims,
                          "dataset_params": data.dataset_params(self.root / params_file), "world_size": self.world,
                          "sampling": {"steps": p.sample_steps, "guidance": self.guidance,
                                       "scale": p.guidance_scale, "scale_dino": p.guidance_scale_dino,
                                       "route": p.tread_rate, "shift": p.t_shift}}
        # The step, counters and the figures summed since the last log line (with the spike
        # detector's running mean): checkpointed, so a resumed run logs what an uninterrupted one would.
        self.state = RunState(0, {"skipped_steps": 0, "nonfinite_in_a_row": 0, "spikes": 0}, Window(p.spike_factor))
        self.ckpt = Checkpointer(self.run_dir, self.model, self.ema, self.opts, self.scheds, self.loader,
                                 self.rank, self.world, p.keep_checkpoints)
        self.ckpt.resume(self.fp, p.resume, self.state)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(self.model, device_ids=[local] if self.device.type
                                                              == "cuda" else None)
                    if self.world > 1 else self.model)

    @property
    def step(self) -> int:
        return self.state.step

    # ------------------------------------------------------------ the loop
    def fit(self, stop_at: int | None = None) -> dict:
        p, st, batches = self.p, self.state, data.forever(self.loader)
        live = open_live(self.run_dir / "live", st.step if st.step else None) if self.rank == 0 else None
        t_win, samples_win = time.perf_counter(), 0
        end = p.steps if stop_at is None else min(stop_at, p.steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        while st.step < end:
            step = st.step
            self.model.train()
            figures: dict[str, float] = {}
            for micro in range(p.grad_accum):
                batch = next(batches)
                sync = micro == p.grad_accum - 1 or self.world == 1
                with self.ddp.no_sync() if not sync else contextlib.nullcontext():
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
            optim.ema_update(self.ema, self.model, step, p)
            st.step = step + 1
            st.counters["nonfinite_in_a_row"] = 0
            mean = st.window.spike(loss)
            if mean is not None:
                st.counters["spikes"] += 1
                log.warning("train: loss spike at step %d: %.4g (running mean %.4g)", st.step, loss, mean)
            st.window.add({**figures, "loss": loss, "grad_norm": grad_norm})
            # Not at a --stop-at step off the log_every grid: its window goes into the checkpoint
            # and the resumed run logs it where an uninterrupted run would.
            if live is not None and (st.step % p.log_every == 0 or st.step == p.steps):
                self._log(live, st.window.flush(), samples_win / (time.perf_counter() - t_win))
                t_win, samples_win = time.perf_counter(), 0
            if st.step % p.checkpoint_every == 0 or st.step == end:
                self.ckpt.save(st, loss, self.meta_base)
            if self.rank == 0 and (st.step % p.sample_every == 0 or st.step == end):
                self.sample_grid()
        if live is not None:
            live.end()
        return {"step": st.step, **st.counters}

    # ------------------------------------------------------------ one step
    def _micro(self, batch: dict, step: int, micro: int) -> dict:
        p = self.p
        x0, cond = data.to_inputs(batch, p.scale_at(step), p.patch_size, self.device)
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

    def _skip(self, step: int, loss: float, grad_norm: float) -> None:
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        c = self.state.counters
        c["skipped_steps"] += 1
        c["nonfinite_in_a_row"] += 1
        n = c["nonfinite_in_a_row"]
        log.warning("train: step %d skipped: loss %s, grad norm %s (%d in a row, %d skipped in all)",
                    step + 1, loss, grad_norm, n, c["skipped_steps"])
        if n >= self.p.nan_patience:
            raise TrainError(f"train: {n} steps in a row had a non-finite loss or gradient (train.nan_patience "
                             f"= {self.p.nan_patience}); stopped at step {step}. The last good checkpoint is "
                             f"{self.ckpt.latest() or 'none yet'}; lower train.lr, check the data, or raise grad "
                             "clipping.")

    # ------------------------------------------------------------ what a person sees
    def _log(self, live, figures: dict, samples_per_s: float) -> None:
        st = self.state
        runlog.log_step(live, self.p, st.step, figures, {
            "train/lr": self.scheds[0].get_last_lr()[0], "train/image_scale": self.p.scale_at(st.step - 1),
            "train/skipped_steps": st.counters["skipped_steps"], "sys/samples_per_s": samples_per_s,
            "memory/peak_gb": peak_memory_gb(self.device)})
        # The stage's DVC metric: two columns of `dvc metrics show` (the curves are dvclive's).
        atomic_write_json(self.root / "metrics" / "train.json", {"step": st.step, "loss": round(figures["loss"], 6)})

    def sample_grid(self) -> Path:
        return runlog.sample_grid(self.ema, self.fixed, self.p, self.state.step, self.guidance, self.device,
                                  self.bf16, self.run_dir)

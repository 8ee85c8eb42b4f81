"""Benchmark: training-step throughput of NanoDiT on random inputs and random weights.

Long on purpose: one self-contained script (inputs, the analytic FLOP count and its check
against torch's FlopCounterMode, the timed loop, the report) that is copied to a GPU box and
run alone, so a short device lease is not spent chasing imports.

    .venv/bin/python bench/bench_train.py [--preset tiny|baseline|production] [--size 1024x1024]
        [--batch 8] [--steps 20] [--warmup 5] [--checkpointing on|off] [--tread 0.5]
        [--repa on|off] [--dtype bf16|fp32] [--optimizer adamw|muon] [--text-len 512]
        [--text-dim 1024] [--dino-dim 1024] [--dino-pool 2] [--compare-tread]
        [--peak-flops 989e12] [--json bench/results/train_cuda.json]

No data pipeline: one random batch (image in [-1, 1], T5 tokens, DINO CLS + patches on a
(H/16/pool, W/16/pool) grid, 133 pose joints) stays on the device, and every step is
what the trainer does with it: cfg_keep → loss_terms (flow-matching MSE + REPA) under
autocast → backward → optimizer step. Timed steps follow `--warmup` untimed ones; CUDA
is synchronized around every timed step.

Per run: s/step (mean, median and fastest step: on a CPU shared with other processes the
fastest is the least disturbed), steps/s and samples/s (from the mean), process CPU seconds
a step (host work; on CUDA the Python and launch overhead), peak memory (CUDA:
torch.cuda.max_memory_allocated after reset_peak_memory_stats; CPU: peak RSS above the
pre-run RSS, sampled every 5 ms with psutil after gc + malloc_trim), parameter count,
active image tokens per step (image tokens × blocks actually computed, TREAD's saving), and
the model FLOPs per step from `model_flops` (analytic) with the achieved FLOP/s and, where
the peak is known (H100 / H200, or --peak-flops), the MFU.

`--compare-tread` runs route 0 and route --tread (0.5 when --tread is 0) and reports the
speed-up, both from the two runs and from one more model whose steps alternate between the
two routes (robust to load from other processes). A cross-check counts one forward +
backward of a small config (--xcheck-size, batch 1, math SDPA, no checkpointing) with
torch.utils.flop_counter.FlopCounterMode and prints its ratio to the analytic count.
Prints figures, writes JSON; asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.flow_matching import Objective, cfg_keep, loss_terms  # noqa: E402
from models.nanodit import Conditioning, NanoDiT  # noqa: E402

DINO_PATCH = 16
POSE_JOINTS = 133
# Dense bf16 tensor-core peak, FLOP/s; first substring of the device name that matches wins.
PEAK_BF16 = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
             ("GH200", 989e12))


# ---------------------------------------------------------------- FLOPs
def model_flops(model: NanoDiT, batch: int, size: tuple[int, int], route: float, text_len: int,
                dino_grid: tuple[int, int]) -> dict:
    """Matmul FLOPs of one training step (forward + backward) of `model`, counted analytically.

    Per sample, forward, a matmul (m×k)·(k×n) being 2·m·k·n FLOPs:
        N  = (H/p)·(W/p) image tokens        P = in_channels·p²       D = hidden_size
        M  = int(D·mlp_ratio)                R = repa_hidden          Dd, Dt = DINO, T5 widths
        C  = text_len + 1 + h·w + 133 + 1    (T5 | DINO CLS | DINO patches | pose | register)
        n_i = tokens block i computes: N - int(N·route) inside the TREAD range, else N
        n_r = tokens the REPA projector sees (n_i of block repa_at - 1, N after TREAD's end)

        patch_in      2·N·P·D
        t_embed       2·(256·D + D²)
        context       2·(text_len·Dt·D + Dd·D + h·w·Dd·D + 133·(3·D + D²))
        block i       adaLN       2·D·9D
                      self-attn   8·n_i·D²  (q, kv, out)   + 4·n_i²·D    (QKᵀ, AV)
                      cross-attn  4·n_i·D²  (q, out) + 4·C·D² (kv of the context) + 4·n_i·C·D
                      MLP         4·n_i·D·M
        final         2·D·2D (adaLN) + 2·N·D·P (patch_out)
        REPA          2·n_r·(D·R + R² + R·Dd)

    step = 3 × batch × forward (backward = 2 × forward: the gradients of the inputs and of the
    weights). Recomputation under gradient checkpointing, attention kernels' own recompute,
    elementwise ops, norms and the optimizer (Muon's Newton–Schulz) are not counted: these are
    the useful model FLOPs that MFU divides by. The backward pass of the first layers has no
    input gradient to compute, so 3× slightly overcounts (see the FlopCounterMode cross-check).
    """
    cfg = model.config
    p, D = cfg.patch_size, cfg.hidden_size
    W, H = size
    N = (H // p) * (W // p)
    P = cfg.in_channels * p * p
    M = int(D * cfg.mlp_ratio)
    h, w = dino_grid
    C = text_len + 1 + h * w + cfg.pose_joints + 1
    start, end = model.tread
    keep = N - int(N * route) if route > 0 and end > start else N
    parts = {"patch_in": 2 * N * P * D, "t_embed": 2 * (256 * D + D * D),
             "context": 2 * (text_len * cfg.text_dim * D + cfg.dino_dim * D + h * w * cfg.dino_dim * D
                             + cfg.pose_joints * (3 * D + D * D)),
             "adaLN": 0, "self_attn_proj": 0, "self_attn_sdpa": 0, "cross_attn_proj": 0,
             "cross_attn_sdpa": 0, "mlp": 0, "final": 2 * D * 2 * D + 2 * N * D * P, "repa": 0}
    n_repa, active = None, 0
    for i in range(cfg.depth):
        n = keep if start <= i < end else N
        active += n
        parts["adaLN"] += 2 * D * 9 * D
        parts["self_attn_proj"] += 8 * n * D * D
        parts["self_attn_sdpa"] += 4 * n * n * D
        parts["cross_attn_proj"] += 4 * n * D * D + 4 * C * D * D
        parts["cross_attn_sdpa"] += 4 * n * C * D
        parts["mlp"] += 4 * n * D * M
        if model.repa_at is not None and i == model.repa_at - 1:
            n_repa = n if start <= i < end - 1 else N  # at i == end - 1 the routed tokens rejoin
    if n_repa is not None:
        R = cfg.repa_hidden
        parts["repa"] = 2 * n_repa * (D * R + R * R + R * cfg.dino_dim)
    fwd = sum(parts.values())
    return {"forward_per_sample": fwd, "train_per_step": 3 * batch * fwd, "context_len": C,
            "image_tokens": N, "active_tokens_per_sample": active,
            "parts_forward_per_sample": parts}


def counted_flops(args, device: torch.device, route: float, size: tuple[int, int]) -> dict:
    """One forward + backward at batch 1 under FlopCounterMode (math SDPA, fp32), vs model_flops."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = build_model(args, checkpointing=False).to(device)  # recompute is not model FLOPs
    x0, cond = make_batch(args, 1, size, device)
    cond = cond.with_keep(torch.ones_like(cond.keep))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss_terms(model, x0, cond, Objective(), route=route)["loss"].backward()
    counted = counter.get_total_flops()
    analytic = model_flops(model, 1, size, route, args.text_len, dino_grid(size, args.dino_pool))
    del model
    return {"size": f"{size[0]}x{size[1]}", "batch": 1, "route": route,
            "analytic": analytic["train_per_step"], "flop_counter": counted,
            "ratio_counter_over_analytic": round(counted / analytic["train_per_step"], 4)}


# ---------------------------------------------------------------- set-up
def parse_size(s: str) -> tuple[int, int]:
    w, h = s.lower().split("x")
    return int(w), int(h)


def dino_grid(size: tuple[int, int], pool: int) -> tuple[int, int]:
    w, h = size
    return max(1, h // DINO_PATCH // pool), max(1, w // DINO_PATCH // pool)


def build_model(args, checkpointing: bool | None = None) -> NanoDiT:
    model = NanoDiT.preset(args.preset, text_dim=args.text_dim, dino_dim=args.dino_dim,
                           repa_block=-1 if args.repa == "on" else None)
    # adaLN-zero and the zero output layer would make every upstream gradient exactly 0;
    # give them small random weights so the step works on non-degenerate numbers.
    for lin in [b.ada[-1] for b in model.blocks] + [model.final_ada[-1], model.patch_out]:
        nn.init.normal_(lin.weight, std=0.02)
    if args.checkpointing == "on" if checkpointing is None else checkpointing:
        model.enable_gradient_checkpointing()
    return model


def make_batch(args, batch: int, size: tuple[int, int], device) -> tuple[torch.Tensor, Conditioning]:
    w, h = size
    gh, gw = dino_grid(size, args.dino_pool)
    g = torch.Generator().manual_seed(0)
    pose = torch.rand(batch, POSE_JOINTS, 3, generator=g)
    cond = Conditioning(
        t5=torch.randn(batch, args.text_len, args.text_dim, generator=g),
        t5_mask=torch.ones(batch, args.text_len, dtype=torch.bool),
        dino_cls=torch.randn(batch, args.dino_dim, generator=g),
        dino_patches=torch.randn(batch, gh, gw, args.dino_dim, generator=g),
        pose=pose, keep=torch.ones(batch, 4, dtype=torch.bool))
    x0 = torch.rand(batch, 3, h, w, generator=g) * 2 - 1
    cond = Conditioning(*(getattr(cond, f).to(device) for f in ("t5", "t5_mask", "dino_cls", "dino_patches",
                                                                "pose", "keep")))
    return x0.to(device), cond


def make_optimizer(model: NanoDiT, kind: str, lr: float) -> list[torch.optim.Optimizer]:
    if kind == "adamw":
        return [torch.optim.AdamW(model.parameters(), lr=lr)]
    muon = [p for p in model.blocks.parameters() if p.ndim == 2]
    ids = {id(p) for p in muon}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [torch.optim.Muon(muon, lr=lr, adjust_lr_fn="match_rms_adamw"), torch.optim.AdamW(rest, lr=lr)]


class RssPeak:
    """Peak RSS of this process above its RSS at start, sampled every `interval` s by a thread."""

    def __init__(self, interval: float = 0.005):
        import psutil

        self.proc, self.interval = psutil.Process(), interval
        self.base = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        return self.peak - self.base


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed heap back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- one run
def make_step(model: NanoDiT, opts: list, x0: torch.Tensor, cond: Conditioning, args, device: torch.device):
    """The trainer's step on a fixed batch: cfg_keep → loss_terms under autocast → backward → step."""
    obj = Objective()

    def step(route: float) -> dict:
        keep = cfg_keep(x0.shape[0], obj.cfg, device=device)
        amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bf16"
               else contextlib.nullcontext())
        with amp:
            terms = loss_terms(model, x0, cond.with_keep(keep), obj, route=route)
        terms["loss"].backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        return terms

    return step


def run(args, device: torch.device, route: float, size: tuple[int, int], peak_flops: float | None) -> dict:
    res = {"route": route, "size": f"{size[0]}x{size[1]}", "batch": args.batch}
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        res["memory_method"] = "torch.cuda.max_memory_allocated (weights + optimizer + activations)"
        meter = None
    else:
        res["memory_method"] = "peak RSS above pre-run RSS (psutil, 5 ms sampling, after gc + malloc_trim)"
        meter = RssPeak()
    torch.manual_seed(0)
    model = opts = x0 = cond = step = None
    try:
        model = build_model(args).to(device)
        opts = make_optimizer(model, args.optimizer, args.lr)
        x0, cond = make_batch(args, args.batch, size, device)
        step = functools.partial(make_step(model, opts, x0, cond, args, device), route)

        for _ in range(args.warmup):
            step()
        sync(device)
        times, cpu0 = [], time.process_time()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            terms = step()
            sync(device)
            times.append(time.perf_counter() - t0)
        cpu_s = time.process_time() - cpu0
        loss = float(terms["loss"].detach())
        active = int(terms["active_tokens"])
    except torch.cuda.OutOfMemoryError:  # a size/batch too large for the device: record and go on
        res["error"] = "CUDA out of memory"
        return res
    finally:
        peak = meter.stop() if meter is not None else torch.cuda.max_memory_allocated(device)
        res["peak_memory_bytes"] = int(peak)
        res["peak_memory_gib"] = round(peak / 2**30, 3)
        if model is not None:
            res["params"] = sum(p.numel() for p in model.parameters())
            res["params_without_repa"] = res["params"] - (
                sum(p.numel() for p in model.repa_proj.parameters()) if model.repa_proj is not None else 0)
            flops = model_flops(model, args.batch, size, route, args.text_len, dino_grid(size, args.dino_pool))
            depth = model.config.depth
        model = opts = x0 = cond = step = None  # free weights, optimizer state and batch before the next run
        release_memory(device)

    elapsed = sum(times)
    s_step = elapsed / len(times)
    res.update({
        "steps": args.steps, "warmup": args.warmup, "seconds": round(elapsed, 3),
        "s_per_step": round(s_step, 4), "s_per_step_median": round(statistics.median(times), 4),
        "s_per_step_min": round(min(times), 4),
        "process_cpu_s_per_step": round(cpu_s / len(times), 4),
        "steps_per_s": round(1 / s_step, 3), "samples_per_s": round(args.batch / s_step, 3),
        "image_tokens": flops["image_tokens"], "context_len": flops["context_len"],
        "active_tokens_per_sample": active, "active_tokens_per_step": active * args.batch,
        "dense_tokens_per_step": flops["image_tokens"] * depth * args.batch,
        "model_flops_per_step": flops["train_per_step"],
        "model_flops_parts_forward_per_sample": flops["parts_forward_per_sample"],
        "achieved_tflops": round(flops["train_per_step"] / s_step / 1e12, 3),
        "mfu": round(flops["train_per_step"] / s_step / peak_flops, 4) if peak_flops else None,
        "last_loss": round(loss, 4)})
    if active != flops["active_tokens_per_sample"]:
        res["warning"] = f"model computed {active} token-blocks a sample, model_flops assumed " \
                         f"{flops['active_tokens_per_sample']}"
    return res


def ab_timing(args, device: torch.device, routes: list[float], size: tuple[int, int]) -> dict:
    """Seconds a step for each route, measured on one model with the routes' steps interleaved
    (A B B A A B ...), so that load from other processes falls on both alike."""
    release_memory(device)
    torch.manual_seed(0)
    times = {r: [] for r in routes}
    model = opts = x0 = cond = step = None
    try:
        model = build_model(args).to(device)
        opts = make_optimizer(model, args.optimizer, args.lr)
        x0, cond = make_batch(args, args.batch, size, device)
        step = make_step(model, opts, x0, cond, args, device)
        for _ in range(args.warmup):
            for r in routes:
                step(r)
        sync(device)
        for i in range(args.steps):
            for r in (routes if i % 2 == 0 else routes[::-1]):
                t0 = time.perf_counter()
                step(r)
                sync(device)
                times[r].append(time.perf_counter() - t0)
    except torch.cuda.OutOfMemoryError:
        return {"error": "CUDA out of memory"}
    finally:
        model = opts = x0 = cond = step = None
        release_memory(device)
    dense, routed = (times[r] for r in routes)
    return {"routes": routes, "steps_each": args.steps,
            "s_per_step": {str(r): round(sum(t) / len(t), 4) for r, t in times.items()},
            "s_per_step_median": {str(r): round(statistics.median(t), 4) for r, t in times.items()},
            "speedup_mean": round(sum(dense) / sum(routed), 3),
            "speedup_median": round(statistics.median(dense) / statistics.median(routed), 3)}


def device_info(device: torch.device, override: float | None) -> tuple[dict, float | None]:
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_before": [round(v, 2) for v in os.getloadavg()]}
    peak = override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        info.update(gpu=name, gpu_memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        if peak is None:
            peak = next((v for k, v in PEAK_BF16 if k.lower() in name.lower()), None)
    info["peak_flops"] = peak
    info["peak_flops_source"] = ("--peak-flops" if override else "bf16 dense, from the device name" if peak
                                 else "unknown (no MFU; pass --peak-flops)")
    return info, peak


# ---------------------------------------------------------------- main
def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=("tiny", "baseline", "production"), default="baseline")
    ap.add_argument("--size", type=parse_size, default=None, help="WxH (default 1024x1024 on CUDA, 256x256 on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="default 8 on CUDA, 2 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 20 on CUDA, 5 on CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on CUDA, 2 on CPU)")
    ap.add_argument("--checkpointing", choices=("on", "off"), default="off")
    ap.add_argument("--tread", type=float, default=0.5, help="TREAD route share (0 = off)")
    ap.add_argument("--repa", choices=("on", "off"), default="on")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                    help="bf16 = torch.autocast bf16 over fp32 weights (default bf16 on CUDA, fp32 on CPU)")
    ap.add_argument("--optimizer", choices=("adamw", "muon"), default="adamw")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--text-dim", type=int, default=1024)
    ap.add_argument("--dino-dim", type=int, default=1024)
    ap.add_argument("--dino-pool", type=int, default=2)
    ap.add_argument("--compare-tread", action="store_true", help="also run route 0 and report the speed-up")
    ap.add_argument("--peak-flops", type=float, default=None, help="device peak FLOP/s for MFU")
    ap.add_argument("--xcheck-size", type=parse_size, default=parse_size("256x256"),
                    help="size of the FlopCounterMode cross-check (batch 1)")
    ap.add_argument("--no-xcheck", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default torch's own); 1 is steadier on a CPU shared with others")
    ap.add_argument("--json", type=Path, default=None,
                    help="default bench/results/train_cuda.json or train_cpu.json")
    args = ap.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or ((1024, 1024) if cuda else (256, 256))
    args.batch = args.batch or (8 if cuda else 2)
    args.steps = args.steps or (20 if cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 2)
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.json = args.json or ROOT / "bench" / "results" / f"train_{device.type}.json"

    info, peak = device_info(device, args.peak_flops)
    routes = [0.0, args.tread or 0.5] if args.compare_tread else [args.tread]
    config = {k: v for k, v in vars(args).items() if k not in ("json", "size", "xcheck_size", "no_xcheck")}
    config.update(size=f"{size[0]}x{size[1]}", dino_grid=list(dino_grid(size, args.dino_pool)))
    print(f"device: {info.get('gpu', 'cpu')} ({info['torch_threads']} threads), torch {torch.__version__}, "
          f"load average {info['load_average_before']}")
    if not cuda and info["load_average_before"][0] > (os.cpu_count() or 1) / 2:
        print("note: other processes are using this machine's cores; CPU timings will be noisy")
    print(f"config: {args.preset} {size[0]}x{size[1]} batch {args.batch}, {args.dtype}, {args.optimizer}, "
          f"checkpointing {args.checkpointing}, repa {args.repa}, routes {routes}, "
          f"{args.warmup} warm-up + {args.steps} timed steps")

    runs = []
    for route in routes:
        r = run(args, device, route, size, peak)
        runs.append(r)
        if "error" in r:
            print(f"route {route}: {r['error']}")
    ab = ab_timing(args, device, routes, size) if args.compare_tread else None
    info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out = {"machine": info, "config": config, "runs": runs}

    ok = [r for r in runs if "error" not in r]
    if ok:
        mem = "GiB peak (cuda alloc)" if cuda else "GiB peak RSS growth"
        print(f"\n{'route':>5} {'s/step':>9} {'median':>9} {'fastest':>9} {'steps/s':>8} {'samples/s':>10} "
              f"{mem:>22} "
              f"{'act.tok/step':>13} {'cpu-s/step':>10} {'GFLOP/step':>11} {'TFLOP/s':>8} {'MFU':>7}")
        for r in ok:
            mfu = f"{100 * r['mfu']:6.2f}%" if r["mfu"] is not None else "    n/a"
            print(f"{r['route']:5.2f} {r['s_per_step']:9.4f} {r['s_per_step_median']:9.4f} "
                  f"{r['s_per_step_min']:9.4f} {r['steps_per_s']:8.3f} "
                  f"{r['samples_per_s']:10.3f} {r['peak_memory_gib']:22.3f} {r['active_tokens_per_step']:13d} "
                  f"{r['process_cpu_s_per_step']:10.3f} "
                  f"{r['model_flops_per_step'] / 1e9:11.1f} {r['achieved_tflops']:8.3f} {mfu}")
        r = ok[0]
        print(f"params {r['params']:,} ({r['params_without_repa']:,} without the REPA projector); "
              f"{r['image_tokens']} image tokens, context {r['context_len']}; memory: {r['memory_method']}")
        for r in ok:
            if "warning" in r:
                print("WARNING:", r["warning"])
    if args.compare_tread and len(ok) == 2:
        dense, routed = ok
        out["tread_speedup"] = {
            "route": routed["route"], "speedup_s_per_step": round(dense["s_per_step"] / routed["s_per_step"], 3),
            "speedup_median": round(dense["s_per_step_median"] / routed["s_per_step_median"], 3),
            "speedup_fastest_step": round(dense["s_per_step_min"] / routed["s_per_step_min"], 3),
            "flops_ratio": round(dense["model_flops_per_step"] / routed["model_flops_per_step"], 3),
            "memory_ratio": round(dense["peak_memory_bytes"] / max(1, routed["peak_memory_bytes"]), 3)}
        if ab is not None:
            out["tread_speedup"]["interleaved"] = ab
            if "error" not in ab:
                out["tread_speedup"]["speedup_interleaved_median"] = ab["speedup_median"]
        t = out["tread_speedup"]
        print(f"TREAD route {t['route']} vs dense: step speed-up {t['speedup_s_per_step']}x (medians "
              f"{t['speedup_median']}x, fastest steps {t['speedup_fastest_step']}x); "
              f"model FLOPs {t['flops_ratio']}x fewer; peak memory {t['memory_ratio']}x lower")
        if ab is not None and "error" not in ab:
            print(f"TREAD interleaved on one model ({ab['steps_each']} steps each, s/step medians "
                  f"{ab['s_per_step_median']}): speed-up {ab['speedup_median']}x (means {ab['speedup_mean']}x)")

    if not args.no_xcheck:
        out["flop_crosscheck"] = []
        for route in routes:
            x = counted_flops(args, device, route, args.xcheck_size)
            out["flop_crosscheck"].append(x)
            print(f"FLOP cross-check {x['size']} batch 1 route {route}: analytic {x['analytic'] / 1e9:.2f} GFLOP, "
                  f"FlopCounterMode {x['flop_counter'] / 1e9:.2f} GFLOP, ratio {x['ratio_counter_over_analytic']}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

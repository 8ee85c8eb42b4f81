"""Benchmark: the SDXL full fine-tune's trainer (tasks/sdxl/full.py FullTrainer) on synthetic data:
samples/s and peak memory, DDP vs FSDP2, 1 vs N ranks at the same global batch.

    CPU (bench/results/sdxl_full_cpu.json; 1 vs 2 gloo ranks, OMP_NUM_THREADS=1 per rank):
    .venv/bin/python bench/bench_sdxl_full.py --unet tiny --text tiny --size 512x512 --samples 8 --steps 8 --warmup 2
    GPU (bench/results/sdxl_full_cuda.json; defaults: real UNet + text encoders, 1024x1024, global batch
    16 then 12 then 8 until one fits, bf16 autocast on fp32 weights, gradient checkpointing, ddp (warm and
    cold text cache) and fsdp (warm) on 1 rank; ~4-6 min, no configuration starts after --max-minutes 7):
    .venv/bin/python bench/bench_sdxl_full.py --device cuda

The trainer runs unchanged but for `full_checkpoint.save`, a no-op here: fit() checkpoints at its last
step, and a real checkpoint (fp32 weights + AdamW state, ~30 GB) is minutes of disk, not a step. The
temporary repo holds (1) build_tiny_sdxl's folder (tokenizers, scheduler, VAE config: the trainer reads
only its scaling_factor) with, for `real`, unet/ and text_encoder*/ replaced by random SDXL base ones
(unet_config("real"), 2.6 B parameters; CLIP ViT-L/14 + OpenCLIP bigG, vocabulary 49,408), fp16 on
disk (the trainer loads fp32); (2) --samples latents of one bucket written as the latents stage writes
them (tensor_bytes, mean + std fp16, the "id" metadata the trainer checks), latents.parquet and
caption.parquet rows: 30-60 words cut or extended to exactly --chunks 75-token chunks (the trainer
batches by bucket AND chunk count; the tiny byte-level tokenizer spends ~1 token a letter, real CLIP
~1.3 a word); no ingest table, so no tag prompts. --batch is GLOBAL (each of R ranks gets batch / R).

ranks 1 + ddp alone (--ranks 1) runs in this process; anything else under `torch.distributed.run
--standalone`, this file being the per-rank worker (FSDP on one rank too: the trainer starts a process
group only under torchrun). Figures: the trainer's own dvclive rows runs/<run>/live/plots/metrics/sys/
samples_per_s.tsv (log_every 1: global samples over each step's wall time, logging excluded), after
--warmup steps: samples/s = timed samples / the sum of their times. Peak memory per rank: CUDA
max_memory_allocated / reserved during fit() (reset when fit starts: weights, gradients, AdamW state,
activations); CPU peak RSS (ru_maxrss) and its growth from before the trainer was built (psutil).
--text-cache warm: every caption encoded into the trainer's cache (Prompts.encode) before fit, as past
a first epoch whose embeddings fit text_cache_gb; cold: text_cache_gb 0, every prompt encoded live
every step (a dataset larger than the cache), with the first --parallel only. Asserts nothing.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # everything is built from configs: a hub access would be a bug
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import csv  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_sdxl_lora import CLIP_VOCAB, TEXT_CONFIGS  # noqa: E402
from bench.bench_train import RssPeak, device_info, parse_size, release_memory  # noqa: E402
from models.sdxl import pipeline as sdxl  # noqa: E402

GIB = 2**30
GOAL = {"samples_per_s_per_gpu": 11.0, "peak_gb_per_gpu": 31.0}  # bigASP v2.5 on H100s (FSDP over 32 GPUs)
WORDS = ("a photograph of woman man young old standing sitting near the window in warm light wearing red blue "
         "jacket dress hat with long short dark hair smiling looking at camera background soft focus city street "
         "at night wooden table cup of coffee book garden flowers green trees sky clouds sunset detailed texture "
         "shallow depth field film grain candid portrait close up wide shot indoors outdoors").split()


def build_model(folder: Path, args, device: torch.device) -> Path:
    """The tiny SDXL folder, its UNet / text encoders replaced by real-size random ones for `real`."""
    sdxl.build_tiny_sdxl(folder)
    on = device if device.type == "cuda" else torch.device("cpu")  # a 2.6 B init is slow on a host
    torch.manual_seed(0)
    if args.text == "real":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        vocab, _ = sdxl.clip_vocab()  # the tiny tokenizer's ids (< 600) index the real-size tables
        ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"], max_position_embeddings=sdxl.TOKENIZER_MAX)
        for cls, cfg, name in zip((CLIPTextModel, CLIPTextModelWithProjection), TEXT_CONFIGS["real"],
                                  ("text_encoder", "text_encoder_2")):
            with on:
                enc = cls(CLIPTextConfig(vocab_size=CLIP_VOCAB, **ids, **cfg))
            enc.to("cpu", torch.float16).save_pretrained(folder / name)
            del enc
    if args.unet == "real":
        from diffusers import UNet2DConditionModel
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()  # its "cast with to()" advice is for loading; this cast is for the disk
        with on:
            unet = UNet2DConditionModel(**sdxl.unet_config("real"))
        unet.to("cpu", torch.float16).save_pretrained(folder / "unet")  # fp16 on disk: 5 GB, not 10
        del unet
    release_memory(device)
    return folder


def write_data(root: Path, model: Path, args) -> None:
    """--samples latent items of one bucket + their latents.parquet and caption.parquet rows."""
    from transformers import CLIPTokenizer

    from models.sdxl.text import CHUNK
    from tasks import latents as lt
    from tasks.caption import SCHEMA as CAPTION_SCHEMA
    from tasks.core import manifest
    from tasks.core.store import Store, item_key, tensor_bytes
    from tasks.sdxl.data import CAPTION_TABLE, LATENTS_TABLE

    w, h = args.size
    bucket, rng = f"{w}x{h}", np.random.default_rng(0)
    store, lat, cap = Store(root / lt.STORE, ".safetensors"), [], []
    tokens = CLIPTokenizer.from_pretrained(model / "tokenizer")  # what Prompts.chunks counts with
    lo, hi = CHUNK * (args.chunks - 1), CHUNK * args.chunks
    for i in range(args.samples):
        sid = hashlib.sha256(f"synthetic-{i}".encode()).hexdigest()
        key = item_key("latents", lt.VERSION, [sid, "synthetic"], {"bucket": bucket, "size": [w, h],
                                                                  "dtype": "float32"}, model="bench/random")
        # Unscaled latents are ~N(0, 1/scaling^2) (SDXL: scaling 0.13025); the posterior's std is small.
        mean = (rng.standard_normal((4, h // 8, w // 8)) / 0.13025).astype(np.float16)
        meta = {"id": sid, "bucket": bucket, "width": str(w), "height": str(h), "vae": "bench/random",
                "dtype": "float32", "scaling_factor": repr(0.13025)}
        store.write_bytes(key, tensor_bytes({"mean": mean, "std": np.full_like(mean, 0.05)}, meta))
        lat.append(dict(id=sid, split="train", bucket=bucket, width=w, height=h, latent_width=w // 8,
                        latent_height=h // 8, orig_width=w, orig_height=h, crop_left=0, crop_top=0, key=key,
                        file=store.relpath(key), error=None))
        # 30-60 words, then as many as make exactly --chunks 75-token chunks: the trainer batches by
        # (bucket, chunk count), so mixed counts would leave smaller batches inside the timed steps.
        words = list(rng.choice(WORDS, size=int(rng.integers(30, 61))))
        while (n := len(tokens(" ".join(words), add_special_tokens=False, verbose=False).input_ids)) > hi or n <= lo:
            words = words[:-1] if n > hi else [*words, str(rng.choice(WORDS))]
        cap.append(dict(id=sid, split="train", key=None, file=None, text=" ".join(words), flags=[], error=None))
    store.seal()  # the trainers' ranks read the latents from other processes
    manifest.write_table(lat, lt.SCHEMA, root / LATENTS_TABLE, sort_by="id")
    manifest.write_table(cap, CAPTION_SCHEMA, root / CAPTION_TABLE, sort_by="id")


# ---------------------------------------------------------------- one rank (this process or torchrun's)
def worker(params_file: Path, root: Path, out_dir: Path, cache: str) -> None:
    """Build FullTrainer from the params file, fit, write this rank's figures to out_dir/rank<r>.json."""
    import torch.distributed as dist

    from tasks.core.params import load_section
    from tasks.sdxl import full_checkpoint
    from tasks.sdxl.full import FullTrainer
    from tasks.sdxl.full_params import FullParams

    p = load_section(FullParams, FullParams.SECTION, params_file)
    saves: list[int] = []
    real_save, full_checkpoint.save = full_checkpoint.save, lambda t, *_, **__: saves.append(t.step)
    res: dict = {"rank": int(os.environ.get("RANK", "0"))}
    meter, t = RssPeak(), None
    try:
        t0 = time.perf_counter()
        t = FullTrainer(p, root=root)
        res.update(init_s=round(time.perf_counter() - t0, 2), world=t.world,
                   unet_params=sum(q.numel() for q in t.unet.parameters()),  # DTensor: the global numel
                   prompt_chunks=dict(Counter(t.batches.chunks.values())))
        if cache == "warm":
            t0 = time.perf_counter()
            with torch.autocast(t.device.type, dtype=torch.bfloat16, enabled=t.bf16):  # as _micro calls it
                for prompt in dict.fromkeys(r.prompt for r in t.rows):
                    t.prompts.encode([prompt])
            res["prefill_s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        res["counters"] = t.fit()
        res["fit_s"] = round(time.perf_counter() - t0, 2)
        res["saves_skipped_at"] = saves
    except torch.cuda.OutOfMemoryError:  # too large a batch: that is the answer for it
        res["error"] = "CUDA out of memory"
    finally:
        full_checkpoint.save = real_save
        if torch.cuda.is_available() and t is not None and t.device.type == "cuda":
            res.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(t.device) / GIB, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved(t.device) / GIB, 3))
        res.update(rss_growth_gib=round(meter.stop() / GIB, 3),
                   peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3))
        t = None
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"rank{res['rank']}.json").write_text(json.dumps(res, indent=2))
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------- one configuration
def measure(args, root: Path, model: Path, device: torch.device, parallel: str, ranks: int, batch: int,
            cache: str) -> dict:
    run = f"{parallel}-r{ranks}-b{batch}-{cache}"
    section = dict(run=run, model=str(model), steps=args.warmup + args.steps, batch_size=batch // ranks,
                   grad_accum=args.grad_accum, precision=args.precision, parallel=parallel,
                   gradient_checkpointing=args.checkpointing == "on", checkpoint_every=10**9, log_every=1,
                   device=device.type, text_cache_gb=0.0 if cache == "cold" else 8.0)
    params_file, out_dir = root / f"params-{run}.yaml", root / "out" / run
    params_file.write_text(yaml.safe_dump({"train_sdxl": section}))
    row = dict(parallel=parallel, ranks=ranks, batch=batch, batch_per_rank=batch // ranks,
               grad_accum=args.grad_accum, text_cache=cache, how="in-process" if args.in_process else "torchrun")
    row["load_average_1min_before"] = round(os.getloadavg()[0], 2)  # other work on the machine skews all this
    release_memory(device)  # this process's cached blocks would count against a torchrun child's GPU
    t0 = time.perf_counter()
    if args.in_process:
        worker(params_file, root, out_dir, cache)
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if device.type == "cpu":  # 1 vs 2 ranks: one core per rank, the 1-rank run too (fair on 2 cores);
            env["OMP_NUM_THREADS"] = str(args.cpu_threads)  # --ranks 1: this process's threads, as in-process
        log = root / f"{run}.log"
        with log.open("w") as f:
            try:
                rc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     "--nproc_per_node", str(ranks), str(Path(__file__).resolve()), "--worker",
                                     str(params_file), str(root), str(out_dir), cache],
                                    cwd=root, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=600).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        if rc != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            if any("OutOfMemoryError" in line for line in tail):
                return {**row, "error": "CUDA out of memory"}
            return {**row, "error": f"torchrun exit {rc}", "log_tail": tail}
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    per_rank = [json.loads(f.read_text()) for f in sorted(out_dir.glob("rank*.json"))]
    if any("error" in r for r in per_rank) or len(per_rank) != ranks:
        return {**row, "error": next((r["error"] for r in per_rank if "error" in r), "a rank wrote nothing")}
    r0 = per_rank[0]
    tsv = root / "runs" / run / "live" / "plots" / "metrics" / "sys" / "samples_per_s.tsv"
    with tsv.open() as f:
        rates = [(int(r["step"]), float(r["samples_per_s"])) for r in csv.DictReader(f, delimiter="\t")]
    per_step = batch * args.grad_accum  # the global samples of one optimizer step
    times = [per_step / v for s, v in rates if s > args.warmup]
    if not times:  # non-finite steps are skipped and not logged
        return {**row, "error": f"no timed step logged ({r0['counters']})"}
    row.update(timed_steps=len(times), steps_per_s=round(len(times) / sum(times), 4),
               samples_per_s=round(len(times) * per_step / sum(times), 3),
               samples_per_s_per_device=round(len(times) * per_step / sum(times) / ranks, 3),
               s_per_step_p50=round(statistics.median(times), 4), step_times=[round(x, 4) for x in times],
               unet_params=r0["unet_params"], prompt_chunks=r0["prompt_chunks"], init_s=r0["init_s"],
               prefill_s=r0.get("prefill_s"), fit_s=r0["fit_s"], skipped_steps=r0["counters"]["skipped_steps"],
               saves_skipped_at=r0["saves_skipped_at"],
               peak_rss_gib=max(r["peak_rss_gib"] for r in per_rank),
               rss_growth_gib=max(r["rss_growth_gib"] for r in per_rank))
    if device.type == "cuda":
        row.update(peak_allocated_gib=max(r["peak_allocated_gib"] for r in per_rank),
                   peak_reserved_gib=max(r["peak_reserved_gib"] for r in per_rank))
        if parallel == "fsdp":
            # A rough upper estimate: under SHARD_GRAD_OP the fp32 gradients and both AdamW moments (12 bytes
            # a parameter) are split over the ranks; the gathered fp32 weights and the activations are not.
            row["est_peak_gib_fsdp_8_ranks"] = round(
                row["peak_allocated_gib"] - 12 * r0["unet_params"] * (1 / ranks - 1 / 8) / GIB, 2)
    return row


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--worker":  # a torchrun rank
        from tasks.core.stage import setup_logging

        setup_logging()
        worker(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5])
        return
    cuda, ints = torch.cuda.is_available(), lambda s: [int(x) for x in s.split(",")]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--unet", choices=("tiny", "real"), default=None, help="default real on CUDA, tiny on CPU")
    ap.add_argument("--text", choices=("tiny", "real"), default=None, help="must match --unet (default: it)")
    ap.add_argument("--size", type=parse_size, default=None, help="WxH (default 1024x1024 CUDA, 512x512 CPU)")
    ap.add_argument("--samples", type=int, default=None, help="latent items (default: a multiple of every batch)")
    ap.add_argument("--batch", type=ints, default=None,
                    help="GLOBAL batch per micro-step, tried largest first until one fits (default 16,12,8 "
                         "CUDA, 2 CPU); each rank gets batch / ranks")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--chunks", type=int, choices=(1, 2, 3), default=3,
                    help="75-token chunks of every caption (the tiny byte-level tokenizer: ~3 for 30-60 words)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 6 CUDA, 8 CPU)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--ranks", type=ints, default=None, help="default 1 on CUDA, 1,2 on CPU")
    ap.add_argument("--parallel", default="ddp,fsdp")
    ap.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto")
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on")
    ap.add_argument("--text-cache", default=None, help="warm,cold (default on CUDA) or warm (default on CPU); "
                    "cold runs with the first --parallel only (the text side costs the same under any wrapper)")
    ap.add_argument("--max-minutes", type=float, default=7.0, help="start no configuration after this long")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.device == "cuda" and not cuda:
        sys.exit(f"--device cuda: torch {torch.__version__} sees no CUDA device; use --device cpu")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and cuda) else "cpu")
    on_gpu = device.type == "cuda"
    args.unet = args.unet or ("real" if on_gpu else "tiny")
    args.text = args.text or args.unet
    if args.unet != args.text:  # the UNet's cross-attention and add-embedding widths are the encoders'
        ap.error(f"--unet {args.unet} needs --text {args.unet}: a real UNet reads 768+1280 = 2048-wide "
                 "hidden states and a 1280 pooled projection, the tiny one 32+32 and 32")
    args.size = args.size or ((1024, 1024) if on_gpu else (512, 512))
    args.batch = sorted(args.batch or ([16, 12, 8] if on_gpu else [2]), reverse=True)
    args.ranks = args.ranks or ([1] if on_gpu else [1, 2])
    args.steps = args.steps or (6 if on_gpu else 8)
    args.cpu_threads = torch.get_num_threads() if args.ranks == [1] else 1
    caches = (args.text_cache or ("warm,cold" if on_gpu else "warm")).split(",")
    parallels = args.parallel.split(",")
    lcm = math.lcm(*args.batch)
    args.samples = args.samples or lcm * -(-8 // lcm)
    if args.samples % lcm or set(caches) - {"warm", "cold"} or set(parallels) - {"ddp", "fsdp"}:
        ap.error("--samples must be a multiple of every --batch (no smaller last batch inside the timed "
                 "steps); --text-cache warm/cold; --parallel ddp/fsdp")
    if on_gpu and max(args.ranks) > torch.cuda.device_count():
        ap.error(f"--ranks {max(args.ranks)}: this machine has {torch.cuda.device_count()} GPU(s)")
    args.out = args.out or ROOT / "bench" / "results" / f"sdxl_full_{device.type}.json"
    w, h = args.size

    info, _ = device_info(device, None)
    info.pop("peak_flops"), info.pop("peak_flops_source")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "size")}
    config.update(size=f"{w}x{h}", latent=f"4x{h // 8}x{w // 8}", text_cache=caches, parallel=parallels)
    print(f"device: {info.get('gpu', 'cpu')}, {info['cpus']} CPUs, torch {torch.__version__}, "
          f"load average {info['load_average_before']}")
    print(f"config: {args.unet} UNet + {args.text} text encoders, {w}x{h}, {args.samples} samples, global batch "
          f"{args.batch} x accum {args.grad_accum}, ranks {args.ranks}, {parallels}, precision {args.precision}, "
          f"checkpointing {args.checkpointing}, text cache {caches}, {args.warmup} + {args.steps} timed steps")
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-sdxl-full-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model = build_model(root / "model", args, device)
        write_data(root, model, args)
        info["build_s"] = round(time.perf_counter() - t0, 1)
        print(f"built the model folder and {args.samples} samples in {info['build_s']} s")
        fits: dict[tuple[str, int], int] = {}  # the largest batch that fit, per (parallel, ranks)
        for parallel in parallels:
            for ranks in args.ranks:
                for cache in [c for c in caches if c == "warm" or parallel == parallels[0]]:
                    if time.perf_counter() - t0 > args.max_minutes * 60:
                        results.append(dict(parallel=parallel, ranks=ranks, text_cache=cache,
                                            error=f"not run: past --max-minutes {args.max_minutes}"))
                        print(f"  {parallel} x{ranks} {cache}: {results[-1]['error']}")
                        continue
                    args.in_process = ranks == 1 and parallel == "ddp" and args.ranks == [1]
                    top = fits.get((parallel, ranks), max(args.batch))
                    for batch in [b for b in args.batch if b % ranks == 0 and b <= top]:
                        row = measure(args, root, model, device, parallel, ranks, batch, cache)
                        results.append(row)
                        print(f"  {parallel} x{ranks} batch {batch} {cache}: " + (row["error"] if "error" in row else
                              f"{row['samples_per_s']} samples/s ({row['wall_s']} s)"))
                        if row.get("error") != "CUDA out of memory":
                            if "error" not in row:
                                fits[(parallel, ranks)] = batch
                            break
    info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    ok = [r for r in results if "error" not in r]
    scaling = {}
    for r in ok:  # N ranks vs 1 rank at the same global batch, parallel and cache
        one = next((o for o in ok if o["ranks"] == 1 and all(o[k] == r[k] for k in ("parallel", "batch",
                                                                                      "text_cache"))), None)
        if one and r["ranks"] > 1:
            key = f"{r['parallel']} {r['ranks']} vs 1 rank, batch {r['batch']}, {r['text_cache']}"
            scaling[key] = round(r["samples_per_s"] / one["samples_per_s"], 3)

    mem_head = "peak GiB alloc/reserved" if on_gpu else "peak RSS GiB (growth)"
    print(f"\n{'parallel':>8} {'ranks':>5} {'batch':>9} {'cache':>5} {'steps/s':>8} {'samples/s':>10} "
          f"{'per dev':>8} {'s/step p50':>10} {mem_head:>24} {'init s':>7}")
    for r in ok:
        mem = (f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if on_gpu
               else f"{r['peak_rss_gib']:.2f} ({r['rss_growth_gib']:.2f})")
        batch = f"{r['batch']} ({r['batch_per_rank']}/r)"
        print(f"{r['parallel']:>8} {r['ranks']:>5} {batch:>9} "
              f"{r['text_cache']:>5} {r['steps_per_s']:8.3f} {r['samples_per_s']:10.3f} "
              f"{r['samples_per_s_per_device']:8.3f} {r['s_per_step_p50']:10.3f} {mem:>24} {r['init_s']:7.1f}")
    for k, v in scaling.items():
        print(f"scaling {k}: x{v}")
    if ok:
        print(f"UNet parameters: {ok[0]['unet_params']:,}; prompt chunks {ok[0]['prompt_chunks']}")
    if on_gpu:
        print(f"goal (bigASP): >= {GOAL['samples_per_s_per_gpu']} samples/s and <= {GOAL['peak_gb_per_gpu']} GB "
              "per GPU; one GPU holds all of AdamW's state (16 bytes a parameter before activations), bigASP's "
              "figure is FSDP over 32 GPUs; rough estimate at 8 FSDP ranks: "
              + ", ".join(f"batch {r['batch']} {r['est_peak_gib_fsdp_8_ranks']} GiB" for r in ok
                          if "est_peak_gib_fsdp_8_ranks" in r))
    out = {"machine": info, "config": config, "goal_bigasp": GOAL, "scaling": scaling, "results": results,
           "method": "the trainer's sys/samples_per_s dvclive rows after --warmup (log_every 1); "
                     "full_checkpoint.save stubbed; peak memory per rank, max over ranks"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

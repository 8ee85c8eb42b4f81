"""Benchmark: s/step and peak memory of the SDXL LoRA trainer's optimizer step, random weights.

    .venv/bin/python bench/bench_sdxl_lora.py [--unet real|tiny] [--size 1024x1024] [--batch 1]
        [--grad-accum 1] [--rank 32] [--steps 10] [--warmup 3] [--checkpointing on|off]
        [--precision bf16|fp32] [--text-encoders on|off] [--device auto|cpu|cuda] [--threads N]
        [--out bench/results/sdxl_lora_<device>.json]

The UNet is `models.sdxl.pipeline.unet_config(--unet)` (real: SDXL base's 2.6 B parameters) built from
its config with random weights: speed and memory do not depend on the weights' values, and
nothing is downloaded or read (the hub is forced offline before diffusers is imported). Every
step is `tasks/train_lora.py`'s: frozen base in bf16 on CUDA (fp32 with --precision fp32), the
peft LoRA (to_q/k/v/out.0, gaussian init) upcast to fp32, gradient checkpointing, the DDPM
objective's noise + timesteps, the UNet under bf16 autocast with encoder_hidden_states
(B, 77, 2048) and text_embeds (B, 1280) + time_ids (B, 6), MSE in fp32, backward, grad-norm
clip, AdamW, LR scheduler, zero_grad.

--text-encoders off: the prompt embeddings are cached (the trainer after ti_frac, or without
TI: frozen encoders run once per prompt). on: both text encoders of real SDXL are built from
configs (CLIP ViT-L/14 text and OpenCLIP bigG text with projection, vocabulary 49,408, fp32 as
the trainer loads them) and the pivotal-tuning tokens <s0><s1> train through them every step
(`models.sdxl.ti.PivotalTokens` + `models.sdxl.text.encode_prompts`, only the new rows in
AdamW, sync_rows after each step): the trainer's first ti_frac of the steps. The
tokenizer is the tiny byte-level one (no files); the sequence is always 77 tokens, so the cost
is the real one. Latents are one fixed random batch on the device (the trainer reads a small
latent file per sample: not timed here).

Peak memory: CUDA torch.cuda.max_memory_allocated / max_memory_reserved after
reset_peak_memory_stats once the model is built (weights count, the fp32 build does not);
CPU the peak RSS above the pre-build RSS (psutil, 5 ms sampling). Prints figures, writes JSON.
"""
from __future__ import annotations

import os

# No download, ever: the models here are built from configs, so any hub access would be a bug.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_train import RssPeak, device_info, parse_size, release_memory, sync  # noqa: E402
from models.sdxl import pipeline as sdxl  # noqa: E402
from models.sdxl.objective import Objective, time_ids  # noqa: E402
from tasks.training.run import seeded  # noqa: E402
from tasks.sdxl.trainer import lr_lambda  # noqa: E402
from tasks.sdxl.params import LoraParams  # noqa: E402

GIB = 2**30
# stabilityai/stable-diffusion-xl-base-1.0's scheduler (the DDPM objective reads these keys).
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      num_train_timesteps=1000, prediction_type="epsilon", steps_offset=1,
                      timestep_spacing="leading", clip_sample=False)
# SDXL base's text encoders (text_encoder/config.json, text_encoder_2/config.json); tiny: build_tiny_sdxl's.
TEXT_CONFIGS = {
    "real": (dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu", projection_dim=768),
             dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  hidden_act="gelu", projection_dim=1280)),
    "tiny": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", projection_dim=32),) * 2}
CLIP_VOCAB = 49408
PROMPT = "TOK, a figure juggling three balls, white background"
A10G_CUDA_GIB = 23028 / 1024  # what an "A10G 24 GB" shows CUDA (nvidia-smi: 23028 MiB)
CUDA_CONTEXT_GIB = 0.5        # the CUDA context + cuBLAS workspaces, outside torch's allocator


def build_text(unet_size: str, device: torch.device):
    """Both CLIP text encoders (fp32, frozen, as the trainer loads them) + PivotalTokens."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from models.sdxl.ti import PivotalTokens

    vocab, merges = sdxl.clip_vocab()
    toks = [CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                          model_max_length=sdxl.TOKENIZER_MAX) for _ in range(2)]
    ids = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
               pad_token_id=vocab["<|endoftext|>"], max_position_embeddings=sdxl.TOKENIZER_MAX)
    n_vocab = CLIP_VOCAB if unet_size == "real" else len(vocab)  # the real embedding table (AdamW's state)
    encs = [cls(CLIPTextConfig(vocab_size=n_vocab, **ids, **cfg)).to(device).requires_grad_(False)
            for cls, cfg in zip((CLIPTextModel, CLIPTextModelWithProjection), TEXT_CONFIGS[unet_size])]
    text = sdxl.TextEncoders(toks[0], toks[1], encs[0], encs[1])
    p = LoraParams()
    pivotal = PivotalTokens(text, trigger=p.trigger, n_tokens=p.ti_tokens, init=p.ti_init, seed=p.seed)
    for t in pivotal.parameters():
        t.requires_grad_(True)
    return text, pivotal


def build(args, device: torch.device) -> dict:
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as dlog
    from peft import LoraConfig

    dlog.set_verbosity_error()  # its "cast with to()" advice is for from_pretrained; this mirrors load_unet's cast

    p = LoraParams()
    base_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    torch.manual_seed(0)
    cfg = sdxl.unet_config(args.unet)
    # Built on the device itself (a 2.6 B-parameter init on the host is slow), then cast as load_unet does.
    with torch.device(device):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype=base_dtype)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha or args.rank, lora_dropout=p.lora_dropout,
                                init_lora_weights="gaussian", target_modules=list(p.target_modules)))
    lora = [q for q in unet.parameters() if q.requires_grad]
    for q in lora:
        q.data = q.data.float()
    if args.checkpointing == "on":
        unet.enable_gradient_checkpointing()
    text = pivotal = None
    if args.text_encoders == "on":
        text, pivotal = build_text(args.unet, device)
    groups = [{"params": lora, "lr": p.lr}]
    if pivotal:
        groups.append({"params": pivotal.parameters(), "lr": p.text_encoder_lr})
    opt = torch.optim.AdamW(groups, betas=p.adam_betas, weight_decay=p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p))
    w, h = args.size
    g = torch.Generator().manual_seed(0)
    latents = (torch.randn(args.batch, cfg["in_channels"], h // 8, w // 8, generator=g) * 0.8).to(device)
    pooled_dim = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    cached = (torch.randn(args.batch, sdxl.TOKENIZER_MAX, cfg["cross_attention_dim"], generator=g).to(device),
              torch.randn(args.batch, pooled_dim, generator=g).to(device))
    te_params = sum(q.numel() for e in (text.text_encoder, text.text_encoder_2) for q in e.parameters()) if text else 0
    return dict(unet=unet, lora=lora, text=text, pivotal=pivotal, opt=opt, sched=sched, latents=latents,
                cached=cached, objective=Objective("ddpm", SDXL_SCHEDULER, p.noise_offset),
                params={"unet_base": sum(q.numel() for q in unet.parameters() if not q.requires_grad),
                        "lora_trainable": sum(q.numel() for q in lora),
                        "text_encoders": te_params,
                        "ti_trainable": sum(t.numel() for t in pivotal.parameters()) if pivotal else 0})


def make_step(m: dict, args, device: torch.device):
    """One optimizer step of LoraTrainer.fit (grad_accum micro-batches of _micro, then the update)."""
    from models.sdxl.text import encode_prompts

    p, bf16 = LoraParams(), args.precision == "bf16"
    prompts = [m["pivotal"].expand(PROMPT) if m["pivotal"] else PROMPT] * args.batch
    w, h = args.size
    ids = [time_ids((h, w), (0, 0), (h, w))] * args.batch
    params = m["lora"] + (list(m["pivotal"].parameters()) if m["pivotal"] else [])

    def step(i: int) -> float:
        g = seeded(p.seed, i)
        for _ in range(args.grad_accum):
            noisy, t, target = m["objective"].prepare(m["latents"], g)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                if m["text"] is not None:
                    embeds, pooled = encode_prompts(m["text"], prompts, p.max_chunks, device)
                else:
                    embeds, pooled = m["cached"]
                tid = torch.tensor(ids, device=device, dtype=embeds.dtype)
                pred = m["unet"](noisy, t, encoder_hidden_states=embeds,
                                 added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
            loss = F.mse_loss(pred.float(), target.float())
            (loss / args.grad_accum).backward()
        float(torch.nn.utils.clip_grad_norm_([q for q in params if q.grad is not None], p.grad_clip))
        m["opt"].step()
        m["opt"].zero_grad(set_to_none=True)
        m["sched"].step()
        if m["pivotal"]:
            m["pivotal"].sync_rows()
        return float(loss.detach())

    return step


def run(args, device: torch.device) -> dict:
    res: dict = {}
    release_memory(device)
    meter = RssPeak() if device.type == "cpu" else None
    m = step = None
    times: list[float] = []
    try:
        t0 = time.perf_counter()
        m = build(args, device)
        res["params"] = m["params"]
        sync(device)
        res["build_s"] = round(time.perf_counter() - t0, 2)
        if device.type == "cuda":
            release_memory(device)  # the fp32 build's blocks: not what the trainer (bf16 load) holds
            torch.cuda.reset_peak_memory_stats(device)
            res["weights_gib_allocated"] = round(torch.cuda.memory_allocated(device) / GIB, 3)
        step = make_step(m, args, device)
        for i in range(args.warmup):
            step(i)
        sync(device)
        for i in range(args.warmup, args.warmup + args.steps):
            t0 = time.perf_counter()
            loss = step(i)
            sync(device)
            times.append(time.perf_counter() - t0)
        res["last_loss"] = round(loss, 4)
    except torch.cuda.OutOfMemoryError:  # too large for this device: that is the answer, record it
        res["error"] = "CUDA out of memory"
    finally:
        if device.type == "cuda":
            res.update(peak_allocated_gib=round(torch.cuda.max_memory_allocated(device) / GIB, 3),
                       peak_reserved_gib=round(torch.cuda.max_memory_reserved(device) / GIB, 3),
                       memory_method="torch.cuda.max_memory_allocated / max_memory_reserved since the "
                                     "model was built (weights + LoRA + AdamW state + activations)")
        else:
            res.update(peak_rss_growth_gib=round(meter.stop() / GIB, 3),
                       memory_method="peak RSS above the pre-build RSS (psutil, 5 ms; weights included)")
        m = step = None
        release_memory(device)
    if times:
        mean = sum(times) / len(times)
        res.update(s_per_step=round(mean, 4), s_per_step_p50=round(statistics.median(times), 4),
                   s_per_step_min=round(min(times), 4), steps_per_s=round(1 / mean, 4),
                   samples_per_s=round(args.batch * args.grad_accum / mean, 4), step_times=[round(t, 4) for t in times])
    if device.type == "cuda":
        reserved = res["peak_reserved_gib"]
        res["fits_24gb"] = "error" not in res and reserved < 24.0
        # An A10G shows CUDA 22.49 GiB, and the context lives outside the allocator: the stricter test.
        res["fits_a10g"] = "error" not in res and reserved + CUDA_CONTEXT_GIB < A10G_CUDA_GIB
    else:
        res["fits_24gb"] = None
        res["fits_24gb_reason"] = ("CPU run: host RSS says nothing about a GPU's memory; run on CUDA "
                                   "(torch.cuda.max_memory_reserved) to answer")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--unet", choices=("real", "tiny"), default="real")
    ap.add_argument("--size", type=parse_size, default=parse_size("1024x1024"), help="image WxH (latents /8)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1,
                    help="micro-batches per optimizer step (the seed's table: 4; s/step scales ~linearly)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=None, help="lora_alpha (default = rank, as params.yaml)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on")
    ap.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                    help="bf16: frozen base in bf16 + bf16 autocast (default on CUDA); fp32 (default on CPU)")
    ap.add_argument("--text-encoders", choices=("on", "off"), default="off",
                    help="on: live CLIP-L + bigG with TI tokens training through them; off: cached embeddings")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/sdxl_lora_<device>[_tiny][_te].json")
    args = ap.parse_args()
    for key in ("batch", "grad_accum", "rank", "steps"):
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')}: expected >= 1, got {getattr(args, key)}")
    w, h = args.size
    if w % 8 or h % 8 or w < 64 or h < 64:
        ap.error(f"--size: expected multiples of 8, at least 64x64 (the VAE's 8x latents), got {w}x{h}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device cuda: torch {torch.__version__} sees no CUDA device "
                 f"(built with CUDA: {torch.version.cuda or 'no'}); use --device cpu or run on a GPU machine")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    suffix = ("_tiny" if args.unet == "tiny" else "") + ("_te" if args.text_encoders == "on" else "")
    args.out = args.out or ROOT / "bench" / "results" / f"sdxl_lora_{device.type}{suffix}.json"

    info, _ = device_info(device, None)
    info.pop("peak_flops"), info.pop("peak_flops_source")
    config = {k: v for k, v in vars(args).items() if k not in ("out", "size")}
    config.update(size=f"{w}x{h}", latent=f"{w // 8}x{h // 8}", alpha=args.alpha or args.rank)
    print(f"device: {info.get('gpu', 'cpu')} ({info['torch_threads']} threads), torch {torch.__version__}, "
          f"load average {info['load_average_before']}")
    print(f"config: {args.unet} UNet {w}x{h} batch {args.batch} x accum {args.grad_accum}, rank {args.rank}, "
          f"{args.precision}, checkpointing {args.checkpointing}, text encoders {args.text_encoders}, "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    r = run(args, device)
    info["load_average_after"] = [round(v, 2) for v in os.getloadavg()]
    out = {"machine": info, "config": config, "result": r}

    if "params" in r:
        pr = r["params"]
        print(f"params: UNet base {pr['unet_base']:,} frozen, LoRA {pr['lora_trainable']:,} trainable"
              + (f"; text encoders {pr['text_encoders']:,} frozen, new token rows {pr['ti_trainable']:,} in AdamW"
                 if pr["text_encoders"] else "")
              + f"; built in {r.get('build_s', '?')} s")
    if "error" in r:
        print(f"ERROR: {r['error']}")
    if "s_per_step" in r:
        mem = (f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if device.type == "cuda"
               else f"{r['peak_rss_growth_gib']:.2f}")
        head = "peak GiB alloc / reserved" if device.type == "cuda" else "peak GiB RSS growth"
        print(f"\n{'s/step':>9} {'p50':>9} {'fastest':>9} {'samples/s':>10} {head:>26} {'fits 24 GB':>11}")
        fits = r["fits_24gb"] if r["fits_24gb"] is not None else "n/a (CPU)"
        print(f"{r['s_per_step']:9.3f} {r['s_per_step_p50']:9.3f} {r['s_per_step_min']:9.3f} "
              f"{r['samples_per_s']:10.3f} {mem:>26} {str(fits):>11}")
        if device.type == "cuda":
            print(f"A10G check (22.49 GiB visible, ~{CUDA_CONTEXT_GIB} GiB context): fits {r['fits_a10g']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

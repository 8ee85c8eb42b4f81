"""An SDXL full fine-tune's checkpoints: each one IS a diffusers SDXL folder, plus one file in the
original layout, plus what resuming needs.

    runs/<run>/checkpoints/step-N/
        model_index.json unet/ vae/ text_encoder/ text_encoder_2/ tokenizer/ tokenizer_2/ scheduler/
                                    `StableDiffusionXLPipeline.from_pretrained(step-N)`; the candidates
                                    stage's `sdxl` generator and the sweep read it; the UNet (and the
                                    text encoders when they trained) hold the EMA weights when `ema`
        <run>-step-N.safetensors    the original SDXL key layout (`from_single_file`, ComfyUI, A1111)
        train/weights.safetensors   the raw trained weights, with `ema` only (else they are unet/'s)
        state.pt                    AdamW, schedule, data position, RNG, counters, the log window
        meta.json                   step, fingerprint, params, base model, objective and sampling

States are gathered whole (torch.distributed.checkpoint's full state dicts), so a checkpoint does
not depend on the number of ranks nor on DDP vs FSDP: a run resumes on other GPUs when its global
batch is the same. The parts that did not train (VAE, frozen text encoders, tokenizers) are
hardlinked from the base model's folder, copied where a link cannot be made. A flow-matching run's
scheduler/ is a FlowMatchEulerDiscreteScheduler with the run's `sample_shift` (README: sampling).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

from tasks.core.params import as_dict
from tasks.training import checkpoints
from tasks.training.run import supersede

log = logging.getLogger("niche.train_sdxl")
FORMAT = 1
PARTS = {"unet": ("unet", "diffusion_pytorch_model.safetensors"), "te1": ("text_encoder", "model.safetensors"),
         "te2": ("text_encoder_2", "model.safetensors")}
TRAIN_WEIGHTS = "train/weights.safetensors"
PIPELINE_PARTS = {"vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"}


def finished(ckpts: Path) -> list[tuple[int, Path]]:
    return checkpoints.step_dirs(ckpts, need=("meta.json", "unet/diffusion_pytorch_model.safetensors"))


def single_file(ckpt: Path) -> Path:
    """The checkpoint's original-layout file."""
    return next(ckpt.glob("*-step-*.safetensors"))


# ------------------------------------------------------------ resume
def resume(t) -> None:
    """Rank 0 chooses (the newest checkpoint of this run's settings, else moves the run aside);
    every rank then loads the same whole states."""
    chosen = [_resumable(t) if t.rank == 0 else None]
    if t.world > 1:
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is not None:
        _load(t, Path(chosen[0]))


def _resumable(t) -> str | None:
    ckpts = checkpoints.step_dirs(t.run_dir / "checkpoints")
    if ckpts and t.p.resume == "auto":
        meta = checkpoints.read_meta(ckpts[-1][1])
        if meta.get("fingerprint") == t.fp:
            return str(ckpts[-1][1])
        why = f"{ckpts[-1][1]} was made with other settings or data (fingerprint {meta.get('fingerprint', '?')[:12]})"
    else:
        why = f"{t.p.SECTION}.resume is never" if ckpts else "no checkpoint to resume from"
    supersede(t.run_dir, why)
    return None


def _read_parts(ckpt: Path, names) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for name in names:
        folder, file = PARTS[name]
        out.update({f"{name}.{k}": v for k, v in load_file(str(ckpt / folder / file)).items()})
    return out


def _load(t, ckpt: Path) -> None:
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True)
    state = checkpoints.load_state(ckpt)
    names = list(t.trainable.keys())
    exported = _read_parts(ckpt, names)
    raw = load_file(str(ckpt / TRAIN_WEIGHTS)) if t.ema is not None else exported
    set_model_state_dict(t.trainable, raw, options=whole)
    # Not strict: weights that never get a gradient have no AdamW state (text encoder 1's last layer:
    # SDXL reads its penultimate one).
    set_optimizer_state_dict(t.trainable, t.opt, state["optimizer"],
                             options=StateDictOptions(full_state_dict=True, strict=False))
    if t.ema is not None:
        from torch.distributed.tensor import DTensor, distribute_tensor
        for n, cur in t.ema.items():
            full = exported[n].to(device=cur.device, dtype=cur.dtype)
            t.ema[n] = (distribute_tensor(full, cur.device_mesh, cur.placements) if isinstance(cur, DTensor)
                        else full)
    t.sched.load_state_dict(state["scheduler"])
    t.batches.load_state_dict(state["data"])
    checkpoints.set_rng_state(state["rng"])
    t.counters = dict(state["counters"])
    t.window.load_state_dict(state["window"])
    t.step = int(checkpoints.read_meta(ckpt)["step"])
    if t.rank == 0:
        log.info("%s: resumed from %s (step %d of %d)", t.p.SECTION, ckpt, t.step, t.p.steps)


# ------------------------------------------------------------ save
def _whole_states(t) -> tuple[dict, dict, dict | None]:
    """(weights, optimizer, EMA) as whole CPU tensors on rank 0 (empty elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(t.trainable, options=opts)
    optim = get_optimizer_state_dict(t.trainable, t.opt, options=opts)
    ema = None
    if t.ema is not None:
        ema = {n: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu() for n, v in t.ema.items()}
    return weights, optim, ema


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src.resolve(), dst)  # the hub cache's files are links to blobs: link the blob
    except OSError:
        shutil.copy2(src, dst)


def _untrained_part(rel: Path, trained: set[str]) -> bool:
    """A file of the base folder the checkpoint's pipeline needs and did not train: the top-level
    configs and marker, and the VAE's, frozen encoders' and tokenizers' configs and full-precision
    weights. Not the variants (model.fp16.safetensors), nor a single-file checkpoint that sits in
    the folder: where links cannot be made they would be copied into every checkpoint."""
    if any(part.startswith(".") for part in rel.parts):
        return False
    if len(rel.parts) == 1:
        return rel.suffix in (".json", ".txt")
    if rel.parts[0] not in PIPELINE_PARTS - trained:
        return False
    variant = any(f".{v}." in rel.name for v in ("fp16", "bf16", "fp32"))
    return rel.suffix in (".json", ".txt") or (rel.suffix == ".safetensors" and not variant)


def _scheduler(t, dst: Path) -> None:
    if t.p.objective != "flow":
        shutil.copytree(t.model.path / "scheduler", dst)
        return
    from diffusers import FlowMatchEulerDiscreteScheduler

    from models.sdxl.objective import TRAIN_TIMESTEPS
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS, shift=t.p.sample_shift).save_config(dst)
    # model_index.json names the class a pipeline loads; a new file, not the hardlinked base one.
    index = dst.parent / "model_index.json"
    doc = json.loads(index.read_text(encoding="utf-8"))
    doc["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    index.unlink()
    index.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write(t, tmp: Path, export: dict, raw: dict, optim: dict) -> None:
    from safetensors.torch import save_file

    from models.sdxl.single_file import save_single_file

    base = t.model.path
    for name, (folder, file) in PARTS.items():
        own = {k[len(name) + 1:]: v.contiguous() for k, v in export.items() if k.startswith(name + ".")}
        if not own:
            continue
        (tmp / folder).mkdir(parents=True)
        shutil.copy2(base / folder / "config.json", tmp / folder / "config.json")
        save_file(own, str(tmp / folder / file), metadata={"format": "pt"})
    trained = {PARTS[n][0] for n in t.trainable.keys()}
    for item in sorted(base.rglob("*")):
        rel = item.relative_to(base)
        if item.is_file() and _untrained_part(rel, trained):
            _link_or_copy(item, tmp / rel)
    _scheduler(t, tmp / "scheduler")
    if t.ema is not None:
        (tmp / "train").mkdir()
        save_file({k: v.contiguous() for k, v in raw.items()}, str(tmp / TRAIN_WEIGHTS))
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[t.p.export_dtype]
    save_single_file(tmp, tmp / f"{t.p.run}-step-{t.step:06d}.safetensors", dtype=dtype)
    state = {"optimizer": optim, "scheduler": t.sched.state_dict(), "data": t.batches.state_dict(),
             "rng": checkpoints.rng_state(), "counters": dict(t.counters), "window": t.window.state_dict()}
    torch.save(state, tmp / "state.pt")


def save(t, loss: float, val_loss: float | None = None) -> Path | None:
    """Step `t.step`, whole or not at all (tasks/training/checkpoints.write_step); the newest
    `keep_checkpoints` stay. Every rank takes part in gathering; rank 0 writes."""
    raw, optim, ema = _whole_states(t)
    path = None
    if t.rank == 0:
        p = t.p
        sizes = Counter(r.size for r in t.rows)
        meta = {"step": t.step, "loss": loss, "val_loss": val_loss, "time": time.time(), "fingerprint": t.fp,
                "format": FORMAT, "section": p.SECTION, "params": as_dict(p), "model": t.model.key(),
                "trainer": "sdxl-full", "world_size": t.world, "effective_batch": p.effective_batch(t.world), "lr": t.lr,
                "scaling_factor": t.scaling, "buckets": sorted({r.bucket for r in t.rows}),
                "sizes": [list(sz) for sz, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))],
                "sampling": {"objective": p.objective, "shift": p.sample_shift, "steps": p.sample_steps,
                             "guidance_scale": p.guidance_scale}}
        export = ema if ema is not None else raw
        path = checkpoints.write_step(t.run_dir / "checkpoints", t.step,
                                      lambda tmp: _write(t, tmp, export, raw, optim), meta)
        checkpoints.prune(t.run_dir / "checkpoints", p.keep_checkpoints)
        log.info("%s: checkpoint %s", p.SECTION, path)
    if t.world > 1:
        dist.barrier()
    return path

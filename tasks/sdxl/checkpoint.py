"""An SDXL LoRA run's checkpoints: every step keeps its own LoRA (diffusers and kohya formats)
and its own TI embeddings, so a sweep pairs step N's LoRA with step N's tokens; the optimizer
state (state.pt) stays with the newest `keep_states` only.

    lora/pytorch_lora_weights.safetensors   diffusers (`pipe.load_lora_weights(dir)`)
    kohya.safetensors                       kohya / ComfyUI / A1111
    embeddings.safetensors                  {clip_l, clip_g} (`pipe.load_textual_inversion`)
    meta.json                               step, fingerprint, params, tokens, base model, sizes
    state.pt                                optimizer, scheduler, RNG, data position, LoRA/TI tensors
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import torch

from tasks.core.params import as_dict
from tasks.training import checkpoints

log = logging.getLogger("niche.train_lora")
FORMAT = 1


def finished(ckpts: Path) -> list[tuple[int, Path]]:
    """Checkpoints with their LoRA, oldest first; older ones keep no state.pt (keep_states)."""
    return checkpoints.step_dirs(ckpts, need=("meta.json",))


def resumable(t) -> tuple[Path, dict] | None:
    """The newest checkpoint with state when it was made by this run's settings; anything else
    in the run is moved aside (tasks/training/run.supersede) and None is returned."""
    from tasks.training.run import supersede

    ckpts = [d for _, d in checkpoints.step_dirs(t.run_dir / "checkpoints")]
    if ckpts and t.p.resume == "auto":
        meta = checkpoints.read_meta(ckpts[-1])
        if meta.get("fingerprint") == t.fp:
            return ckpts[-1], meta
        why = f"{ckpts[-1]} was made with other settings or data (fingerprint {meta.get('fingerprint', '?')[:12]})"
    else:
        why = f"{t.p.SECTION}.resume is never" if ckpts else "no checkpoint to resume from"
    supersede(t.run_dir, why)
    return None


def load(t, ckpt: Path, meta: dict) -> None:
    """Everything of LoraTrainer `t` back as it was at `ckpt`."""
    from peft.utils import set_peft_model_state_dict

    state = checkpoints.load_state(ckpt)
    t.step = int(meta["step"])
    if t.pivotal and t.step >= t.p.ti_steps():
        t.freeze_ti()  # before the optimizer state: its text group no longer holds the tokens
    set_peft_model_state_dict(t.unet, state["lora"]["unet"])
    for name, enc in (("te1", t.text.text_encoder), ("te2", t.text.text_encoder_2)):
        if name in state["lora"]:
            set_peft_model_state_dict(enc, state["lora"][name])
    if t.pivotal:
        t.pivotal.load_state_dict(state["ti"])
    t.opt.load_state_dict(state["optimizer"])
    t.sched.load_state_dict(state["scheduler"])
    t.batches.load_state_dict(state["data"])
    checkpoints.set_rng_state(state["rng"])
    t.counters = dict(state["counters"])
    log.info("%s: resumed from %s (step %d of %d)", t.p.SECTION, ckpt, t.step, t.p.steps)


def save(t, loss: float) -> Path:
    """Step `t.step` of LoraTrainer `t`, whole or not at all (tasks/training/checkpoints.write_step)."""
    from peft.utils import get_peft_model_state_dict

    from models.sdxl.export import save_kohya, save_lora
    from models.sdxl.ti import save_embeddings

    p, ckpts = t.p, t.run_dir / "checkpoints"
    te = [enc if p.text_encoder_lora else None for enc in (t.text.text_encoder, t.text.text_encoder_2)]
    lora = {"unet": get_peft_model_state_dict(t.unet)}
    if p.text_encoder_lora:
        lora.update(te1=get_peft_model_state_dict(te[0], save_embedding_layers=False),
                    te2=get_peft_model_state_dict(te[1], save_embedding_layers=False))
    state = {"lora": lora, "ti": t.pivotal.state_dict() if t.pivotal else {},
             "optimizer": t.opt.state_dict(), "scheduler": t.sched.state_dict(),
             "data": t.batches.state_dict(), "rng": checkpoints.rng_state(), "counters": dict(t.counters)}
    meta = {"step": t.step, "loss": loss, "time": time.time(), "fingerprint": t.fp, "format": FORMAT,
            "section": p.SECTION, "params": as_dict(p), "model": t.model.key(),
            "tokens": t.pivotal.tokens if t.pivotal else [],
            "abstractions": t.pivotal.abstractions if t.pivotal else {},
            "scaling_factor": t.scaling, "buckets": sorted({r.bucket for r in t.rows}),
            # Most common first: what samples default to (tasks/sdxl/sampler.py).
            "sizes": [list(sz) for sz, _ in sorted(Counter(r.size for r in t.rows).items(),
                                                     key=lambda kv: (-kv[1], kv[0]))]}

    def write(tmp: Path) -> None:
        lora_file = save_lora(tmp / "lora", t.unet, *te)
        save_kohya(lora_file, tmp / "kohya.safetensors")
        if t.pivotal:
            save_embeddings(tmp / "embeddings.safetensors", t.pivotal.state_dict())
        torch.save(state, tmp / "state.pt")

    final = checkpoints.write_step(ckpts, t.step, write, meta)
    # Every LoRA + embeddings pair stays (sweeps); optimizer states only for the newest few.
    for _, d in checkpoints.step_dirs(ckpts)[:-p.keep_states]:
        (d / "state.pt").unlink()
    log.info("%s: checkpoint %s", p.SECTION, final)
    return final

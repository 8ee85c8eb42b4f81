"""train_lora / train_wrong: SDXL LoRA with textual-inversion pivotal tuning, on the latents stage.

    python -m tasks.train_lora                          # params.yaml: train_lora (dvc.yaml runs this)
    python -m tasks.train_lora --section train_wrong    # the negative LoRA on the curator's rejects
    python -m tasks.train_lora --stop-at 300            # checkpoint at 300 and stop

A run lives in runs/<run>/: checkpoints/step-N/ and live/ (dvclive). Every checkpoint
holds its own LoRA and its own TI embeddings, so a sweep pairs step N's LoRA with
step N's tokens:
    lora/pytorch_lora_weights.safetensors   diffusers (`pipe.load_lora_weights(dir)`)
    kohya.safetensors                       kohya / ComfyUI / A1111
    embeddings.safetensors                  {clip_l, clip_g} (`pipe.load_textual_inversion`)
    meta.json                               step, fingerprint, params, tokens, base model
    state.pt                                optimizer, scheduler, RNG, data position (newest keep_states only)

Pivotal tuning: new tokens <s0><s1> stand for the trigger word (<s2><s3> for a second
abstraction, ...) in both text encoders;
their embeddings train (at text_encoder_lr) for the first ti_frac of the steps, then
freeze while the LoRA goes on. Frozen text encoders run once per distinct prompt (a
cache), not every step. Resume is exact (the seeded per-step generator, the data
position, the optimizer and the LoRA/TI tensors themselves); a run made with other
settings is moved aside to runs/<run>.superseded-<time>/, never deleted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from models.sdxl import pipeline as sdxl
from models.hub import SetupError, torch_device
from models.sdxl.objective import Objective
from models.sdxl.text import CHUNK, encode_prompts
from tasks.sdxl import data as lora_data
from tasks.training import checkpoints as train_state
from tasks.core.params import as_dict
from tasks.core.stage import section_or_exit, setup_logging
from tasks.train import TrainError, peak_memory_gb, seeded, supersede
from tasks.sdxl.params import NOT_TRAJECTORY, LoraParams, WrongParams
from tasks.training.live import Window, open_live

log = logging.getLogger("niche.train_lora")
SECTIONS = {"train_lora": LoraParams, "train_wrong": WrongParams}
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FORMAT = 1


def lr_lambda(p: LoraParams):
    def f(step: int) -> float:
        if step < p.warmup_steps:
            return (step + 1) / p.warmup_steps
        if p.schedule == "constant":  # the seed's choice: cosine let SDXL's priors creep back late
            return 1.0
        span = max(p.steps - p.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(step - p.warmup_steps, span) / span))
    return f


def finished(checkpoints: Path) -> list[tuple[int, Path]]:
    """Checkpoints with their LoRA, oldest first; older ones keep no state.pt (keep_states)."""
    return train_state.step_dirs(checkpoints, need=("meta.json",))


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
        self.rows = lora_data.load_rows(self.root, p)
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
        self.train_text = bool(self.te_lora or self.ti_params)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_bytes, self.cache_full = 0, False
        self.batches = lora_data.BucketBatches(self.rows, p.batch_size, p.seed, self._prompt_chunks())
        sched_cfg = sdxl.load_scheduler_config(self.model, f"{p.SECTION}.model")
        self.objective = Objective(p.objective, sched_cfg, p.noise_offset, p.t_shift)
        self.scaling = float(sdxl.load_vae_config(self.model, f"{p.SECTION}.model")["scaling_factor"])
        self.opt = self._optimizer()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(p))
        self.fp = self._fingerprint()
        self.step, self.counters = 0, {"skipped_steps": 0, "nonfinite_in_a_row": 0, "spikes": 0}
        self._resume()

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
        doc.update(model=self.model.key(), rows=[(r.id, r.prompt) for r in self.rows], format=FORMAT)
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def _resume(self) -> None:
        ckpts = [d for _, d in train_state.step_dirs(self.run_dir / "checkpoints")]
        if ckpts and self.p.resume == "auto":
            meta = train_state.read_meta(ckpts[-1])
            if meta.get("fingerprint") == self.fp:
                return self._load(ckpts[-1], meta)
            why = f"{ckpts[-1]} was made with other settings or data (fingerprint {meta.get('fingerprint', '?')[:12]})"
        else:
            why = f"{self.p.SECTION}.resume is never" if ckpts else "no checkpoint to resume from"
        supersede(self.run_dir, why)

    def _load(self, ckpt: Path, meta: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        state = train_state.load_state(ckpt)
        self.step = int(meta["step"])
        if self.pivotal and self.step >= self.p.ti_steps():
            self._freeze_ti()  # before the optimizer state: its text group no longer holds the tokens
        set_peft_model_state_dict(self.unet, state["lora"]["unet"])
        for name, enc in (("te1", self.text.text_encoder), ("te2", self.text.text_encoder_2)):
            if name in state["lora"]:
                set_peft_model_state_dict(enc, state["lora"][name])
        if self.pivotal:
            self.pivotal.load_state_dict(state["ti"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(state["data"])
        train_state.set_rng_state(state["rng"])
        self.counters = dict(state["counters"])
        log.info("%s: resumed from %s (step %d of %d)", self.p.SECTION, ckpt, self.step, self.p.steps)

    # ------------------------------------------------------------ text
    def _prompts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [self.pivotal.expand(t) if self.pivotal else t for t in texts]
        if self.train_text:  # live every step (too-long prompts: one summary line at the start)
            return encode_prompts(self.text, texts, self.p.max_chunks, self.device, warn=False)
        got = {}
        for t in dict.fromkeys(texts):  # frozen encoders: each distinct prompt is encoded once for the run
            if t not in self.cache:
                # One prompt at a time: its embedding never depends on which batch it first came in.
                with torch.no_grad():
                    e, pooled = encode_prompts(self.text, [t], self.p.max_chunks, self.device, warn=False)
                self._remember(t, e[0], pooled[0])
                got[t] = (e[0], pooled[0])
            else:
                got[t] = self.cache[t]
        if len({got[t][0].shape[0] for t in texts}) > 1:  # mixed chunk counts: pad with empty chunks alike
            with torch.no_grad():
                return encode_prompts(self.text, texts, self.p.max_chunks, self.device, warn=False)
        return (torch.stack([got[t][0] for t in texts]).to(self.device),
                torch.stack([got[t][1] for t in texts]).to(self.device))

    def _remember(self, text: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """Cache on the host, up to text_cache_gb: 70,000 captions would take ~44 GB (77 x 2048
        fp32 each); past the cap, prompts are encoded again when they come (the same numbers)."""
        size = embeds.numel() * embeds.element_size() + pooled.numel() * pooled.element_size()
        if self.cache_bytes + size > self.p.text_cache_gb * 2**30:
            if not self.cache_full:
                log.info("%s: text cache full at %d prompts (%s.text_cache_gb = %s); the rest are encoded "
                         "when they come", self.p.SECTION, len(self.cache), self.p.SECTION, self.p.text_cache_gb)
                self.cache_full = True
            return
        self.cache[text] = (embeds.cpu(), pooled.cpu())
        self.cache_bytes += size

    def _prompt_chunks(self) -> dict[str, int]:
        """{prompt: its 75-token chunks}, and one warning line for the whole dataset (not one per
        caption: long VLM captions are common, and CLIP reads only max_chunks x 75 tokens)."""
        prompts = sorted({r.prompt for r in self.rows})
        texts = [self.pivotal.expand(t) if self.pivotal else t for t in prompts]
        budget = CHUNK * self.p.max_chunks
        ids = self.text.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
        chunks = {t: min(max(1, -(-len(i) // CHUNK)), self.p.max_chunks) for t, i in zip(prompts, ids)}
        long = [(len(i), t) for i, t in zip(ids, texts) if len(i) > budget]
        if long:
            n, example = max(long)
            log.warning("%s: %d of %d prompts are longer than %d tokens (max_chunks %d x %d); CLIP never reads "
                        "their ends (the longest, %d tokens: %.70r...). Raise %s.max_chunks (up to 3) or shorten "
                        "the captions", self.p.SECTION, len(long), len(texts), budget, self.p.max_chunks, CHUNK, n,
                        example, self.p.SECTION)
        return chunks

    def _freeze_ti(self) -> None:
        for t in self.ti_params:
            t.requires_grad_(False)
            self.opt.state.pop(t, None)  # a state without its parameter in a group breaks state_dict()
        self.opt.param_groups[-1]["params"] = [q for q in self.opt.param_groups[-1]["params"] if q.requires_grad]
        self.train_text = bool(self.te_lora)
        log.info("%s: step %d: the new tokens %s freeze (ti_frac %.2f); the LoRA goes on", self.p.SECTION,
                 self.step, self.pivotal.tokens, self.p.ti_frac)

    # ------------------------------------------------------------ one step
    def _micro(self, batch: list[lora_data.Row], g: torch.Generator) -> float:
        p = self.p
        latents = lora_data.load_latents(batch, self.scaling, p.latent_sample, g).to(self.device)
        prompts = [("" if torch.rand((), generator=g).item() < p.caption_dropout else r.prompt) for r in batch]
        noisy, t, target = self.objective.prepare(latents, g)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            embeds, pooled = self._prompts(prompts)
            ids = torch.tensor([r.time_ids for r in batch], device=self.device, dtype=embeds.dtype)
            pred = self.unet(noisy, t, encoder_hidden_states=embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        loss = F.mse_loss(pred.float(), target.float())
        (loss / p.grad_accum).backward()
        return loss.detach()

    def fit(self, stop_at: int | None = None) -> dict:
        p = self.p
        if self.pivotal and self.step >= p.ti_steps() and self.ti_params[0].requires_grad:
            self._freeze_ti()
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
                self._freeze_ti()
            if self.step % p.log_every == 0 or self.step == end:
                self._log(live, win.flush(), n_win / (time.perf_counter() - t_win))
                t_win, n_win = time.perf_counter(), 0
            if self.step % p.checkpoint_every == 0 or self.step == end:
                self.save(loss)
        live.end()
        return {"step": self.step, **self.counters}

    def _skip(self, step: int, loss: float, grad_norm: float) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.counters["skipped_steps"] += 1
        self.counters["nonfinite_in_a_row"] += 1
        n = self.counters["nonfinite_in_a_row"]
        log.warning("%s: step %d skipped: loss %s, grad norm %s (%d in a row)", self.p.SECTION, step + 1, loss,
                    grad_norm, n)
        if n >= self.p.nan_patience:
            last = finished(self.run_dir / "checkpoints")
            raise TrainError(f"{self.p.SECTION}: {n} steps in a row had a non-finite loss or gradient "
                             f"({self.p.SECTION}.nan_patience = {self.p.nan_patience}); stopped at step {step}. The "
                             f"last good checkpoint is {last[-1][1] if last else 'none yet'}; lower the lr.")

    def _log(self, live, figures: dict, samples_per_s: float) -> None:
        live.step = self.step
        live.log_metric("train/loss", figures["loss"])
        live.log_metric("train/grad_norm", figures["grad_norm"])
        for g in self.opt.param_groups:
            live.log_metric(f"train/lr_{g['name']}", g["lr"] * g.get("d", 1.0))  # prodigy: its estimate d
        live.log_metric("train/skipped_steps", self.counters["skipped_steps"])
        live.log_metric("sys/samples_per_s", samples_per_s)
        live.log_metric("memory/peak_gb", peak_memory_gb(self.device))
        live.next_step()
        log.info("%s: step %d/%d loss %.4f grad %.3f %.2f samples/s", self.p.SECTION, self.step, self.p.steps,
                 figures["loss"], figures["grad_norm"], samples_per_s)

    # ------------------------------------------------------------ checkpoints
    def save(self, loss: float) -> Path:
        from peft.utils import get_peft_model_state_dict

        from models.sdxl.export import save_kohya, save_lora
        from models.sdxl.ti import save_embeddings

        ckpts = self.run_dir / "checkpoints"
        te = [enc if self.p.text_encoder_lora else None for enc in (self.text.text_encoder, self.text.text_encoder_2)]
        lora = {"unet": get_peft_model_state_dict(self.unet)}
        if self.p.text_encoder_lora:
            lora.update(te1=get_peft_model_state_dict(te[0], save_embedding_layers=False),
                        te2=get_peft_model_state_dict(te[1], save_embedding_layers=False))
        state = {"lora": lora, "ti": self.pivotal.state_dict() if self.pivotal else {},
                 "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "data": self.batches.state_dict(), "rng": train_state.rng_state(), "counters": dict(self.counters)}
        meta = {"step": self.step, "loss": loss, "time": time.time(), "fingerprint": self.fp, "format": FORMAT,
                "section": self.p.SECTION, "params": as_dict(self.p), "model": self.model.key(),
                "tokens": self.pivotal.tokens if self.pivotal else [],
                "abstractions": self.pivotal.abstractions if self.pivotal else {},
                "scaling_factor": self.scaling, "buckets": sorted({r.bucket for r in self.rows}),
                # Most common first: what samples default to (tasks/sample_lora.py).
                "sizes": [list(sz) for sz, _ in sorted(Counter(r.size for r in self.rows).items(),
                                                         key=lambda kv: (-kv[1], kv[0]))]}
        def write(tmp: Path) -> None:
            lora_file = save_lora(tmp / "lora", self.unet, *te)
            save_kohya(lora_file, tmp / "kohya.safetensors")
            if self.pivotal:
                save_embeddings(tmp / "embeddings.safetensors", self.pivotal.state_dict())
            torch.save(state, tmp / "state.pt")

        final = train_state.write_step(ckpts, self.step, write, meta)
        # Every LoRA + embeddings pair stays (sweeps); optimizer states only for the newest few.
        for _, d in train_state.step_dirs(ckpts)[:-self.p.keep_states]:
            (d / "state.pt").unlink()
        log.info("%s: checkpoint %s", self.p.SECTION, final)
        return final


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train an SDXL LoRA with pivotal tuning on the latents stage.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--section", default="train_lora", choices=sorted(SECTIONS))
    ap.add_argument("--stop-at", type=int, default=None, help="checkpoint after this step and stop")
    args = ap.parse_args(argv)
    setup_logging()
    p = section_or_exit(SECTIONS[args.section], args.section, args.params)
    try:
        result = LoraTrainer(p).fit(stop_at=args.stop_at)
    except lora_data.NoSamples as e:
        if p.split != "rejected":
            sys.exit(str(e))
        # No rejects is a dataset without a negative LoRA, not a failed pipeline: say so where the
        # checkpoints would be (DVC needs the output) and where a person looks.
        marker = Path("runs") / p.run / "checkpoints" / "NO_SAMPLES.txt"
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{e}\nNo negative LoRA was trained. Put rejected images in data/raw/rejected/ "
                          "(see README) and run `dvc repro train_wrong`.\n", encoding="utf-8")
        log.warning("%s", e)
        return
    except (SetupError, TrainError, FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    log.info("%s: done %s", args.section, json.dumps(result))


if __name__ == "__main__":
    main()

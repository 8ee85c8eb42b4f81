"""Stage `candidates`: every image prompt of the expand table x every seed, rendered by one
generator — the SDXL base (or a full fine-tune's folder), a LoRA run's checkpoint (its LoRA and
TI tokens on the base it trained on), or a NanoDiT checkpoint — into a per-sample store of
PNGs, listed one row per prompt x seed in data/manifest/candidates.parquet for the curator.

    python -m tasks.candidates        # reads params.yaml:candidates

An image's key is its prompt, its seed, every sampler setting that changes its pixels and
`checkpoint_id`, the weights that drew it: the base model's hub revision (or local folder
fingerprint), or a sha256 over the LoRA / NanoDiT weight files, with the dtype. Adding 10
prompts renders 10 x seeds images; a new checkpoint or new settings render everything again,
and the old images stay in the store (going back costs nothing). Identical prompt texts
render once. Models load only when an image is missing: a fully cached run loads nothing.

`checkpoint: newest` is resolved when the stage runs (a LoRA run's newest finished checkpoint,
or the NanoDiT run's); `resolve_checkpoint` says what it means now, so a flow can pin the
param to that folder before DVC runs the stage (DVC cannot depend on "the newest").
Rendering goes through the samplers the sweeps use (tasks/sdxl/sampler.py,
tasks/nanodit/sampler.py), in this process, one image at a time.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from models.hub import SetupError, resolve, torch_device, torch_dtype
from models.sdxl.export import LORA_FILE
from models.sdxl.pipeline import DEFAULT_MODEL, resolve_sdxl
from tasks.core import manifest
from tasks.core.params import PARAMS_FILE, ParamsError, load_section
from tasks.core.runner import run_model, settle_rows
from tasks.core.stage import Report, stage_main
from tasks.core.store import Store, item_key, sha256_file
from tasks.core.workers import LocalModels, Result, Worker, check_device
from tasks.curate.tables import CANDIDATES, CANDIDATES_STORE, CANDIDATES_TABLE, EXPAND, EXPAND_TABLE
from tasks.curate.thumbs import ensure_thumbs
from tasks.sdxl.params import SECTIONS, LoraParams

log = logging.getLogger("niche.candidates")

STAGE = "candidates"
VERSION = 1  # bump when the PNG drawn for the same key would change
NEWEST = "newest"
# The particleArt seed's negative prompt at inference (000_02f061304f16cdf5.txt, section 7).
NEGATIVE = ("photorealistic, detailed, shading, gradient, gray, color, dense, beige, tan, sepia, parchment, "
            "warm tones, blue, colored dots, 3D, lighting")


@dataclass(frozen=True)
class CandidatesParams:
    generator: Literal["sdxl", "lora", "nanodit"] = "sdxl"
    model: str = DEFAULT_MODEL  # sdxl: the base, or a full fine-tune (hub id or diffusers folder)
    checkpoint: str = NEWEST  # lora / nanodit: a checkpoint (or run) folder, or the newest one
    lora_section: str = "train_lora"  # lora: the params section of the run (base, objective, TI, negative LoRA)
    seeds: tuple[int, ...] = (0, 1)
    steps: int = 30
    guidance_scale: float = 5.0  # sdxl, lora: classifier-free guidance against the negative prompt
    negative_prompt: str = NEGATIVE  # sdxl, lora (+ `wrong` with the run's negative LoRA)
    size: tuple[int, int] | None = None  # (width, height); null: 1024x1024, the LoRA run's, NanoDiT's default
    objective: Literal["ddpm", "flow"] = "ddpm"  # sdxl: the model's objective (a LoRA samples with its run's)
    sample_shift: float = 3.0  # the flow objective's Euler schedule shift (sdxl or a flow LoRA run)
    nanodit_guidance: Literal["auto", "cfg", "none", "self"] = "auto"  # auto: the checkpoint's (dual -> cfg)
    nanodit_scale: float | None = None  # null: the checkpoint's sampling.scale
    nanodit_weights: Literal["ema", "model"] = "ema"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def validate(self) -> None:
        def bad(key: str, expected: str) -> ValueError:
            return ValueError(f"{STAGE}.{key}: expected {expected}, got {getattr(self, key)!r}")

        choices = {"generator": ("sdxl", "lora", "nanodit"), "objective": ("ddpm", "flow"),
                   "nanodit_guidance": ("auto", "cfg", "none", "self"), "nanodit_weights": ("ema", "model"),
                   "device": ("auto", "cpu", "cuda"), "lora_section": tuple(SECTIONS)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise bad(key, " or ".join(allowed))
        if not self.model:
            raise bad("model", "a hub id or a local diffusers folder")
        if not self.checkpoint:
            raise bad("checkpoint", f"{NEWEST!r} or a checkpoint folder")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise bad("seeds", "one or more distinct integers >= 0")
        if self.steps < 1:
            raise bad("steps", "an integer >= 1")
        if self.guidance_scale < 0 or (self.nanodit_scale is not None and self.nanodit_scale < 0):
            raise bad("guidance_scale" if self.guidance_scale < 0 else "nanodit_scale", "a number >= 0")
        if self.sample_shift <= 0:
            raise bad("sample_shift", "a positive number")
        multiple = 8 if self.generator == "nanodit" else 64  # NanoDiT: its patch size, checked at the checkpoint
        if self.size is not None and (len(self.size) != 2 or min(self.size) < multiple
                                      or any(s % multiple for s in self.size)):
            raise bad("size", f"[width, height], multiples of {multiple} for {self.generator}, or null")


class _AsCandidates(LoraParams):
    """The base model's settings in the shape SDXLSampler reads; its errors name this section."""
    SECTION: ClassVar[str] = STAGE


# ---------------------------------------------------------------- what draws the images

def _lora_params(p: CandidatesParams, params_file: Path) -> LoraParams:
    try:
        return load_section(SECTIONS[p.lora_section], p.lora_section, params_file)
    except (ParamsError, ValueError) as e:
        raise SetupError(f"{STAGE}.lora_section = {p.lora_section}: {e}") from None


def _nanodit_error(e: Exception) -> SetupError:
    return SetupError(f"{STAGE} (nanodit): {e}")


def resolve_checkpoint(p: CandidatesParams, root: Path = Path("."),
                       params_file: Path = PARAMS_FILE) -> tuple[str, Path | None]:
    """What `p.checkpoint` means now: (the value to pin `candidates.checkpoint` to, the folder).

    lora: `newest` is the newest finished checkpoint of runs/<lora_section's run>/; a path is a
    checkpoint folder, or a run folder (its newest). nanodit: `newest` is the newest checkpoint of
    runs/<train.run>/; a path, as tasks.generate's --checkpoint. sdxl needs none: (p.checkpoint,
    None). The value is relative to `root` when the folder is under it. SetupError when none is.
    """
    from tasks.nanodit.conditioning import GenerateError
    from tasks.nanodit.sampler import find_checkpoint
    from tasks.sdxl.checkpoint import finished

    root = Path(root)
    if p.generator == "sdxl":
        return p.checkpoint, None
    if p.checkpoint == NEWEST:
        if p.generator == "lora":
            run = root / "runs" / _lora_params(p, params_file).run
            where = f"{STAGE}.checkpoint = {NEWEST} ({p.lora_section}'s run {run})"
        else:
            from tasks.nanodit.params import TrainParams
            try:
                run = root / "runs" / load_section(TrainParams, "train", params_file).run
            except (ParamsError, ValueError) as e:
                raise SetupError(f"{STAGE}.checkpoint = {NEWEST} reads the NanoDiT run from train.run: {e}") from None
            where = f"{STAGE}.checkpoint = {NEWEST} (train's run {run})"
    else:
        run = Path(p.checkpoint) if Path(p.checkpoint).is_absolute() else root / p.checkpoint
        where = f"{STAGE}.checkpoint {p.checkpoint}"
        if not run.exists():
            raise SetupError(f"{where}: not found (a checkpoint folder, a run folder, or {NEWEST})")
    if p.generator == "nanodit":
        try:
            folder = find_checkpoint(run)
        except GenerateError as e:
            raise SetupError(f"{where}: {e}") from None
    else:
        found = [(0, run)] if (run / "meta.json").is_file() else finished(run / "checkpoints") or finished(run)
        if not found:
            raise SetupError(f"{where}: no finished checkpoint (step-*/meta.json) there; train the LoRA "
                             f"first (dvc repro {p.lora_section}) or name a checkpoint folder")
        folder = found[-1][1]
        if not (folder / "lora" / LORA_FILE).is_file():
            raise SetupError(f"{where}: {folder} has no lora/{LORA_FILE}; not a LoRA checkpoint")
    try:
        value = folder.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        value = str(folder)
    return value, folder


def _digest(files: list[Path], extra: Any) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in files:
        h.update(f"{f.name}\0{sha256_file(f)}\0".encode())
    return h.hexdigest()[:16]


@dataclass
class Plan:
    """Everything decided before a model loads: what the table records, what goes into every
    key, and how to build the renderer (only when an image is missing)."""
    generator: str
    checkpoint: str  # the model id or the checkpoint folder, as the table records it
    checkpoint_id: str  # in every key
    size: tuple[int, int]  # (width, height)
    settings: dict  # the sampler settings in every key
    open: Callable[[], Callable[[str, int], Any]]  # -> render(prompt, seed) -> PIL image
    text: Callable[[str], str] = lambda prompt: prompt  # the text the model reads for a prompt
    tiny: bool = False
    info: dict = field(default_factory=dict)


def plan(p: CandidatesParams, root: Path = Path("."), params_file: Path = PARAMS_FILE) -> Plan:
    """The generator of `p`, resolved and identified without loading it."""
    root = Path(root)
    if p.generator == "nanodit":
        return _plan_nanodit(p, root, params_file)
    from tasks.sdxl.sampler import SDXLSampler, negative_for, sample_size

    device = torch_device() if p.device == "auto" else p.device
    dtype = "bfloat16" if device == "cuda" else "float32"  # what SDXLSampler computes in
    common = dict(sample_steps=p.steps, guidance_scale=p.guidance_scale, sample_shift=p.sample_shift,
                  negative_prompt=p.negative_prompt)
    if p.generator == "sdxl":
        base = resolve_sdxl(p.model, f"{STAGE}.model")
        size = tuple(p.size or (1024, 1024))
        lp: LoraParams = _AsCandidates(model=p.model, objective=p.objective, max_chunks=1, negative_lora=None,
                                       sample_size=size, **common)
        ckpt, checkpoint, checkpoint_id, extra = None, p.model, f"{base.key()}:{dtype}", {}
    else:
        from tasks.sdxl.checkpoint import finished

        checkpoint, ckpt = resolve_checkpoint(p, root, params_file)
        run_p = _lora_params(p, params_file)
        base = resolve_sdxl(run_p.model, f"{run_p.SECTION}.model")
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8"))
        if meta.get("model") not in (None, base.key()):
            log.warning("%s: trained on %s, sampled here on %s (%s.model)", ckpt, meta["model"], base.key(),
                        run_p.SECTION)
        size = tuple(p.size or sample_size(run_p, meta))
        lp = replace(run_p, sample_size=size, **common)
        files = [ckpt / "lora" / LORA_FILE]
        files += [ckpt / "embeddings.safetensors"] if (ckpt / "embeddings.safetensors").is_file() else []
        negative_lora = None
        if lp.negative_lora:
            neg_run = Path(lp.negative_lora) if Path(lp.negative_lora).is_absolute() else root / lp.negative_lora
            found = finished(neg_run / "checkpoints")  # SDXLSampler refuses a run without one
            negative_lora = [_digest([found[-1][1] / "lora" / LORA_FILE], None),
                             lp.negative_lora_scale] if found else None
        extra = {"objective": lp.objective, "max_chunks": lp.max_chunks,
                 "trigger": list(lp.trigger) if lp.ti and lp.prompt is None else None}
        ident = {"base": base.key(), "negative_lora": negative_lora,
                 **{k: meta.get(k) for k in ("tokens", "abstractions", "scaling_factor")}}
        checkpoint_id = f"lora-{_digest(files, ident)}:{dtype}"
    negative = negative_for(lp)
    settings = {"steps": p.steps, "guidance_scale": p.guidance_scale, "negative_prompt": negative,
                "size": list(size), "objective": lp.objective,
                "shift": p.sample_shift if lp.objective == "flow" else None, **extra}

    def open_sdxl() -> Callable[[str, int], Any]:
        check_device(device)
        sampler = SDXLSampler(lp, root=root, device=device)
        return lambda text, seed: sampler.sample(ckpt, text, seed, negative)

    # A LoRA run reads its captions with the trigger put in front (LoraParams.prompt_for): so do its samples.
    text = (lambda prompt: lp.prompt_for(prompt)) if extra.get("trigger") else (lambda prompt: prompt)
    return Plan(p.generator, checkpoint, checkpoint_id, size, settings, open_sdxl, text, base.tiny,
                {"base": base.key(), "dtype": dtype, "device": device})


def _plan_nanodit(p: CandidatesParams, root: Path, params_file: Path) -> Plan:
    from models.encoders import t5
    from tasks.embed_text import EmbedTextParams
    from tasks.nanodit.conditioning import GenerateError, section
    from tasks.nanodit.sampler import NanoDiTSampler, parse_guidance, read_meta

    checkpoint, ckpt = resolve_checkpoint(p, root, params_file)
    try:
        meta = read_meta(ckpt)
        sampling = meta.get("sampling") or {}
        guidance = parse_guidance(p.nanodit_guidance, sampling, has_reference=False)
        scale = p.nanodit_scale if p.nanodit_scale is not None else float(sampling.get("scale", 3.0))
        sampler = NanoDiTSampler(size=p.size, steps=p.steps, guidance=guidance, scale=scale,
                                 weights=p.nanodit_weights, device=p.device)
        size = sampler.default_size(meta, ckpt, sampler.patch_size(ckpt))
        text_p = section(meta, "embed_text", EmbedTextParams, ckpt)
        t5_model = resolve(text_p.model, "embed_text.model", text_p.revision, allow_patterns=t5.ALLOW_PATTERNS)
    except GenerateError as e:
        raise _nanodit_error(e) from None
    weights = sorted(f for f in (ckpt / p.nanodit_weights).rglob("*") if f.is_file())
    t5_dtype = str(torch_dtype(text_p.dtype, sampler.device)).removeprefix("torch.")
    # meta.json holds what else changes pixels: the trigger, T5's settings, route and shift.
    checkpoint_id = f"nanodit-{_digest(weights + [ckpt / 'meta.json'], [t5_model.key(), t5_dtype])}:float32"
    settings = {"steps": p.steps, "guidance": guidance, "scale": scale, "size": list(size),
                "weights": p.nanodit_weights}

    def open_nanodit() -> Callable[[str, int], Any]:
        sampler.load(ckpt)  # T5 loads with the first prompt (and stays: conditioning._t5_encoder)
        # NanoDiT guides against the empty prompt, as it learnt with caption dropout and as tasks.generate does.
        return lambda text, seed: sampler.sample(ckpt, text, seed, None)

    return Plan("nanodit", checkpoint, checkpoint_id, tuple(size), settings, open_nanodit, tiny=t5_model.tiny,
                info={"text_encoder": t5_model.key(), "device": sampler.device, "step": meta.get("step")})


# ---------------------------------------------------------------- rendering

@dataclass(frozen=True)
class RenderInput:
    text: str  # what the model reads
    seed: int
    info: dict  # written into the PNG's "niche" text chunk


def png_bytes(image, info: dict) -> bytes:
    """The image as PNG bytes, its settings in a "niche" text chunk (as tasks.generate writes)."""
    from PIL.PngImagePlugin import PngInfo

    chunk = PngInfo()
    chunk.add_text("niche", json.dumps(info, sort_keys=True, ensure_ascii=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=chunk)
    return buf.getvalue()


class CandidateWorker(Worker):
    """The generator, loaded once per stage run (in setup, only when an image is missing)."""

    def __init__(self, plan: Plan):
        self.plan, self.render = plan, None

    def setup(self) -> str:
        self.render = self.plan.open()
        return f"{STAGE}: {self.plan.generator} {self.plan.checkpoint} ({self.plan.checkpoint_id}) loaded"

    def run(self, inputs: list[RenderInput]) -> list[Result]:
        return [png_bytes(self.render(x.text, x.seed), x.info) for x in inputs]


def candidates(p: CandidatesParams, in_table: Path = EXPAND_TABLE, out_table: Path = CANDIDATES_TABLE,
               store_dir: Path = CANDIDATES_STORE, workers: int | None = None, params_file: Path = PARAMS_FILE,
               root: Path = Path(".")) -> Report:
    """Render every missing prompt x seed of `in_table`; write `out_table`. `workers` is unused:
    one model draws one image at a time and spreads itself over the cores (or the GPU)."""
    t_stage = time.perf_counter()
    p.validate()
    try:
        expand_rows = manifest.read_table(Path(in_table), EXPAND).to_pylist()
    except FileNotFoundError as e:
        raise SetupError(f"{e} (dvc repro expand)") from None
    prompts: dict[str, dict] = {}  # prompt -> its first expand row (the table is sorted by id)
    for r in expand_rows:
        if r["prompt"] is not None:
            prompts.setdefault(r["prompt"], r)
    if not prompts:  # no words yet: nothing to render, and no generator to find or load
        log.info("%s: %s holds no prompt: nothing to render", STAGE, in_table)
        manifest.write_table([], CANDIDATES, Path(out_table), sort_by="id")
        Store(store_dir, ".png", layout="loose").mark()  # the stage's out exists, empty
        return Report(STAGE, seconds=time.perf_counter() - t_stage,
                      extra={"generator": p.generator, "prompts": 0, "expand_rows": len(expand_rows)})
    g = plan(p, root, params_file)
    # Loose, one PNG per file: the curation page serves each render (and its thumbnail) as a file,
    # and a dataset's candidates are thousands, not the 500,000 items that packs are for.
    store = Store(store_dir, ".png", layout="loose")
    rows, inputs, work = [], {}, []
    for prompt, src in prompts.items():
        text = g.text(prompt)
        for seed in p.seeds:
            key = item_key(STAGE, VERSION, [prompt, str(seed)], g.settings, model=g.checkpoint_id)
            rows.append(dict(id=key, prompt=prompt, seed=seed, word=src["word"], template=src["template"],
                             generator=g.generator, checkpoint=g.checkpoint, checkpoint_id=g.checkpoint_id,
                             key=key, file=store.relpath(key), width=g.size[0], height=g.size[1], error=None))
            inputs[key] = RenderInput(text, seed, {"prompt": prompt, "text": text, "seed": seed,
                                                   "generator": g.generator, "checkpoint": g.checkpoint,
                                                   "checkpoint_id": g.checkpoint_id, **g.settings})
            work.append((key, key))

    executor = LocalModels()  # the checkpoint's files are here; one GPU draws one image at a time
    t_run = time.perf_counter()
    report = run_model(STAGE, work, store, CandidateWorker(g), inputs.__getitem__, batch_size=1, executor=executor)
    busy = time.perf_counter() - t_run - executor.setup_s if report.computed else 0.0

    def write(rs: list[dict]) -> None:
        for r in rs:
            if r["error"] is not None:
                r.update(width=None, height=None)
        manifest.write_table(rs, CANDIDATES, Path(out_table), sort_by="id")

    settle_rows(rows, {}, report, write)
    # The curation page's grid reads these, not the full renders (tasks/curate/thumbs.py).
    thumbs = ensure_thumbs(Path(store_dir), [r["key"] for r in rows if r["key"]])
    report.seconds = time.perf_counter() - t_stage
    report.extra = {
        "generator": g.generator, "checkpoint": g.checkpoint, "checkpoint_id": g.checkpoint_id,
        "size": f"{g.size[0]}x{g.size[1]}", "steps": p.steps, "seeds": list(p.seeds), "prompts": len(prompts),
        "expand_rows": len(expand_rows), "no_prompt": sum(r["prompt"] is None for r in expand_rows),
        "images_per_second": round(report.computed / report.seconds, 3) if report.seconds > 0 else 0.0,
        "images_per_second_model_up": round(report.computed / busy, 3) if busy > 0 else 0.0,
        "model_load_seconds": round(executor.setup_s, 3), "tiny_model": g.tiny, **g.info,
        "thumbnails_written": thumbs, "failures": dict(sorted(report.failures.items()))}
    return report


def main(argv: list[str] | None = None) -> None:
    stage_main(STAGE, CandidatesParams, candidates, __doc__, argv)


if __name__ == "__main__":
    main()

"""A NanoDiT checkpoint's trip to an image, in one place: find and load the checkpoint, encode
its conditioning as the dataset stages did (tasks/nanodit/conditioning.py), size the image as
it trained, and sample (models/flow_matching.py). `python -m tasks.generate`, the checkpoint
sweep (tasks/sweep.py, tasks/report/sweep_grid.py), the validation suite (tasks/validate.py)
and the validate flow's sweep all go through `NanoDiTSampler`.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from PIL import Image

from tasks.nanodit.conditioning import (META, POSE_JOINTS, GenerateError, caption_trigger, encode_text,
                                        prompt_text, section)

log = logging.getLogger("niche.generate")

GUIDANCE = ("cfg", "none", "self")  # what a text-only sample can use (dual needs a reference image)
GUIDANCE_CHOICES = ("auto", "none", "cfg", "self", "dual")
WEIGHTS = ("ema", "model")
STEP_DIR = re.compile(r"step-(\d+)$")


# ---------------------------------------------------------------- a checkpoint

def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder as given, or a run folder's (or its checkpoints/ folder's) newest one."""
    path = Path(path)
    if not path.exists():
        raise GenerateError(f"--checkpoint {path}: not found")
    if (path / META).is_file():
        return path
    if not path.is_dir():
        raise GenerateError(f"--checkpoint {path}: expected a checkpoint folder (with {META}) or a run folder")
    for folder in (path / "checkpoints", path):
        steps = [(int(m.group(1)), d) for d in folder.glob("step-*")
                 if (m := STEP_DIR.match(d.name)) and (d / META).is_file()] if folder.is_dir() else []
        if steps:
            return max(steps)[1]
    raise GenerateError(f"--checkpoint {path}: no {META} here and no checkpoints/step-*/{META} under it; "
                        "expected a checkpoint folder or a run folder with at least one finished checkpoint")


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GenerateError(f"{ckpt / META}: unreadable ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("dataset_params"), dict):
        raise GenerateError(f"{ckpt / META}: no dataset_params (the params the training data was built with)")
    return meta


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' → (W, H)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise GenerateError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1024x1024")
    return int(m.group(1)), int(m.group(2))


def check_size(size: tuple[int, int], multiple: int, why: str) -> None:
    w, h = size
    if w % multiple or h % multiple:
        raise GenerateError(f"--size {w}x{h}: width and height must be multiples of {multiple} ({why}); "
                            f"e.g. --size {max(multiple, w // multiple * multiple)}x"
                            f"{max(multiple, h // multiple * multiple)}")


def trained_scale(meta: dict) -> float:
    """The fraction of the bucket size the checkpoint's last step trained at (train.image_scale
    times its resolution_schedule factor; 1 when meta.json has no training params)."""
    params = meta.get("params") or {}
    scale = float(params.get("image_scale", 1.0))
    last = int(meta.get("step", 0)) - 1  # the 0-based index of the last step trained
    for until, factor in params.get("resolution_schedule") or ():
        if last < until:
            return scale * float(factor)
    return scale


def scaled_size(bucket: tuple[int, int], scale: float, patch: int) -> tuple[int, int]:
    """(W, H) of a bucket at `scale`, on the patch grid, rounded as the trainer rounds it."""
    return tuple(max(patch, round(side * scale / patch) * patch) for side in bucket)  # type: ignore[return-value]


def parse_guidance(requested: str, sampling: dict, has_reference: bool) -> str:
    if requested not in GUIDANCE_CHOICES:
        raise GenerateError(f"--guidance {requested!r}: expected one of {', '.join(GUIDANCE_CHOICES)}")
    if requested != "auto":
        if requested == "dual" and not has_reference:
            raise GenerateError("--guidance dual guides by the reference image (DINOv3) as well as the text: "
                                "give --reference, or use --guidance cfg")
        return requested
    guidance = sampling.get("guidance", "cfg")
    if guidance == "dual" and not has_reference:
        log.info("guidance: the checkpoint's default is 'dual', which needs a reference image; "
                 "without --reference using 'cfg'")
        return "cfg"
    return guidance


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: torch sees no CUDA device here; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise GenerateError(f"--device {device!r}: expected auto, cpu or cuda")
    return device


def to_pil(images) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → RGB images."""
    import torch

    u8 = ((images.float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(x.permute(1, 2, 0).numpy(), "RGB") for x in u8]


# ---------------------------------------------------------------- the sampler

class NanoDiTSampler:
    """Checkpoints of a NanoDiT run (or single checkpoints, with run_dir None) to images.

    The sweep's protocol (tasks/report/sweep_grid.py): `checkpoints()` and `sample(ckpt,
    prompt, seed, negative)`, text only. The parts the other callers use: `load(ckpt)` (meta and
    model, kept while the caller stays on one checkpoint), `encode(meta, ckpt, text)` (T5 states as
    the shards hold them, once per text), `prompt(meta, ckpt, prompt)` (the same after the caption
    stage's normalisation and trigger) and `denoise(model, cond, (H, W), **settings)`.
    """

    def __init__(self, run_dir: str | Path | None = None, size: tuple[int, int] | str | None = None,
                 steps: int | None = None, guidance: str = "cfg", scale: float = 3.0, weights: str = "ema",
                 device: str = "auto", bf16: bool = False):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if self.run_dir is not None and not self.run_dir.is_dir():
            raise GenerateError(f"--run {self.run_dir}: not found (a run folder, e.g. runs/nanodit)")
        if guidance == "dual":  # the validate flow passes validate.guidance, which may be dual
            log.info("sweep: guidance dual guides with a reference image's DINOv3 parts; the sweep samples "
                     "from text alone, so it uses cfg")
            guidance = "cfg"
        if guidance not in GUIDANCE:
            raise GenerateError(f"--guidance {guidance!r}: expected one of {', '.join(GUIDANCE)}")
        if weights not in WEIGHTS:
            raise GenerateError(f"--weights {weights!r}: expected ema or model")
        if steps is not None and steps < 1:
            raise GenerateError(f"--steps {steps}: expected at least 1")
        self.size = parse_size(size) if isinstance(size, str) else (tuple(size) if size else None)
        self.steps, self.guidance, self.scale, self.weights = steps, guidance, float(scale), weights
        self.device, self.bf16 = resolve_device(device), bf16
        self._texts: dict[tuple[str, str], object] = {}  # (embed_text params, text) -> T5 states
        self._loaded: tuple[Path, dict, object] | None = None  # the current checkpoint's meta and model

    def describe(self) -> dict:
        return {"sampler": "nanodit", "run": str(self.run_dir), "size": list(self.size) if self.size else None,
                "steps": self.steps, "guidance": self.guidance, "scale": self.scale, "weights": self.weights,
                "device": self.device, "parts": "text only"}

    def checkpoints(self) -> list[tuple[int, Path]]:
        from tasks.training.checkpoints import step_dirs

        if self.run_dir is None:
            raise GenerateError("a sampler made for single checkpoints has no run to list (give run_dir)")
        found = step_dirs(self.run_dir / "checkpoints")
        if not found:
            raise GenerateError(f"--run {self.run_dir}: no finished checkpoint under {self.run_dir / 'checkpoints'} "
                                "(step-NNNNNN/ with meta.json and state.pt); train first, or wait for the first "
                                "checkpoint_every steps")
        return found

    # ------------------------------------------------------------ a checkpoint
    def load(self, ckpt: Path):
        """(meta, model) of a checkpoint, kept while the caller stays on it (a sweep's row)."""
        from models.nanodit import NanoDiT

        ckpt = Path(ckpt)
        if self._loaded is None or self._loaded[0] != ckpt:
            self._loaded = None  # free the previous checkpoint's model first
            meta = read_meta(ckpt)
            weights_dir = ckpt / self.weights
            if not (weights_dir / "config.json").is_file():
                other = "model" if self.weights == "ema" else "ema"
                raise GenerateError(f"{ckpt}: no {self.weights}/ weights (config.json); try --weights {other}")
            model = NanoDiT.from_pretrained(weights_dir).to(self.device).eval().requires_grad_(False)
            self._loaded = (ckpt, meta, model)
        return self._loaded[1], self._loaded[2]

    # ------------------------------------------------------------ conditioning
    def encode(self, meta: dict, ckpt: Path, text: str):
        """(n, D) T5 states of `text` as written (a training caption), through the checkpoint's
        embed_text model, rounded as the shards hold them; encoded once per text and model."""
        key = (json.dumps(meta["dataset_params"].get("embed_text"), sort_keys=True), text)
        if key not in self._texts:
            self._texts[key] = encode_text(meta, ckpt, text, self.device)
        return self._texts[key]

    def prompt(self, meta: dict, ckpt: Path, prompt: str):
        """(1, n, D) T5 states on the device of a prompt written as the caption stage writes captions."""
        import torch

        text = prompt_text(prompt, caption_trigger(meta))
        return torch.as_tensor(self.encode(meta, ckpt, text), dtype=torch.float32, device=self.device)[None]

    def text_only(self, model, t5, ckpt: Path):
        """Conditioning of text alone: the other parts are dropped (`keep`), not zeroed."""
        import torch

        from models.nanodit import Conditioning

        dev, cfg = self.device, model.config
        if t5.shape[-1] != cfg.text_dim:
            raise GenerateError(f"embed_text.model gives {t5.shape[-1]}-wide states but {ckpt} expects "
                                f"text_dim {cfg.text_dim}")
        return Conditioning(
            t5=t5, t5_mask=torch.ones(1, t5.shape[1], dtype=torch.bool, device=dev),
            # Dropped parts are masked out of attention: 1x1 placeholders cost nothing.
            dino_cls=torch.zeros(1, cfg.dino_dim, device=dev),
            dino_patches=torch.zeros(1, 1, 1, cfg.dino_dim, device=dev),
            pose=torch.zeros(1, POSE_JOINTS, 3, device=dev),
            keep=torch.tensor([[True, False, False, False]], device=dev))

    def patch_size(self, ckpt: Path) -> int:
        """The weights' patch size, from their config.json: known before the model loads."""
        config = Path(ckpt) / self.weights / "config.json"
        try:
            return int(json.loads(config.read_text(encoding="utf-8")).get("patch_size", 16))
        except (OSError, ValueError) as e:
            raise GenerateError(f"{config}: unreadable ({e}); a checkpoint with {self.weights}/ weights "
                                "is expected") from None

    def default_size(self, meta: dict, ckpt: Path, patch: int) -> tuple[int, int]:
        """`size`, else the first bucket at the scale the checkpoint trained at, on the patch grid
        (`patch`: the model's patch size; `patch_size(ckpt)` before it loads)."""
        from tasks.bucket import BucketParams

        size = self.size
        if size is None:
            bucket = section(meta, "bucket", BucketParams, ckpt).buckets[0]
            size = scaled_size(bucket, trained_scale(meta), patch)
        check_size(size, patch, f"the model's patch_size is {patch}")
        return int(size[0]), int(size[1])

    # ------------------------------------------------------------ sampling
    def denoise(self, model, cond, hw: tuple[int, int], **settings):
        """(B, 3, H, W) in [-1, 1]: Euler sampling (models/flow_matching.py) with `settings`
        (steps, guidance, scale, scale_dino, route, shift, seed, negative), bf16 when asked."""
        import torch

        from models.flow_matching import euler_sample

        with torch.no_grad(), torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16,
                                             enabled=self.bf16):
            return euler_sample(model, cond, hw, **settings).float()

    def sample(self, ckpt: Path, prompt: str, seed: int, negative: str | None) -> Image.Image:
        if negative and self.guidance != "cfg":
            raise GenerateError(f"--negative guides as cfg does, against the negative prompt: it needs --guidance "
                                f"cfg, not {self.guidance!r}")
        meta, model = self.load(Path(ckpt))
        sampling = meta.get("sampling") or {}
        w, h = self.default_size(meta, ckpt, model.config.patch_size)
        cond = self.text_only(model, self.prompt(meta, ckpt, prompt), ckpt)
        neg = self.text_only(model, self.prompt(meta, ckpt, negative), ckpt) if negative else None
        images = self.denoise(model, cond, (h, w), steps=self.steps or int(sampling.get("steps", 50)),
                              guidance=self.guidance, scale=self.scale, route=float(sampling.get("route", 0.5)),
                              shift=float(sampling.get("shift", 1.0)), seed=int(seed), negative=neg)
        return to_pil(images)[0]

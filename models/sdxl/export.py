"""The LoRA files users load elsewhere: diffusers' pytorch_lora_weights.safetensors and kohya's.

`save_lora` writes what `StableDiffusionXLPipeline.load_lora_weights(folder)` reads, the
way diffusers' train_dreambooth_lora_sdxl.py writes it (peft state dicts converted to
diffusers keys), plus the adapters' peft configs as safetensors metadata: without them
a loader must assume lora_alpha == rank, and an adapter trained with another alpha
would load at the wrong strength.

`save_kohya` converts that file to the `lora_unet_*` / `lora_te1_*` / `lora_te2_*` keys
with per-module `.alpha` that ComfyUI, A1111, SD.Next and InvokeAI read (as the
advanced SDXL script does). Kohya's scale is alpha / rank, so alpha is taken from the
saved config rather than diffusers' default of alpha = rank.

Both write where they are told, as they go: the trainer calls them inside a checkpoint's
hidden temporary folder that is renamed into place whole (tasks/training/checkpoints.py),
so a half-written LoRA is never mistaken for a finished one. (models/ never imports tasks/.)
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

LORA_FILE = "pytorch_lora_weights.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
ADAPTER = "default"


def _adapter(model, text_encoder: bool):
    """(LoRA state dict, peft config dict) or None when `model` carries no LoRA."""
    if model is None or ADAPTER not in (getattr(model, "peft_config", None) or {}):
        return None
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    # save_embedding_layers=False: pivotal tuning resized the token embeddings, and peft would
    # then put the whole (49,410 x 768) matrix in the LoRA; the new rows go to their own file.
    layers = get_peft_model_state_dict(model, adapter_name=ADAPTER, save_embedding_layers=False)
    if not text_encoder:
        return layers, model.peft_config[ADAPTER].to_dict()  # the UNet stays in peft keys, as diffusers' scripts do
    layers = convert_state_dict_to_diffusers(layers)
    if not hasattr(model, "text_model"):
        # transformers 5 flattened CLIPTextModel (no `text_model.`); every other reader
        # (kohya, ComfyUI, A1111, older diffusers) expects the usual `text_model.encoder...`
        # names, and diffusers 0.42 strips the prefix again when loading.
        layers = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in layers.items()}
    return layers, model.peft_config[ADAPTER].to_dict()


def save_lora(folder: Path, unet, text_encoder=None, text_encoder_2=None) -> Path:
    """`folder`/pytorch_lora_weights.safetensors; text encoders only when they carry a LoRA."""
    from diffusers import StableDiffusionXLPipeline

    parts = {name: _adapter(m, name != "unet") for name, m in
             (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2))}
    if parts["unet"] is None:
        raise ValueError("save_lora: the UNet carries no LoRA adapter named 'default'")
    kwargs = {}
    for name, part in parts.items():
        if part is not None:
            kwargs[f"{name}_lora_layers"], kwargs[f"{name}_lora_adapter_metadata"] = part
    folder = Path(folder)
    path = folder / LORA_FILE

    folder.mkdir(parents=True, exist_ok=True)
    # save_lora_weights names the file itself and may write more than it: a private folder, then
    # only the LoRA file is moved in.
    with tempfile.TemporaryDirectory(dir=folder, prefix=".lora-") as d:
        StableDiffusionXLPipeline.save_lora_weights(d, safe_serialization=True, **kwargs)
        shutil.move(Path(d) / LORA_FILE, path)
    return path


def _kohya_alphas(kohya: dict, metadata: dict) -> None:
    """Set each module's `.alpha` so that kohya's alpha / rank equals peft's scaling."""
    import torch

    prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        part = next((p for pre, p in prefixes.items() if key.startswith(pre)), None)
        if part is None or f"{part}.lora_alpha" not in metadata:
            continue  # no config saved: keep diffusers' assumption alpha = rank
        if metadata.get(f"{part}.alpha_pattern"):
            raise ValueError(f"save_kohya: {part} uses a per-module alpha_pattern; kohya export supports "
                             "one lora_alpha per model")
        rank = kohya[key.replace(".alpha", ".lora_down.weight")].shape[0]
        alpha = float(metadata[f"{part}.lora_alpha"])
        if metadata.get(f"{part}.use_rslora"):  # peft scales by alpha / sqrt(r), kohya by alpha / r
            alpha *= math.sqrt(rank)
        kohya[key] = torch.tensor(alpha)


def save_kohya(diffusers_lora_file: Path, out: Path) -> Path:
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(diffusers_lora_file), framework="pt") as f:
        metadata = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(load_file(str(diffusers_lora_file))))
    _kohya_alphas(kohya, metadata)
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(kohya, str(out), metadata={"format": "pt"})
    return out

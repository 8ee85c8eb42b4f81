"""An SDXL diffusers folder as ONE .safetensors file in Stability's original (SGM) key layout.

ComfyUI, A1111/Forge, SD.Next and `StableDiffusionXLPipeline.from_single_file` all expect the
single checkpoint file Stability ships (sd_xl_base_1.0.safetensors), not diffusers' folder of
parts, so a model trained here is only usable there once it is written in that layout:

  model.diffusion_model.*                    the UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*                        the VAE (ldm encoder.down.N.block.M / decoder.up.N ...)
  conditioner.embedders.0.transformer.*      CLIP ViT-L, in transformers' own key names
  conditioner.embedders.1.model.*            OpenCLIP ViT-bigG, in open_clip's key names

The mapping is the inverse of what diffusers' loaders do on the way in (single_file_utils.py:
convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint, convert_open_clip_checkpoint; and the
hard-coded scripts/convert_diffusers_to_original_sdxl.py). It was learned from them but is
derived from the UNet's config (block counts, layers_per_block, which blocks carry attention),
so the tiny SDXL of the tests maps by the same code as the real one. Every key must map: an
unknown key raises rather than being dropped, because a loader that does not find a weight
silently keeps its random initialisation.

May import: models only (never tasks or flows).
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

import torch

UNET, VAE = "model.diffusion_model.", "first_stage_model."
TE1, TE2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
           "text_encoder": "model", "text_encoder_2": "model"}

# diffusers ResnetBlock2D → ldm ResBlock (UNet) and ResnetBlock (VAE, which keeps norm1/conv1/...).
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
# The VAE's mid-block attention: diffusers Attention (linear) → ldm AttnBlock (1x1 convs).
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}
# CLIPTextModelWithProjection (transformers) → open_clip's text tower.
OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def _split(rest: str, table: dict) -> str:
    """`rest` is '<module>.<param>' with <module> a key of `table` (possibly dotted)."""
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old):]
    raise KeyError(f"{rest!r} has no place in the original SDXL layout (expected one of {list(table)})")


def _layers_per_block(cfg: dict) -> int:
    lpb = cfg.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)):
        # ldm numbers input/output blocks with one stride for the whole UNet; diffusers'
        # converter (and so every loader) assumes the same count in every block.
        if len(set(lpb)) != 1:
            raise ValueError(f"layers_per_block must be the same in every block for the original layout, got {lpb}")
        lpb = lpb[0]
    return int(lpb)


def unet_key(key: str, cfg: dict) -> str:
    """One diffusers UNet2DConditionModel key → its original `model.diffusion_model.` key."""
    stride = _layers_per_block(cfg) + 1  # down blocks: L resnets + a downsampler; up blocks: L+1 resnets
    for old, new in UNET_TOP.items():
        if key.startswith(old + "."):
            return UNET + new + key[len(old):]
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * stride + layer  # input_blocks.0 is conv_in
        if kind == "resnets":
            return f"{UNET}input_blocks.{index}.0.{_split(rest, UNET_RESNET)}"
        return f"{UNET}input_blocks.{index}.1.{rest}"  # SpatialTransformer: same names inside
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        # the downsampler is its own input block, after the block's L layers
        return f"{UNET}input_blocks.{1 + int(m[1]) * stride + stride - 1}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
        kind, n, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":  # resnet, attention, resnet → middle_block.0, .1, .2
            return f"{UNET}middle_block.{2 * n}.{_split(rest, UNET_RESNET)}"
        return f"{UNET}middle_block.{2 * n + 1}.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * stride + layer
        if kind == "resnets":
            return f"{UNET}output_blocks.{index}.0.{_split(rest, UNET_RESNET)}"
        return f"{UNET}output_blocks.{index}.1.{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(conv\..+)", key):
        # the upsampler rides in the block's last output block, after its resnet (and attention)
        block = int(m[1])
        has_attn = "CrossAttn" in cfg["up_block_types"][block]
        return f"{UNET}output_blocks.{block * stride + stride - 1}.{2 if has_attn else 1}.{m[2]}"
    raise KeyError(f"UNet key {key!r} has no place in the original SDXL layout")


def _vae_resnet(rest: str) -> str:
    # ldm's VAE ResnetBlock keeps norm1/conv1/norm2/conv2; only the shortcut is renamed
    return re.sub(r"^conv_shortcut\.", "nin_shortcut.", rest)


def vae_key(key: str, num_up_blocks: int) -> str:
    """One diffusers AutoencoderKL key → its `first_stage_model.` key (shape change is the caller's)."""
    if key.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return VAE + key
    part, _, rest = key.partition(".")  # encoder / decoder
    if part not in ("encoder", "decoder"):
        raise KeyError(f"VAE key {key!r} has no place in the original SDXL layout")
    for old, new in VAE_TOP.items():
        if rest.startswith(old + "."):
            return f"{VAE}{part}.{new}{rest[len(old):]}"
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", rest):
        # ldm numbers the decoder's up blocks by resolution, lowest last: diffusers' order reversed
        block = int(m[2]) if m[1] == "down" else num_up_blocks - 1 - int(m[2])
        return f"{VAE}{part}.{m[1]}.{block}.block.{m[3]}.{_vae_resnet(m[4])}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.(.+)", rest):
        return f"{VAE}{part}.down.{m[1]}.downsample.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", rest):
        return f"{VAE}{part}.up.{num_up_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", rest):
        return f"{VAE}{part}.mid.block_{int(m[1]) + 1}.{_vae_resnet(m[2])}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
        return f"{VAE}{part}.mid.attn_1.{_split(m[1], VAE_ATTN)}"
    raise KeyError(f"VAE key {key!r} has no place in the original SDXL layout")


def _strip_text_model(sd: dict) -> dict:
    # transformers >= 5.6 saves CLIPTextModel flat (no `text_model.` prefix); older versions and
    # CLIPTextModelWithProjection keep it. Accept both; the original layout always has it.
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def te1_keys(te1_sd: dict) -> dict:
    """CLIP ViT-L stays in transformers' names, under the SGM embedder's `transformer.text_model.`."""
    return {f"{TE1}text_model.{k}": v for k, v in _strip_text_model(te1_sd).items()}


def te2_keys(te2_sd: dict) -> dict:
    """CLIPTextModelWithProjection → open_clip's text tower (fused qkv, transposed projection)."""
    out, qkv = {}, {}
    for key, v in _strip_text_model(te2_sd).items():
        if key in OPEN_CLIP_TOP:
            out[TE2 + OPEN_CLIP_TOP[key]] = v
        elif key == "text_projection.weight":
            # nn.Linear stores (proj, hidden); open_clip multiplies x @ text_projection: (hidden, proj)
            out[TE2 + "text_projection"] = v.t().contiguous()
        elif key == "embeddings.position_ids":
            continue  # a buffer of arange(77); open_clip has none
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m[1]), m[3]), {})[m[2]] = v
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", key):
            out[f"{TE2}transformer.resblocks.{m[1]}.{_split(m[2], OPEN_CLIP_LAYER)}"] = v
        else:
            raise KeyError(f"text_encoder_2 key {key!r} has no place in open_clip's layout")
    for (layer, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"text_encoder_2 layer {layer}: {kind} of q/k/v incomplete ({sorted(parts)})")
        # nn.MultiheadAttention's in_proj: q, k, v stacked along the output dimension, in that order
        out[f"{TE2}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = \
            torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def to_original_keys(unet_sd: dict, vae_sd: dict, te1_sd: dict, te2_sd: dict, unet_config: dict) -> dict:
    """The pure mapping, state dicts in → one flat original-layout state dict out."""
    out = {unet_key(k, unet_config): v for k, v in unet_sd.items()}
    ups = {int(m[1]) for k in vae_sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))}
    for key, v in vae_sd.items():
        new = vae_key(key, len(ups))
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # ldm's AttnBlock uses 1x1 convs where diffusers has linears
        out[new] = v
    out.update(te1_keys(te1_sd))
    out.update(te2_keys(te2_sd))
    expected = len(unet_sd) + len(vae_sd) + len(te1_sd) + len(te2_sd) \
        - sum(k.endswith("position_ids") for k in te2_sd) \
        - 2 * sum(bool(re.search(r"self_attn\.q_proj\.", k)) for k in te2_sd)  # 3 tensors fuse into 1
    if len(out) != expected:  # two source keys mapped onto one original key
        raise RuntimeError(f"mapping collided: {expected} tensors expected, {len(out)} produced")
    return out


def _load_component(folder: Path, name: str) -> dict:
    """A component's state dict from its safetensors file or shards (never the fp16 variants)."""
    from safetensors.torch import load_file

    base = folder / name / WEIGHTS[name]
    single, index = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".safetensors.index.json")
    if single.is_file():
        return load_file(single)
    if index.is_file():
        sd = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            sd.update(load_file(index.parent / shard))
        return sd
    raise FileNotFoundError(f"{folder / name}: no {single.name} nor {index.name} — expected a diffusers SDXL "
                            f"folder written with safe_serialization")


def save_single_file(folder: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """`folder` (a diffusers SDXL folder) → `out` (.safetensors, original SDXL layout). dtype None keeps
    the stored dtypes; torch.float16/bfloat16 casts floating tensors. Written to a temp file in out's
    folder then os.replace'd into place."""
    from safetensors.torch import save_file

    folder, out = Path(folder), Path(out)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    sd = to_original_keys(*(_load_component(folder, n) for n in WEIGHTS), unet_config=cfg)
    if dtype is not None:
        # integer buffers (e.g. CLIP's position_ids, if saved) keep their dtype
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    # safetensors refuses views that share storage; every tensor gets its own.
    sd = {k: v.contiguous() for k, v in sd.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(sd, tmp, metadata={"format": "pt"})
        os.replace(tmp, out)  # a reader never sees a half-written checkpoint under `out`'s name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out

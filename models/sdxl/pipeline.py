"""SDXL from a hub id or a local diffusers folder, and the tiny one built from configs.

A model is a diffusers SDXL layout (unet/, vae/, text_encoder/, text_encoder_2/,
tokenizer/, tokenizer_2/, scheduler/), or, for the VAE alone, a folder holding a
VAE's config.json at its root (e.g. madebyollin/sdxl-vae-fp16-fix). Only the parts
a step needs are loaded, safetensors only, and nothing runs remote code.

`build_tiny_sdxl` writes the real architecture at toy size (two CLIP text encoders
with a hand-written byte-level vocabulary, a UNet with `addition_embed_type='text_time'`,
an 8x AutoencoderKL) through `StableDiffusionXLPipeline.save_pretrained`, so tests
load it through the very code that loads stabilityai/stable-diffusion-xl-base-1.0.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from models.hub import ModelMissing, ResolvedModel, mark_tiny, resolve

DEFAULT_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"
# The fp32 weights and every config; not the fp16 variants nor the single-file checkpoint.
ALLOW = ["*.json", "*.txt", "unet/diffusion_pytorch_model.safetensors",
         "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
         "text_encoder_2/model.safetensors", "diffusion_pytorch_model.safetensors"]
TOKENIZER_MAX = 77  # CLIP's context: BOS + 75 tokens + EOS


def resolve_sdxl(model: str, param: str) -> ResolvedModel:
    return resolve(model, param, allow_patterns=ALLOW)


def _subfolder(r: ResolvedModel, name: str, param: str) -> str | None:
    if any((r.path / name).glob("*.json")):  # config.json, tokenizer_config.json, scheduler_config.json
        return name
    if name == "vae" and (r.path / "config.json").is_file() and \
            json.loads((r.path / "config.json").read_text()).get("_class_name") == "AutoencoderKL":
        return None  # a standalone VAE folder
    raise ModelMissing(f"{param}: {r.id} ({r.path}) has no {name}/ — expected a diffusers SDXL folder "
                       f"(unet/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/)")


def load_vae(r: ResolvedModel, param: str, dtype, device: str = "cpu"):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(r.path, subfolder=_subfolder(r, "vae", param), dtype=dtype,
                                        use_safetensors=True)
    return vae.to(device).eval().requires_grad_(False)


def load_unet(r: ResolvedModel, param: str, dtype, device: str = "cpu"):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(r.path, subfolder=_subfolder(r, "unet", param),
                                                dtype=dtype, use_safetensors=True)
    return unet.to(device)


@dataclass
class TextEncoders:
    """CLIP ViT-L (hidden 768) and OpenCLIP ViT-bigG (hidden 1280, projected pooled output)."""
    tokenizer: object
    tokenizer_2: object
    text_encoder: object
    text_encoder_2: object

    @property
    def pairs(self):
        return ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))


def load_text_encoders(r: ResolvedModel, param: str, dtype, device: str = "cpu") -> TextEncoders:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def tok(name):
        return CLIPTokenizer.from_pretrained(r.path, subfolder=_subfolder(r, name, param))

    def enc(cls, name):
        return cls.from_pretrained(r.path, subfolder=_subfolder(r, name, param), dtype=dtype,
                                   use_safetensors=True).to(device)

    return TextEncoders(tok("tokenizer"), tok("tokenizer_2"), enc(CLIPTextModel, "text_encoder"),
                        enc(CLIPTextModelWithProjection, "text_encoder_2"))


def load_vae_config(r: ResolvedModel, param: str) -> dict:
    sub = _subfolder(r, "vae", param)
    return json.loads(((r.path / sub) if sub else r.path).joinpath("config.json").read_text())


def load_scheduler_config(r: ResolvedModel, param: str) -> dict:
    return json.loads((r.path / _subfolder(r, "scheduler", param) / "scheduler_config.json").read_text())


def load_pipeline(r: ResolvedModel, param: str, dtype, device: str = "cpu"):
    """The whole diffusers pipeline (for sampling), from the same folder."""
    from diffusers import StableDiffusionXLPipeline

    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        _subfolder(r, name, param)
    pipe = StableDiffusionXLPipeline.from_pretrained(r.path, dtype=dtype, use_safetensors=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


# ---------------------------------------------------------------- configs

def unet_config(size: str) -> dict:
    """`real`: SDXL base's UNet (2.6 B parameters; random weights give true speed and memory).
    `tiny`: the same block types at toy width, for CPUs and tests."""
    common = dict(sample_size=128, in_channels=4, out_channels=4, addition_embed_type="text_time",
                  addition_time_embed_dim=256, use_linear_projection=True, act_fn="silu",
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    if size == "real":
        return {**common, "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
                "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
                "cross_attention_dim": 2048, "projection_class_embeddings_input_dim": 2816}
    if size == "tiny":
        # projection_class_embeddings_input_dim = 6 x addition_time_embed_dim + text_encoder_2's projection.
        return {**common, "sample_size": 16, "block_out_channels": (32, 32, 64), "layers_per_block": 1,
                "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 2, 4),
                "norm_num_groups": 16, "cross_attention_dim": 64, "addition_time_embed_dim": 8,
                "projection_class_embeddings_input_dim": 6 * 8 + 32}
    raise ValueError(f"unet size: expected real or tiny, got {size!r}")


def clip_vocab() -> tuple[dict, list[str]]:
    """A byte-level BPE vocabulary CLIPTokenizer accepts: every byte alone and word-final,
    a few merges, and the two special tokens. Text tokenizes mostly into characters, which
    makes long prompts long (good for testing the 75-token chunking)."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars]
    merges = ["t h", "th e</w>", "a n", "i n", "r e", "o n", "e r"]
    for m in merges:
        vocab.append(m.replace(" ", ""))
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab))}, merges


def build_tiny_sdxl(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    vocab, merges = clip_vocab()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges],
                              model_max_length=TOKENIZER_MAX)
    text_cfg = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, max_position_embeddings=TOKENIZER_MAX, hidden_act="gelu",
                    bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                    pad_token_id=vocab["<|endoftext|>"], projection_dim=32)
    unet = UNet2DConditionModel(**unet_config("tiny"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=128,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                        scaling_factor=0.13025)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, prediction_type="epsilon",
                                       timestep_spacing="leading", steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text_cfg)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg)),
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    mark_tiny(folder, "SDXL (UNet, VAE, two CLIP text encoders)")
    return folder

"""An SDXL diffusers folder written as one original-layout .safetensors, and read back by diffusers.

`StableDiffusionXLPipeline.from_single_file` (diffusers' own ldm → diffusers converters) must
rebuild every tensor exactly and draw the same image as the folder; the key mapping must also
hold for the real SDXL topology (checked on the meta device: key names and shapes, no weights).
"""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from models.sdxl.pipeline import build_tiny_sdxl, unet_config
from models.sdxl.single_file import save_single_file, to_original_keys

PROMPT = "a figure juggling on the shore"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _widen_text_encoder_2(pipe) -> None:
    """diffusers' loader tells CLIP-L from OpenCLIP-G by width (768 vs 1280): the tiny SDXL's two
    encoders are both 32 wide, so from_single_file would load CLIP-L's weights into text_encoder_2.
    Give it another width (and the UNet the matching cross-attention width), as in the real model."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = pipe.text_encoder_2.config.to_dict()
    cfg.update(hidden_size=48, intermediate_size=96)  # projection_dim stays 32: same pooled width
    pipe.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg))
    pipe.unet = UNet2DConditionModel(**{**unet_config("tiny"),
                                        "cross_attention_dim": pipe.text_encoder.config.hidden_size + 48})
    pipe.register_modules(unet=pipe.unet, text_encoder_2=pipe.text_encoder_2)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)
    _widen_text_encoder_2(pipe)
    # Seeded noise on every parameter (norm weights are ones, biases zeros at init): a key that
    # were dropped or misplaced would load a default or a neighbour and no longer match.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in PARTS:
            for p in getattr(pipe, name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def draw(pipe) -> np.ndarray:
    # Tensors read from a safetensors file may sit at any offset in memory; CPU matmul kernels
    # pick their code path by alignment, so equal weights at different addresses can differ in
    # the last bit (seen: text_encoder_2's text_projection, 2e-7). Fresh copies are 64-byte aligned.
    with torch.no_grad():
        for name in PARTS:
            for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
                t.data = t.data.clone()
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, num_inference_steps=3, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(7)).images[0]


class _Records(logging.Handler):
    # diffusers' and transformers' loggers do not propagate to the root logger (caplog misses them)
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_from_single_file_same_tensors_same_image(folder, tmp_path, monkeypatch):
    from diffusers import StableDiffusionXLPipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # config=<local folder> must never reach the hub
    out = save_single_file(folder, tmp_path / "model.safetensors")
    assert out == tmp_path / "model.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp file left behind

    sd = load_file(out)
    # what infer_diffusers_model_type and the CLIP loaders key on in an SDXL base checkpoint
    assert "conditioner.embedders.1.model.positional_embedding" in sd
    assert "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight" in sd
    assert sd["conditioner.embedders.1.model.text_projection"].shape == (48, 32)  # (hidden, proj)
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4

    records = _Records()
    loggers = [logging.getLogger(n) for n in ("diffusers", "transformers")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        single = StableDiffusionXLPipeline.from_single_file(str(out), config=str(folder), dtype=torch.float32)
    finally:
        for lg in loggers:
            lg.removeHandler(records)
    assert not [m for m in records.messages
                if any(w in m.lower() for w in ("not used", "missing", "unexpected", "newly initialized"))]
    ref = StableDiffusionXLPipeline.from_pretrained(folder, dtype=torch.float32)

    for name in PARTS:
        want, got = getattr(ref, name).state_dict(), getattr(single, name).state_dict()
        assert set(got) == set(want), name
        for k, v in want.items():
            assert got[k].device.type == "cpu", f"{name}.{k} never loaded"
            assert got[k].dtype == v.dtype and torch.equal(got[k], v), f"{name}.{k}"

    np.testing.assert_array_equal(draw(single), draw(ref))

    # dtype=float16 casts every floating tensor, and only casts it
    half = load_file(save_single_file(folder, tmp_path / "half.safetensors", dtype=torch.float16))
    assert half.keys() == sd.keys()
    for k, v in sd.items():
        assert torch.equal(half[k], v.half() if v.is_floating_point() else v), k


def test_real_sdxl_topology_maps_both_ways():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint,
                                                     infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = unet_config("real")
    vae_cfg = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4)
    clip = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu")
    with torch.device("meta"):  # names and shapes only: no 13 GB of weights
        unet = UNet2DConditionModel(**cfg).state_dict()
        vae = AutoencoderKL(**vae_cfg).state_dict()
        te1 = CLIPTextModel(CLIPTextConfig(**clip, hidden_size=768, intermediate_size=3072,
                                           num_hidden_layers=12, num_attention_heads=12)).state_dict()
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**clip, hidden_size=1280, intermediate_size=5120,
                                                         num_hidden_layers=32, num_attention_heads=20,
                                                         projection_dim=1280)).state_dict()
    sd = to_original_keys(unet, vae, te1, te2, cfg)
    # without config=, this is how from_single_file decides which model the file holds
    assert infer_diffusers_model_type(sd) == "xl_base"

    shapes = {  # as in stabilityai's sd_xl_base_1.0.safetensors
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.6.0.op.weight": (640, 640, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),  # up block 0's upsampler
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
        "label_emb.0.0.weight": (1280, 2816),
        "time_embed.0.weight": (1280, 320),
        "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "middle_block.2.emb_layers.1.weight": (1280, 1280),
        "out.2.weight": (4, 320, 3, 3),
    }
    for k, shape in shapes.items():
        assert tuple(sd["model.diffusion_model." + k].shape) == shape, k
    for k, shape in {"decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                     "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                     "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
                     "encoder.down.3.block.1.conv1.weight": (512, 512, 3, 3),
                     "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1)}.items():
        assert tuple(sd["first_stage_model." + k].shape) == shape, k
    assert "model.diffusion_model.output_blocks.8.2.conv.weight" not in sd  # the last up block has none
    assert sum(k.startswith("model.diffusion_model.") for k in sd) == len(unet) == 1680
    assert sum(k.startswith("first_stage_model.") for k in sd) == len(vae)

    # diffusers' own loaders take the file back to exactly the diffusers names and shapes
    back = convert_ldm_unet_checkpoint(sd, cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.items()}
    back = convert_ldm_vae_checkpoint(sd, vae_cfg)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in vae.items()}
    # transformers >= 5.6 keeps CLIPTextModel flat, so diffusers drops `text_model.` on load
    back = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(sd).items()}
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in te1.items()}
    back = convert_open_clip_checkpoint(None, sd, prefix="conditioner.embedders.1.model.")
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in te2.items()}
    assert tuple(sd["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape) \
        == (3 * 1280, 1280)


def test_unknown_key_raises():
    with pytest.raises(KeyError, match="no place"):
        to_original_keys({"down_blocks.0.motion_modules.0.weight": torch.zeros(1)}, {}, {}, {},
                         unet_config("tiny"))

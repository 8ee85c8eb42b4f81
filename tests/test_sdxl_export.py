"""A trained tiny SDXL LoRA + pivotal tokens, saved and loaded back by plain diffusers.

The in-memory model (peft LoRA on the UNet and text_encoder, new token rows) and a
fresh pipeline that loads only the exported files must draw the same image.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from models.sdxl.pipeline import TextEncoders, load_pipeline, resolve_sdxl
from models.sdxl.export import LORA_FILE, save_kohya, save_lora
from models.sdxl.ti import PivotalTokens, load_embeddings, save_embeddings

PROMPT = "TOK, a figure juggling"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def draw(pipe, prompt: str) -> np.ndarray:
    out = pipe(prompt, num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(7))
    return out.images[0]


def fresh(tiny_models):
    r = resolve_sdxl(str(tiny_models / "sdxl"), "test.model")
    return load_pipeline(r, "test.model", torch.float32)


def randomize_lora_b(model, seed: int) -> None:
    # peft starts B at zero (the LoRA is a no-op); a trained one is not.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def exported(tiny_models, tmp_path_factory):
    pipe = fresh(tiny_models)
    base = draw(pipe, PROMPT)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
    # alpha != rank on the text encoder: the export must carry alpha, not assume alpha = rank.
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                                             target_modules=TE_TARGETS))
    randomize_lora_b(pipe.unet, 0)
    randomize_lora_b(pipe.text_encoder, 1)
    ti = PivotalTokens(TextEncoders(pipe.tokenizer, pipe.tokenizer_2, pipe.text_encoder, pipe.text_encoder_2),
                       n_tokens=2, seed=5)
    prompt = ti.expand(PROMPT)
    assert prompt == "<s0><s1>, a figure juggling"
    image = draw(pipe, prompt)
    out = tmp_path_factory.mktemp("lora")
    lora = save_lora(out, pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    kohya = save_kohya(lora, out / "kohya.safetensors")
    emb = save_embeddings(out / "embeddings.safetensors", ti.state_dict())
    return dict(base=base, image=image, prompt=prompt, tokens=ti.tokens, lora=lora, kohya=kohya, emb=emb,
                folder=out)


def load_into(pipe, lora_source, exported) -> np.ndarray:
    pipe.load_lora_weights(str(lora_source))
    state = load_embeddings(exported["emb"])
    pipe.load_textual_inversion(state["clip_l"], token=exported["tokens"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=exported["tokens"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    return draw(pipe, exported["prompt"])


def test_files_and_keys(exported):
    folder = exported["folder"]
    assert exported["lora"] == folder / LORA_FILE
    assert sorted(p.name for p in folder.iterdir()) == sorted([LORA_FILE, "kohya.safetensors",
                                                               "embeddings.safetensors"])  # no temporaries
    keys = set(load_file(exported["lora"]))
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert not any(k.startswith("text_encoder_2.") for k in keys)  # it carries no LoRA
    with safe_open(str(exported["lora"]), framework="pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 4 and meta["text_encoder.lora_alpha"] == 8
    kohya = load_file(exported["kohya"])
    assert {k.split("_")[1] for k in kohya} <= {"unet", "te1"} and any(k.startswith("lora_te1_") for k in kohya)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    # The names every kohya reader expects, though transformers 5 dropped CLIPTextModel.text_model.
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0.") for k in keys)
    assert not any("token_embedding" in k for k in keys | set(kohya))  # TI rows live in their own file
    alphas = {k: float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert len(alphas) == sum(k.endswith(".lora_down.weight") for k in kohya) > 0
    assert {a for k, a in alphas.items() if k.startswith("lora_unet_")} == {4.0}
    assert {a for k, a in alphas.items() if k.startswith("lora_te1_")} == {8.0}


def test_the_lora_changes_the_image(exported):
    assert np.abs(exported["image"] - exported["base"]).max() > 1e-2


def test_diffusers_file_and_embeddings_reproduce_the_image(exported, tiny_models):
    got = load_into(fresh(tiny_models), exported["folder"], exported)
    np.testing.assert_allclose(got, exported["image"], atol=1e-4, rtol=0)


def test_kohya_file_reproduces_the_image(exported, tiny_models):
    got = load_into(fresh(tiny_models), exported["kohya"], exported)
    np.testing.assert_allclose(got, exported["image"], atol=1e-4, rtol=0)


def test_save_lora_refuses_a_unet_without_lora(tiny_models, tmp_path):
    with pytest.raises(ValueError, match="no LoRA"):
        save_lora(tmp_path, fresh(tiny_models).unet)
    assert list(tmp_path.iterdir()) == []

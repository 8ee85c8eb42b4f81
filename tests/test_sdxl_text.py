"""SDXL prompt encoding on the tiny SDXL, against the diffusers pipeline's own encode_prompt."""
from __future__ import annotations

import logging

import pytest
import torch
from transformers import CLIPTokenizer

from models.sdxl.pipeline import TextEncoders, load_pipeline, load_text_encoders, resolve_sdxl
from models.sdxl.text import encode_prompts, tokenize_chunks

PROMPT = "TOK, a figure juggling three balls, white background"
DOTS_200 = "dots " * 50  # "d o t s</w>": 4 tokens a word in the tiny byte-level vocabulary
DOTS_1000 = "dots " * 250
OVER_77 = "a figure made of sparse black particles, " * 3  # > 75 tokens: the pipeline truncates it


@pytest.fixture(scope="module")
def sdxl(tiny_models):
    r = resolve_sdxl(str(tiny_models / "sdxl"), "test.model")
    return r, load_pipeline(r, "test.model", torch.float32)


@pytest.fixture(scope="module")
def enc(sdxl) -> TextEncoders:
    r, _ = sdxl
    return load_text_encoders(r, "test.model", torch.float32)


def pipeline_ids(tokenizer, text):
    return tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_tiny_vocabulary_counts_as_assumed(enc):
    # The chunk tests below rely on these counts; if the tiny vocabulary changes, fix them first.
    assert len(enc.tokenizer(DOTS_200, add_special_tokens=False).input_ids) == 200
    assert len(enc.tokenizer(OVER_77, add_special_tokens=False).input_ids) > 75


@pytest.mark.parametrize("text", [PROMPT, "", OVER_77, DOTS_200])
def test_one_chunk_ids_are_the_pipeline_ids(enc, sdxl, text):
    r, _ = sdxl
    # The real SDXL tokenizer_2 pads with "!" instead of <|endoftext|>: both must hold.
    bang = CLIPTokenizer.from_pretrained(r.path, subfolder="tokenizer_2", pad_token="!")
    assert bang.pad_token_id != bang.eos_token_id
    for tok in (enc.tokenizer, enc.tokenizer_2, bang):
        assert torch.equal(tokenize_chunks(tok, text, 1), pipeline_ids(tok, text))


@pytest.mark.parametrize("text", [PROMPT, "", OVER_77])
def test_one_chunk_embeddings_are_the_pipelines(enc, sdxl, text):
    _, pipe = sdxl
    with torch.no_grad():
        want, _, want_pooled, _ = pipe.encode_prompt(text, device="cpu", num_images_per_prompt=1,
                                                     do_classifier_free_guidance=False)
        got, pooled = encode_prompts(enc, [text])
    assert got.shape == want.shape == (1, 77, 64) and pooled.shape == want_pooled.shape == (1, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled, want_pooled, atol=1e-6, rtol=0)


def test_chunks_each_carry_bos_eos_and_padding(enc):
    tok = enc.tokenizer
    bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    flat = tok(DOTS_200, add_special_tokens=False).input_ids
    ids = tokenize_chunks(tok, DOTS_200, max_chunks=3)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert (ids[:, 0] == bos).all()
    assert ids[0, 76] == eos and ids[1, 76] == eos  # full chunks: 75 tokens between BOS and EOS
    assert ids[2, 51] == eos and (ids[2, 52:] == pad).all()  # 200 - 150 = 50 tokens left
    assert ids[0, 1:76].tolist() + ids[1, 1:76].tolist() + ids[2, 1:51].tolist() == flat
    assert tokenize_chunks(tok, "a", max_chunks=3).shape == (1, 77)  # no empty chunks for a short one
    assert tokenize_chunks(tok, "", max_chunks=3).tolist() == [[bos, eos] + [pad] * 75]


def test_long_prompt_is_capped_with_a_warning(enc, caplog):
    with caplog.at_level(logging.WARNING, logger="niche.models.sdxl"):
        ids = tokenize_chunks(enc.tokenizer, DOTS_1000, max_chunks=3)
    assert ids.shape == (3, 77)
    assert "the last 775 are dropped" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="niche.models.sdxl"):
        assert tokenize_chunks(enc.tokenizer, DOTS_200, max_chunks=3).shape == (3, 77)
    assert caplog.text == ""
    with pytest.raises(ValueError, match="max_chunks"):
        tokenize_chunks(enc.tokenizer, "a", max_chunks=0)


def test_multi_chunk_embeddings(enc):
    with torch.no_grad():
        one, one_pooled = encode_prompts(enc, [DOTS_200], max_chunks=1)
        three, three_pooled = encode_prompts(enc, [DOTS_200], max_chunks=3)
        capped, _ = encode_prompts(enc, [DOTS_1000], max_chunks=3)
    assert three.shape == (1, 3 * 77, 64) and three_pooled.shape == (1, 32)
    assert capped.shape == (1, 3 * 77, 64)
    # The first chunk is the truncated prompt's very input: same states, same pooled vector.
    torch.testing.assert_close(three[:, :77], one, atol=1e-6, rtol=0)
    torch.testing.assert_close(three_pooled, one_pooled, atol=1e-6, rtol=0)
    # The third chunk holds 50 tokens, not the first chunk's 75: it must differ.
    assert (three[:, 154:] - three[:, :77]).abs().max() > 1e-3


def test_batch_pads_short_prompts_with_empty_chunks(enc):
    with torch.no_grad():
        batch, pooled = encode_prompts(enc, [DOTS_200, PROMPT], max_chunks=3)
        long_alone, long_pooled = encode_prompts(enc, [DOTS_200], max_chunks=3)
        short_alone, short_pooled = encode_prompts(enc, [PROMPT], max_chunks=3)
        empty, _ = encode_prompts(enc, [""])
    assert batch.shape == (2, 231, 64) and pooled.shape == (2, 32)
    assert short_alone.shape == (1, 77, 64)
    torch.testing.assert_close(batch[:1], long_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:, :77], short_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:, 77:154], empty, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:, 154:], empty, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, torch.cat([long_pooled, short_pooled]), atol=1e-5, rtol=0)


def test_gradients_reach_the_token_embeddings(enc):
    weights = [e.get_input_embeddings().weight for e in (enc.text_encoder, enc.text_encoder_2)]
    used = set(tokenize_chunks(enc.tokenizer, DOTS_200, 3).unique().tolist())
    try:
        for w in weights:
            w.requires_grad_(True)
            w.grad = None
        embeds, pooled = encode_prompts(enc, [DOTS_200], max_chunks=3)
        assert embeds.requires_grad and pooled.requires_grad
        (embeds.square().mean() + pooled.square().mean()).backward()
        for w in weights:
            rows = w.grad.abs().sum(dim=1)
            assert all(rows[i] > 0 for i in used)
            assert rows[[i for i in range(len(rows)) if i not in used]].abs().max() == 0
        with torch.no_grad():
            embeds, pooled = encode_prompts(enc, [DOTS_200], max_chunks=3)
        assert not embeds.requires_grad and not pooled.requires_grad
    finally:
        for w in weights:
            w.requires_grad_(False)
            w.grad = None


def test_the_trainers_prompt_cache_pads_mixed_chunk_counts_as_a_live_batch_does(enc):
    """A prompt dropped to "" among long captions: the cached path pads with the empty chunk's
    states instead of encoding the whole batch again, and gets the live batch's numbers."""
    from tasks.sdxl.full_params import FullParams
    from tasks.sdxl.text import Prompts

    prompts = Prompts(FullParams(max_chunks=3), enc, None, torch.device("cpu"))
    texts = ["a " * 100 + "long prompt", "", "short one"]
    embeds, pooled = prompts.encode(texts)
    live, live_pooled = encode_prompts(enc, texts, 3, warn=False)
    assert embeds.shape == live.shape == (3, 154, 64)
    assert torch.equal(embeds, live)
    assert torch.allclose(pooled, live_pooled, atol=1e-5)
    assert set(prompts.cache) == set(texts)  # every prompt was encoded once, alone
    # Again: all from the cache, no encoder runs (the batch is not encoded again live).
    calls = []
    hook = enc.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        again, _ = prompts.encode(texts)
    finally:
        hook.remove()
    assert not calls and torch.equal(again, embeds)

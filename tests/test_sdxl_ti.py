"""Pivotal-tuning textual inversion on the tiny SDXL's two text encoders."""
from __future__ import annotations

import pytest
import torch

from models.sdxl.pipeline import TextEncoders, load_text_encoders, resolve_sdxl
from models.sdxl.text import encode_prompts
from models.sdxl.ti import PivotalTokens, load_embeddings, save_embeddings


@pytest.fixture
def enc(tiny_models) -> TextEncoders:
    r = resolve_sdxl(str(tiny_models / "sdxl"), "test.model")
    e = load_text_encoders(r, "test.model", torch.float32)
    for m in (e.text_encoder, e.text_encoder_2):
        m.requires_grad_(False)  # as the trainer holds them: frozen but for what it trains
    return e


def weights(e: TextEncoders) -> list[torch.Tensor]:
    return [m.get_input_embeddings().weight for m in (e.text_encoder, e.text_encoder_2)]


def test_tokens_are_added_to_both_tokenizers_as_single_ids(enc):
    before = [w.detach().clone() for w in weights(enc)]
    sizes = [len(enc.tokenizer), len(enc.tokenizer_2)]
    ti = PivotalTokens(enc, n_tokens=3)
    assert ti.tokens == ["<s0>", "<s1>", "<s2>"]
    for (tok, model), n, old in zip(enc.pairs, sizes, before):
        assert len(tok) == n + 3
        new = tok.convert_tokens_to_ids(ti.tokens)
        assert new == [n, n + 1, n + 2]
        ids = tok(ti.expand("TOK, a figure"), add_special_tokens=False).input_ids
        assert ids[:3] == new and len(ids) == 3 + len(tok(", a figure", add_special_tokens=False).input_ids)
        w = model.get_input_embeddings().weight
        assert w.shape == (n + 3, old.shape[1])
        assert torch.equal(w[:n], old)  # resizing kept every old row
        assert not w.requires_grad  # the encoder was frozen: adding tokens does not unfreeze it
        rows = w[new].detach()
        assert rows.abs().min() > 0 and 0.3 < rows.std() / old.std() < 3  # random, at the old scale


def test_expand_replaces_whole_words_only(enc):
    ti = PivotalTokens(enc, trigger="TOK", n_tokens=2)
    assert ti.expand("TOK, a figure juggling, white background") == "<s0><s1>, a figure juggling, white background"
    assert ti.expand("a TOK figure and TOK.") == "a <s0><s1> figure and <s0><s1>."
    assert ti.expand("TOKEN tok xTOK TOK_1") == "TOKEN tok xTOK TOK_1"


def test_one_abstraction_per_trigger_word(enc):
    ti = PivotalTokens(enc, trigger=["TOK", "PRT"], n_tokens=2)
    assert ti.tokens == ["<s0>", "<s1>", "<s2>", "<s3>"]
    assert ti.abstractions == {"TOK": ["<s0>", "<s1>"], "PRT": ["<s2>", "<s3>"]}
    assert ti.expand("TOK, a PRT figure") == "<s0><s1>, a <s2><s3> figure"
    assert {k: tuple(v.shape) for k, v in ti.state_dict().items()} == {"clip_l": (4, 32), "clip_g": (4, 32)}
    with pytest.raises(ValueError, match="distinct words"):
        PivotalTokens(enc, trigger=["TOK", "TOK"])


def test_init_from_a_word_and_seeded_random_init(enc, tiny_models):
    ti = PivotalTokens(enc, n_tokens=2, init="figure")
    for (tok, model), k in zip(enc.pairs, ("clip_l", "clip_g")):
        w = model.get_input_embeddings().weight.detach()
        mean = w[tok("figure", add_special_tokens=False).input_ids].mean(dim=0)
        torch.testing.assert_close(ti.state_dict()[k], mean.expand(2, -1), atol=0, rtol=0)
    r = resolve_sdxl(str(tiny_models / "sdxl"), "test.model")
    a = PivotalTokens(load_text_encoders(r, "m", torch.float32), seed=3).state_dict()
    b = PivotalTokens(load_text_encoders(r, "m", torch.float32), seed=3).state_dict()
    c = PivotalTokens(load_text_encoders(r, "m", torch.float32), seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) and not torch.equal(a[k], c[k]) for k in a)
    with pytest.raises(ValueError, match="init"):
        PivotalTokens(load_text_encoders(r, "m", torch.float32), init="   ")


def test_only_the_new_rows_train_and_the_matrices_get_no_gradient(enc):
    ti = PivotalTokens(enc, n_tokens=2)
    ti.set_trainable(True)
    assert all(p.requires_grad for p in ti.parameters()) and [tuple(p.shape) for p in ti.parameters()] == \
        [(2, 32), (2, 32)]
    before = [w.detach().clone() for w in weights(enc)]
    new = ti.state_dict()
    opt = torch.optim.AdamW(ti.parameters(), lr=1e-2, weight_decay=0.1)
    embeds, pooled = encode_prompts(enc, [ti.expand("TOK, a figure juggling")])
    (embeds.square().mean() + pooled.square().mean()).backward()
    # The 49,408-row matrices take no gradient: no memory for one, nor for Adam's state.
    assert all(w.grad is None and not w.requires_grad for w in weights(enc))
    opt.step()
    after = ti.state_dict()
    assert all((after[k] - new[k]).abs().min() > 0 for k in after)
    for w, b in zip(weights(enc), before):
        assert torch.equal(w.detach(), b)  # the matrices follow only when synced
    # The hook feeds the trained rows: the encoders see them before any sync.
    hooked = encode_prompts(enc, [ti.expand("TOK")])[0]
    ti.sync_rows()
    for w, b, ids in zip(weights(enc), before, (enc.tokenizer, enc.tokenizer_2)):
        new_ids = ids.convert_tokens_to_ids(ti.tokens)
        assert torch.equal(w.detach()[new_ids], after["clip_l" if ids is enc.tokenizer else "clip_g"])
        keep = torch.ones(w.shape[0], dtype=torch.bool)
        keep[new_ids] = False
        assert torch.equal(w.detach()[keep], b[keep])  # every other row bit-identical
    for h in (enc.text_encoder, enc.text_encoder_2):  # without the hooks, the synced matrices agree
        h.get_input_embeddings()._forward_hooks.clear()
    torch.testing.assert_close(encode_prompts(enc, [ti.expand("TOK")])[0], hooked)
    ti.set_trainable(False)
    assert not any(p.requires_grad for p in ti.parameters())


def test_state_dict_round_trip_through_a_file(enc, tmp_path):
    ti = PivotalTokens(enc, n_tokens=2)
    sd = ti.state_dict()
    assert sd["clip_l"].shape == (2, 32) and sd["clip_g"].shape == (2, 32)
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    path = save_embeddings(tmp_path / "out" / "embeddings.safetensors", sd)
    assert [p.name for p in path.parent.iterdir()] == ["embeddings.safetensors"]  # no temporary left
    loaded = load_embeddings(path)
    assert set(loaded) == {"clip_l", "clip_g"}
    with torch.no_grad():
        for w in ti.parameters():
            w[:] = 0
    assert ti.state_dict()["clip_l"].abs().max() == 0
    ti.load_state_dict(loaded)
    assert all(torch.equal(ti.state_dict()[k], sd[k]) for k in sd)
    sd["clip_l"][0, 0] = 123.0  # state_dict is a copy, not a view of the weights
    assert ti.state_dict()["clip_l"][0, 0] != 123.0
    with pytest.raises(ValueError, match=r"clip_g has shape \(3, 32\), expected \(2, 32\)"):
        ti.load_state_dict({"clip_l": loaded["clip_l"], "clip_g": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="missing"):
        ti.load_state_dict({"clip_l": loaded["clip_l"]})


def test_refuses_tokens_that_already_exist(enc):
    PivotalTokens(enc, n_tokens=2)
    sizes = [w.shape for w in weights(enc)]
    with pytest.raises(ValueError, match="already exist"):
        PivotalTokens(enc, n_tokens=3)
    assert [w.shape for w in weights(enc)] == sizes and len(enc.tokenizer) == sizes[0][0]

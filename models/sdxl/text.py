"""SDXL prompt encoding: both CLIP encoders, with prompts longer than CLIP's 77 tokens.

CLIP sees 77 tokens (BOS + 75 + EOS). A longer caption is cut into chunks of 75
tokens, each wrapped in its own BOS/EOS and padded to 77, each run through the
encoder on its own, and the chunks' hidden states concatenated along the sequence
(the NovelAI prompt extension, at most 3 chunks in practice). The UNet's
cross-attention takes any sequence length, so nothing else changes. With one chunk
this is exactly what `StableDiffusionXLPipeline.encode_prompt` feeds the encoders,
so a model trained here samples the same in any diffusers/ComfyUI pipeline.
"""
from __future__ import annotations

import logging
import math

import torch

from models.sdxl.pipeline import TOKENIZER_MAX, TextEncoders

log = logging.getLogger("niche.models.sdxl")
CHUNK = TOKENIZER_MAX - 2  # the 75 tokens between BOS and EOS


def tokenize_chunks(tokenizer, text: str, max_chunks: int = 1, warn: bool = True) -> torch.LongTensor:
    """(k, 77) ids: k = ceil(tokens / 75) chunks (at least 1, at most `max_chunks`), each
    [BOS] + up to 75 ids + [EOS] + the tokenizer's own pad id (SDXL's tokenizer_2 pads
    with "!", tokenizer 1 with <|endoftext|>; the encoders were trained that way)."""
    if max_chunks < 1:
        raise ValueError(f"max_chunks: expected >= 1, got {max_chunks}")
    # verbose=False: a long prompt is expected here, not a mistake worth transformers' warning.
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    k = min(max(1, math.ceil(len(ids) / CHUNK)), max_chunks)
    if len(ids) > k * CHUNK and warn:
        log.warning("prompt of %d tokens: the last %d are dropped (at most %d chunk(s) of %d): %.60r...",
                    len(ids), len(ids) - k * CHUNK, max_chunks, CHUNK, text)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad is None:  # CLIP tokenizers without a pad token pad with EOS, as the pipeline does
        pad = eos
    out = torch.full((k, TOKENIZER_MAX), pad, dtype=torch.long)
    for c in range(k):
        part = ids[c * CHUNK:(c + 1) * CHUNK]
        out[c, :len(part) + 2] = torch.tensor([bos, *part, eos], dtype=torch.long)
    return out


def _batch_ids(tokenizer, texts: list[str], max_chunks: int, warn: bool) -> torch.LongTensor:
    """(B, k_max, 77): prompts with fewer chunks get empty chunks ([BOS][EOS][pad...]) after
    their own, so every prompt's real chunks keep their place and their embeddings."""
    per = [tokenize_chunks(tokenizer, t, max_chunks, warn=warn) for t in texts]
    k = max(p.shape[0] for p in per)
    empty = tokenize_chunks(tokenizer, "", 1)
    return torch.stack([torch.cat([p, empty.expand(k - p.shape[0], -1)]) for p in per])


def _device(module) -> torch.device:
    return next(module.parameters()).device


def encode_prompts(encoders: TextEncoders, texts: list[str], max_chunks: int = 1,
                   device=None, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_embeds (B, 77·k, hidden_1 + hidden_2) and pooled (B, projection_2).

    Penultimate hidden states of each encoder (as SDXL was trained), concatenated on the
    feature axis; pooled = text_encoder_2's projected output for the FIRST chunk (the
    pipeline's pooled vector; later chunks would only dilute the one global summary).
    Gradients flow when the caller enables them (textual inversion trains through this).
    """
    if isinstance(texts, str):
        texts = [texts]
    if not texts:
        raise ValueError("encode_prompts: no prompts")
    feats, pooled = [], None
    for i, (tokenizer, encoder) in enumerate(encoders.pairs):
        # The two real tokenizers share one vocabulary: one warning per long prompt is enough.
        ids = _batch_ids(tokenizer, texts, max_chunks, warn=warn and i == 0)
        b, k, n = ids.shape
        dev = device if device is not None else _device(encoder)
        # All chunks of all prompts in one forward: CLIP gets no attention mask here (as in
        # the pipeline), so each row is independent and batching changes nothing.
        out = encoder(ids.reshape(b * k, n).to(dev), output_hidden_states=True)
        feats.append(out.hidden_states[-2].reshape(b, k * n, -1))
        if i == 1:
            pooled = out.text_embeds.reshape(b, k, -1)[:, 0]
    return torch.cat(feats, dim=-1), pooled

"""Textual inversion for pivotal tuning: new tokens <s0>..<s{n-1}> in both SDXL text encoders.

The trigger word of the captions ("TOK") is replaced by fresh tokens that have no
prior meaning, whose embedding rows are trained with the LoRA for the first part of
training, then frozen (the diffusers advanced SDXL DreamBooth recipe). Only the new
rows are parameters: a forward hook on each token-embedding layer puts them in place
of the matrix's rows for those ids. The 49,408-row matrices stay frozen, so they get
no gradient and no optimizer state (~1.2 GB fp32 for SDXL's two, which training the
whole matrix and restoring the old rows after each step would cost).

The rows are saved as {"clip_l": (n, 768), "clip_g": (n, 1280)} safetensors, the file
the advanced script writes and diffusers' `load_textual_inversion` / ComfyUI read.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch

from models.sdxl.pipeline import TextEncoders

KEYS = ("clip_l", "clip_g")  # text_encoder (CLIP ViT-L), text_encoder_2 (OpenCLIP bigG)


class PivotalTokens:
    """`trigger`: one word, or several (one abstraction each, as the advanced script's
    --token_abstraction "TOK,TOK2"): n_tokens new tokens per word, <s0><s1> for the first,
    <s2><s3> for the second, ..."""

    def __init__(self, encoders: TextEncoders, trigger: str | Sequence[str] = "TOK", n_tokens: int = 2,
                 init: str | None = None, seed: int = 0):
        if n_tokens < 1:
            raise ValueError(f"n_tokens: expected >= 1, got {n_tokens}")
        triggers = [trigger] if isinstance(trigger, str) else list(trigger)
        if not triggers or any(not t or not t.strip() for t in triggers) or len(set(triggers)) != len(triggers):
            raise ValueError(f"trigger: expected one or more distinct words, got {trigger!r}")
        self.encoders, self.triggers = encoders, triggers
        self._abstractions = {t: [f"<s{i * n_tokens + j}>" for j in range(n_tokens)] for i, t in enumerate(triggers)}
        self._tokens = [tok for toks in self._abstractions.values() for tok in toks]
        pairs = list(encoders.pairs)
        for tokenizer, _ in pairs:  # check both before touching either
            taken = [t for t in self._tokens if t in tokenizer.get_vocab()]
            if taken:
                raise ValueError(f"textual inversion: token(s) {taken} already exist in the tokenizer "
                                 "(added twice, or a model that already carries them)")
        gen = torch.Generator().manual_seed(seed)
        self._ids, self._rows = [], []
        for tokenizer, encoder in pairs:
            if not (tokenizer is pairs[0][0] and encoder is pairs[1][1]):  # one tokenizer for both: added once
                tokenizer.add_tokens(self._tokens)
            ids = tokenizer.convert_tokens_to_ids(self._tokens)
            old = encoder.get_input_embeddings().weight
            trainable = old.requires_grad
            if init is not None:
                word = tokenizer(init, add_special_tokens=False).input_ids
                if not word:
                    raise ValueError(f"init: {init!r} has no tokens to start from")
                start = old.detach()[word].float().mean(dim=0).expand(len(self._tokens), -1)
            else:  # the advanced script's init: random, at the scale of the existing rows
                start = torch.randn(len(self._tokens), old.shape[1], generator=gen) * old.detach().float().std()
            # mean_resizing=False: the new rows are set right below, no need for the covariance.
            encoder.resize_token_embeddings(max(len(tokenizer), old.shape[0], max(ids) + 1),
                                            mean_resizing=False)
            emb = encoder.get_input_embeddings()
            emb.weight.requires_grad_(trainable)  # resizing makes a fresh, trainable Parameter
            with torch.no_grad():
                emb.weight[ids] = start.to(emb.weight)  # a plain lookup (no hook) sees them too
            rows = torch.nn.Parameter(start.to(emb.weight.device, torch.float32).clone(), requires_grad=trainable)
            slot = torch.full((emb.weight.shape[0],), -1, dtype=torch.long, device=emb.weight.device)
            slot[ids] = torch.arange(len(ids), device=emb.weight.device)
            emb.register_forward_hook(_put_rows(rows, slot))
            self._ids.append(ids)
            self._rows.append(rows)

    @property
    def tokens(self) -> list[str]:
        return list(self._tokens)

    @property
    def abstractions(self) -> dict[str, list[str]]:
        """{trigger: its tokens}, e.g. {"TOK": ["<s0>", "<s1>"]}."""
        return {t: list(toks) for t, toks in self._abstractions.items()}

    def expand(self, text: str) -> str:
        """Every whole-word trigger becomes its tokens ("TOK, a figure" → "<s0><s1>, a figure")."""
        return expand(text, self._abstractions)

    def _weights(self) -> list[torch.Tensor]:
        return [e.get_input_embeddings().weight for e in (self.encoders.text_encoder, self.encoders.text_encoder_2)]

    def parameters(self) -> list[torch.Tensor]:
        """The new rows, (n, 768) and (n, 1280): all that pivotal tuning trains."""
        return list(self._rows)

    def set_trainable(self, flag: bool) -> None:
        for rows in self._rows:
            rows.requires_grad_(flag)

    @torch.no_grad()
    def sync_rows(self) -> None:
        """Copy the trained rows into the matrices (call after each optimizer step), so code that
        reads the matrices without the hook (a pipeline saved from these encoders) agrees."""
        for w, ids, rows in zip(self._weights(), self._ids, self._rows):
            w[ids] = rows.to(w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: rows.detach().float().contiguous().clone() for k, rows in zip(KEYS, self._rows)}

    @torch.no_grad()
    def load_state_dict(self, d: dict[str, torch.Tensor]) -> None:
        missing = [k for k in KEYS if k not in d]
        if missing:
            raise ValueError(f"textual inversion embeddings: missing {missing} (expected keys {list(KEYS)})")
        for k, rows in zip(KEYS, self._rows):
            if tuple(d[k].shape) != tuple(rows.shape):
                raise ValueError(f"textual inversion embeddings: {k} has shape {tuple(d[k].shape)}, expected "
                                 f"{tuple(rows.shape)} ({rows.shape[0]} tokens x this text encoder's hidden "
                                 f"size {rows.shape[1]})")
        for k, rows in zip(KEYS, self._rows):
            rows.copy_(d[k].to(rows))
        self.sync_rows()


def _put_rows(rows: torch.nn.Parameter, slot: torch.Tensor):
    """A forward hook: the embedding layer's output, with the new tokens' positions taken from
    `rows` (slot[id] = the row of a new token, -1 for every other id)."""
    def hook(module, args, out):
        k = slot[args[0]]
        hit = k >= 0
        if not bool(hit.any()):
            return out
        out = out.clone()
        out[hit] = rows[k[hit]].to(out.dtype)
        return out
    return hook


def expand(text: str, abstractions: dict[str, list[str]]) -> str:
    """Each whole-word trigger of `abstractions` ({trigger: tokens}) replaced by its tokens."""
    for trigger, tokens in abstractions.items():
        text = re.sub(rf"(?<!\w){re.escape(trigger)}(?!\w)", "".join(tokens), text)
    return text


def save_embeddings(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state_dict.items()}
    # Written as is: the trainer writes it inside a checkpoint's temporary folder (renamed whole).
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def load_embeddings(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))

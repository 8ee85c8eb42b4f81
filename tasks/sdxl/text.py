"""The SDXL trainer's prompts: 75-token chunks through both CLIP encoders, live while the text
side trains (pivotal tokens, text-encoder LoRA), else once per distinct prompt from a host cache."""
from __future__ import annotations

import logging

import torch

from models.sdxl.pipeline import TextEncoders
from models.sdxl.text import CHUNK, encode_prompts
from tasks.sdxl.params import LoraParams

log = logging.getLogger("niche.train_lora")


class Prompts:
    def __init__(self, p: LoraParams, text: TextEncoders, pivotal, device: torch.device):
        self.p, self.text, self.pivotal, self.device = p, text, pivotal, device
        self.train_text = False  # set by the trainer: the text side trains (every step encodes live)
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.cache_bytes, self.cache_full = 0, False
        # Which prompts may be cached (None: all). The full fine-tune's tag strings are shuffled
        # afresh each time, so only its captions (and "") are worth the memory.
        self.cacheable: set[str] | None = None

    def expand(self, text: str) -> str:
        return self.pivotal.expand(text) if self.pivotal else text

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 77 x chunks, 2048) hidden states and (B, 1280) pooled embeddings of `texts`."""
        texts = [self.expand(t) for t in texts]
        if self.train_text:  # live every step (too-long prompts: one summary line at the start)
            return encode_prompts(self.text, texts, self.p.max_chunks, self.device, warn=False)
        got = {}
        for t in dict.fromkeys(texts):  # frozen encoders: each distinct prompt is encoded once for the run
            if t not in self.cache:
                # One prompt at a time: its embedding never depends on which batch it first came in.
                with torch.no_grad():
                    e, pooled = encode_prompts(self.text, [t], self.p.max_chunks, self.device, warn=False)
                if self.cacheable is None or t in self.cacheable:
                    self._remember(t, e[0], pooled[0])
                got[t] = (e[0], pooled[0])
            else:
                got[t] = self.cache[t]
        width = max(got[t][0].shape[0] for t in texts)
        rows = [got[t][0].to(self.device) for t in texts]
        if any(r.shape[0] < width for r in rows):
            # Mixed chunk counts (a prompt dropped to "" among long captions): pad with the empty
            # chunk's states, as encode_prompts pads (each chunk is encoded on its own), instead of
            # encoding the whole batch again.
            empty = self._empty_chunk()
            rows = [torch.cat([r, empty.expand((width - r.shape[0]) // empty.shape[1], -1, -1).flatten(0, 1)])
                    for r in rows]
        return torch.stack(rows), torch.stack([got[t][1] for t in texts]).to(self.device)

    def _empty_chunk(self) -> torch.Tensor:
        """(1, 77, 2048): the states of [BOS][EOS][pad...], the chunk shorter prompts are padded with."""
        if "" not in self.cache:
            with torch.no_grad():
                e, pooled = encode_prompts(self.text, [""], 1, self.device, warn=False)
            self._remember("", e[0], pooled[0])
            if "" not in self.cache:  # the cache is full: keep it here anyway, it is one chunk
                self.cache[""] = (e[0].cpu(), pooled[0].cpu())
        return self.cache[""][0].to(self.device).unsqueeze(0)

    def _remember(self, text: str, embeds: torch.Tensor, pooled: torch.Tensor) -> None:
        """Cache on the host, up to text_cache_gb: 70,000 captions would take ~44 GB (77 x 2048
        fp32 each); past the cap, prompts are encoded again when they come (the same numbers)."""
        size = embeds.numel() * embeds.element_size() + pooled.numel() * pooled.element_size()
        if self.cache_bytes + size > self.p.text_cache_gb * 2**30:
            if not self.cache_full:
                log.info("%s: text cache full at %d prompts (%s.text_cache_gb = %s); the rest are encoded "
                         "when they come", self.p.SECTION, len(self.cache), self.p.SECTION, self.p.text_cache_gb)
                self.cache_full = True
            return
        self.cache[text] = (embeds.cpu(), pooled.cpu())
        self.cache_bytes += size

    def chunks(self, prompts: list[str]) -> dict[str, int]:
        """{prompt: its 75-token chunks}, and one warning line for the whole dataset (not one per
        caption: long VLM captions are common, and CLIP reads only max_chunks x 75 tokens)."""
        prompts = sorted(set(prompts))
        texts = [self.expand(t) for t in prompts]
        budget = CHUNK * self.p.max_chunks
        ids = self.text.tokenizer(texts, add_special_tokens=False, verbose=False).input_ids
        chunks = {t: min(max(1, -(-len(i) // CHUNK)), self.p.max_chunks) for t, i in zip(prompts, ids)}
        long = [(len(i), t) for i, t in zip(ids, texts) if len(i) > budget]
        if long:
            n, example = max(long)
            log.warning("%s: %d of %d prompts are longer than %d tokens (max_chunks %d x %d); CLIP never reads "
                        "their ends (the longest, %d tokens: %.70r...). Raise %s.max_chunks (up to 3) or shorten "
                        "the captions", self.p.SECTION, len(long), len(texts), budget, self.p.max_chunks, CHUNK, n,
                        example, self.p.SECTION)
        return chunks

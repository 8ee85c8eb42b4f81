"""Gemma 3 as a captioner: load from a resolved folder, caption images in batches.

The same code loads google/gemma-3-27b-it and the tiny random-weight model
`build_tiny_gemma3` writes: Gemma3ForConditionalGeneration + AutoProcessor from
the folder, never remote code. Prompts go through the processor's own chat
template, so the image placeholder expansion (<start_of_image>, the soft tokens,
<end_of_image>) is exactly what the model was trained with.

Image pre-processing: transformers 5 picks the torchvision image processor when
torchvision is installed (GPU machines) and the PIL/numpy one
(Gemma3ImageProcessorPil) when it is not (these CPU machines). Both resize to the
vision tower's square input and normalise with mean = std = 0.5; nothing here
imports torchvision.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

from models.hub import mark_tiny, torch_dtype

log = logging.getLogger("niche.caption")

# Gemma 3's chat template (google/gemma-3-*-it, tokenizer_config.json), image parts included.
# Only the tiny builder writes it; a real model folder carries its own.
CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""

END_OF_TURN = "<end_of_turn>"  # the -it models end a reply with this, not <eos>


@dataclass(frozen=True)
class Generation:
    text: str  # decoded, special tokens dropped, not normalised
    ended: bool  # the model stopped on its own (an end token) before max_new_tokens
    tokens: int  # generated tokens, the end token not counted


class GemmaCaptioner:
    """Gemma 3 loaded once; `caption` runs one batched, left-padded generate()."""

    def __init__(self, path: Path, device: str, dtype: str = "auto"):
        import torch
        from transformers import AutoProcessor, Gemma3ForConditionalGeneration

        self.device = device
        self.dtype = torch_dtype(dtype, device)
        log.info("loading Gemma 3 from %s (%s, %s)", path, device, self.dtype)
        self.processor = AutoProcessor.from_pretrained(path)
        # Decoder-only batching: pad on the left so every row's last prompt token
        # sits at the same position and generation continues right after it.
        self.processor.tokenizer.padding_side = "left"
        # With accelerate installed, a device map loads the weights straight onto
        # the GPU; without it (the CPU lock has none) they pass through host
        # memory first — 54 GB for the 27B in bf16.
        direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
        self.model = Gemma3ForConditionalGeneration.from_pretrained(
            path, dtype=self.dtype, **({"device_map": device} if direct else {}))
        self.model.to(device).eval()
        tok = self.processor.tokenizer
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        stop.add(tok.eos_token_id)
        eot = tok.convert_tokens_to_ids(END_OF_TURN)
        if eot is not None and eot != tok.unk_token_id:
            stop.add(eot)
        self.stop_ids = sorted(i for i in stop if i is not None)
        self._torch = torch

    def caption(self, images: list, instruction: str | list[str], max_new_tokens: int, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: int = 0) -> list[Generation]:
        """One Generation per PIL image, in order; one instruction for all or one each. temperature 0 = greedy."""
        torch = self._torch
        texts = [instruction] * len(images) if isinstance(instruction, str) else instruction
        conversations = [[{"role": "user", "content": [
            {"type": "image", "image": img}, {"type": "text", "text": text}]}] for img, text in zip(images, texts)]
        inputs = self.processor.apply_chat_template(
            conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True}).to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        # The -it models ship a sampling generation_config (top_k 64, top_p 0.95):
        # greedy has to be asked for explicitly.
        if temperature > 0:
            # Seeded per batch: a run is reproducible for the same batches.
            torch.manual_seed(seed)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        else:
            sampling = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.processor.tokenizer.pad_token_id, **sampling)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()  # (B, generated)
        return [self._decode(ids) for ids in new]

    def _decode(self, ids: list[int]) -> Generation:
        stops = set(self.stop_ids)
        end = next((i for i, t in enumerate(ids) if t in stops), None)
        if end is not None:
            ids = ids[:end]  # what follows the end token is padding
        text = self.processor.tokenizer.decode(ids, skip_special_tokens=True)
        return Generation(text=text, ended=end is not None, tokens=len(ids))


# ---------------------------------------------------------------- tiny model

# Gemma's specials in Gemma's order where it has one (pad 0, eos 1, bos 2, unk 3).
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", END_OF_TURN,
             "<start_of_image>", "<end_of_image>"]
_IMAGE_TOKEN = "<image_soft_token>"  # last, as in the real 262k vocabulary
_CHARS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()\n"


def build_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Gemma 3 (model, tokenizer, processor, template) to `folder`.

    Vision: SigLIP at 64 px with 16 px patches (4 x 4 patches, pooled to 4 soft
    tokens). Text: 2 layers of width 32, one sliding and one global, as the real
    model alternates them. Tokenizer: Gemma's BPE class over single characters
    with byte fallback, and the special tokens the processor needs.
    """
    import torch
    from tokenizers import AddedToken
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, GenerationConfig, SiglipVisionConfig)
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder = Path(folder)
    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    vocab[_IMAGE_TOKEN] = len(vocab)
    tok = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": _IMAGE_TOKEN})
    # Registered as added tokens so "<start_of_turn>" in a prompt is one token, not 15 characters.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS + [_IMAGE_TOKEN]],
                   special_tokens=True)

    image_size, patch, mm_tokens = 64, 16, 4
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_length=mm_tokens)
    text = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch)
    eot = vocab[END_OF_TURN]
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab[_IMAGE_TOKEN], pad_token_id=0, bos_token_id=2,
                          eos_token_id=[1, eot])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers initialises the image projection to zeros, which would make
        # every image look the same to the text model; random, it carries the image.
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, proj.shape[0] ** -0.5)
        # Random weights now and then emit a special token (an end, an image marker)
        # or a lone UTF-8 byte and caption nothing readable; shrinking those rows of
        # the tied embedding keeps their logits near 0, below the best character's.
        emb = model.get_input_embeddings().weight
        for t in _SPECIALS + [_IMAGE_TOKEN] + [f"<0x{b:02X}>" for b in range(256)]:
            emb[vocab[t]] *= 1e-3
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=[1, eot], pad_token_id=0)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    mark_tiny(folder, "Gemma 3 (Gemma3ForConditionalGeneration)")
    return folder

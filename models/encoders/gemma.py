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


def decode_until_stop(tokenizer, ids: list[int], stop_ids: list[int]) -> Generation:
    """One generated row as text, cut at its first end token (what follows it is padding)."""
    stops = set(stop_ids)
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    if end is not None:
        ids = ids[:end]
    return Generation(text=tokenizer.decode(ids, skip_special_tokens=True), ended=end is not None, tokens=len(ids))


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
        return decode_until_stop(self.processor.tokenizer, ids, self.stop_ids)


# ---------------------------------------------------------------- tiny model

# Gemma's specials in Gemma's order where it has one (pad 0, eos 1, bos 2, unk 3).
_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", END_OF_TURN,
             "<start_of_image>", "<end_of_image>"]
_IMAGE_TOKEN = "<image_soft_token>"  # last, as in the real 262k vocabulary
# Single characters: any prompt tokenizes into these (unknown ones fall back to bytes).
_CHARS = "▁abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()\n"
# What the tiny model may write: whole plain words, space-prefixed as in Gemma's
# vocabulary. No merge builds them, so a prompt never tokenizes into them; only
# generation produces them, and generation produces nothing else (see below).
_WORDS = """
a an the of with and in on at near above below beside behind between against across along over under
figure body person shape silhouette outline form pose posture stance gesture
head face neck shoulder shoulders chest torso back waist hip hips arm arms elbow wrist hand hands finger
leg legs knee knees ankle foot feet spine
standing sitting kneeling crouching leaning bending walking running jumping reaching stretching turning
twisting lifting raising lowering pointing resting balancing stepping waving lying
raised lowered bent straight crossed extended folded spread tilted curved upright sideways forward backward
left right upper lower front side top bottom centre center middle edge corner frame
black white grey gray dark light pale bright soft sharp faint dense sparse thin thick
dot dots particle particles speck specks point points grain grains cluster clusters fleck flecks stroke
small large tiny round oval narrow wide long short tall slender compact loose tight
background plain empty blank paper surface canvas space ground shadow contrast texture pattern
composition framing view angle profile portrait landscape close distant full half
one two three several many few some both each every
visible scattered drawn printed rendered arranged placed positioned centred framed
""".split()


_TINY_IMAGE = (64, 8, 16)  # vision input size, patch size, soft tokens per image (4 x 4)
_TINY_HIDDEN = 32  # text width
_IMAGE_CHANNELS = 8  # of the text residual stream, written by the image only
_WORD_SCALE = 0.3  # norm of a word's embedding row: small next to a layer's unit output, or it repeats itself
_OTHER_SCALE = 0.03  # every other row: a character, a byte, a special; as outputs they lose to any word
_LOGIT_SCALE = 10.0  # final norm gain: logits of a few units, so sampling (temperature > 0) is not uniform
_IMAGE_GAIN = 6.0  # the full-attention layer's output (the image) against the other layers' (unit) outputs
_ATTN_SHARPNESS = 8.0  # key-norm gain there: each position reads a few image tokens, not their average
_REPETITION_PENALTY = 3.0  # in generation_config: a word used once rarely comes back


def _tiny_vocab() -> tuple[dict[str, int], list[int]]:
    """The tiny vocabulary and the ids generation may produce (the words, in order)."""
    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for c in _CHARS:
        vocab.setdefault(c, len(vocab))
    words = []
    for w in dict.fromkeys(_WORDS):  # unique, in order
        words.append(len(vocab))
        vocab["▁" + w] = len(vocab)
    vocab[_IMAGE_TOKEN] = len(vocab)
    return vocab, words


def _particle_pixels(g, size: int, n: int):
    """n synthetic sparse black-particle figures on white, as normalised pixel values (n, 3, size, size)."""
    import torch

    hi = 4 * size  # drawn at 4x and averaged down, as a resize of a large image would
    out = torch.ones(n, 1, hi, hi)
    for i in range(n):
        pts = []
        joints = hi * (0.3 + 0.4 * torch.rand(8, 2, generator=g))
        for a, b in zip(joints[:-1], joints[1:]):
            t = torch.rand(60, 1, generator=g)
            pts.append(a + t * (b - a) + hi * 0.02 * torch.randn(60, 2, generator=g))
        xy = torch.cat(pts).long().clamp(0, hi - 1)
        out[i, 0, xy[:, 1], xy[:, 0]] = 0.0
    img = torch.nn.functional.avg_pool2d(out, 4).expand(n, 3, size, size)
    return (img - 0.5) / 0.5


def _shape_tiny_weights(model, words: list[int], seed: int) -> None:
    """Shape the random initialisation into a captioner that sees the image and writes words.

    As transformers initialises it, the model writes the same text for every
    image: 16 soft tokens among ~400 prompt tokens barely move a logit, and sparse
    black particles on white barely move the vision features. The weights stay
    random draws; what changes is their scales and which channels they connect:

    * Vision: the patch embedding's bias cancels a white patch exactly and its
      weights are large, so a patch embeds its dark particles, not the paper; the
      final layer norm's bias centres the features on synthetic particle figures,
      so that what all figures share does not swamp what tells them apart.
    * Text residual stream = `_IMAGE_CHANNELS` image channels + the rest. Only the
      projector writes the image channels (every embedding row and every layer
      output is 0 there), and only they feed the full-attention layer's values:
      its output at each position is a mix of image tokens alone, brought to size
      `_IMAGE_GAIN` by its post-attention norm however few image tokens there are.
      Every next word depends on the image as well as on the words before it
      (the sliding-window layer and the MLPs).
    * Output (tied embedding): word rows are larger than every other row, so the
      best word beats any character, byte or special token; generation_config's
      suppress_tokens bans those outright.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    vt = model.model.vision_tower
    lm = model.model.language_model
    k = _IMAGE_CHANNELS

    conv = vt.embeddings.patch_embedding
    conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.2)
    conv.bias.copy_(-conv.weight.sum(dim=(1, 2, 3)))  # white is +1 after normalisation: it embeds to 0
    pos = vt.embeddings.position_embedding.weight
    pos.copy_(torch.randn(pos.shape, generator=g) * 0.02)
    vt.post_layernorm.bias.zero_()
    feats = vt(pixel_values=_particle_pixels(g, vt.config.image_size, 16)).last_hidden_state
    vt.post_layernorm.bias.copy_(-feats.mean(dim=(0, 1)))

    proj = model.model.multi_modal_projector.mm_input_projection_weight  # (vision width, text width)
    proj.copy_(torch.randn(proj.shape, generator=g) * 4.0 * proj.shape[0] ** -0.5)
    proj[:, k:] = 0

    emb = lm.embed_tokens.weight  # (vocab, text width), tied with the output layer
    emb.copy_(torch.randn(emb.shape, generator=g) * lm.config.hidden_size ** -0.5)
    is_word = torch.zeros(emb.shape[0], dtype=torch.bool)
    is_word[words] = True
    emb[is_word] *= _WORD_SCALE
    emb[~is_word] *= _OTHER_SCALE
    emb[:, :k] = 0
    lm.norm.weight.fill_(_LOGIT_SCALE - 1.0)  # Gemma's RMSNorm scales by 1 + weight

    for kind, layer in zip(lm.config.layer_types, lm.layers):
        layer.self_attn.o_proj.weight[:k] = 0
        layer.mlp.down_proj.weight[:k] = 0
        if kind == "full_attention":
            layer.self_attn.v_proj.weight[:, k:] = 0
            layer.post_attention_layernorm.weight.fill_(_IMAGE_GAIN - 1.0)
            layer.self_attn.k_norm.weight.fill_(_ATTN_SHARPNESS - 1.0)


def build_tiny_gemma3(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Gemma 3 (model, tokenizer, processor, template) to `folder`.

    Vision: SigLIP at 64 px with 8 px patches (8 x 8 patches, pooled to 16 soft
    tokens). Text: 2 layers of width 32, one sliding and one global, as the real
    model alternates them. Tokenizer: Gemma's BPE class over single characters
    with byte fallback, plus ~200 plain English words (the only tokens
    it generates), and the special tokens the processor needs. Its greedy
    captions are strings of those words that differ from image to image
    (see `_shape_tiny_weights`).
    """
    import torch
    from tokenizers import AddedToken
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, GenerationConfig, SiglipVisionConfig)
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    folder = Path(folder)
    vocab, words = _tiny_vocab()
    tok = GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True, extra_special_tokens={
        "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": _IMAGE_TOKEN})
    # Registered as added tokens so "<start_of_turn>" in a prompt is one token, not 15 characters.
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS + [_IMAGE_TOKEN]],
                   special_tokens=True)

    image_size, patch, mm_tokens = _TINY_IMAGE
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tok, chat_template=CHAT_TEMPLATE, image_seq_length=mm_tokens)
    text = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=_TINY_HIDDEN, intermediate_size=2 * _TINY_HIDDEN,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=16,
                            layer_types=["sliding_attention", "full_attention"], max_position_embeddings=2048)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=image_size, patch_size=patch, vision_use_head=False)
    eot = vocab[END_OF_TURN]
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=mm_tokens,
                          boi_token_index=vocab["<start_of_image>"], eoi_token_index=vocab["<end_of_image>"],
                          image_token_index=vocab[_IMAGE_TOKEN], pad_token_id=0, bos_token_id=2,
                          eos_token_id=[1, eot])
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        _shape_tiny_weights(model, words, seed)
    # Only words may be generated: no byte-fallback piece (a lone UTF-8 byte
    # decodes to U+FFFD), no special or end token (the tiny model never stops by
    # itself), no bare character. generate() starts from the folder's
    # generation_config, so the ban holds through the real loading path, greedy
    # or sampled; the repetition penalty keeps a caption from looping on a word.
    allowed = set(words)
    model.generation_config = GenerationConfig(
        bos_token_id=2, eos_token_id=[1, eot], pad_token_id=0, repetition_penalty=_REPETITION_PENALTY,
        suppress_tokens=[i for i in range(len(vocab)) if i not in allowed])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    mark_tiny(folder, "Gemma 3 (Gemma3ForConditionalGeneration)")
    return folder

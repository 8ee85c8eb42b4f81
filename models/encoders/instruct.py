"""An instruction-tuned chat model in transformers (Qwen 2.5 Instruct by default): short
text answers to short text prompts, for the `expand` stage (a word -> an image scene).

Loaded from a resolved folder (models/hub.py) with AutoTokenizer + AutoModelForCausalLM,
never remote code; the prompt goes through the tokenizer's own chat template, so the turn
markers are exactly those the model was tuned with. The same code loads
Qwen/Qwen2.5-3B-Instruct and the tiny random-weight model `build_tiny_qwen2` writes.

Why sampling runs one row at a time: each answer is keyed on its own seed (the stage's
seed + the variation), and torch has one global generator. A batched sampled generate()
would draw row 3's tokens from a stream that depends on which rows share its batch, so the
same key could hold different answers depending on what else was missing. One generate()
per row under `torch.manual_seed(seed)` makes an answer depend on its key alone; the
answers are a few dozen tokens, so this costs little. Greedy answers batch (left-padded).
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from models.encoders.gemma import Generation, decode_until_stop
from models.hub import SetupError, mark_tiny, torch_dtype

log = logging.getLogger("niche.expand")

# Qwen 2.5 Instruct's ChatML template without the tool-calling branches (tokenizer_config.json
# of Qwen/Qwen2.5-*-Instruct): the default system prompt when none is given, as the real one.
# Only the tiny builder writes it; a real model folder carries its own.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
END_OF_TURN = "<|im_end|>"


class InstructModel:
    """A chat model loaded once; `generate` answers one user message per prompt."""

    def __init__(self, path: Path, device: str, dtype: str = "auto", param: str = "expand.model"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.dtype = torch_dtype(dtype, device)
        log.info("loading the instruction model from %s (%s, %s)", path, device, self.dtype)
        self.tok = AutoTokenizer.from_pretrained(path)
        if not getattr(self.tok, "chat_template", None):
            raise SetupError(f"{param}: {path} has no chat template: not an instruction (chat) model; "
                             "use an -Instruct / -it model")
        # Decoder-only batching: left padding puts every row's last prompt token at the same place.
        self.tok.padding_side = "left"
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        # accelerate's device map loads straight onto the GPU instead of through host memory.
        direct = device != "cpu" and importlib.util.find_spec("accelerate") is not None
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=self.dtype, **({"device_map": device} if direct else {}))
        self.model.to(device).eval()
        eos = self.model.generation_config.eos_token_id
        stop = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        stop.add(self.tok.eos_token_id)
        eot = self.tok.convert_tokens_to_ids(END_OF_TURN)
        if isinstance(eot, int) and eot != self.tok.unk_token_id:
            stop.add(eot)
        self.stop_ids = sorted(i for i in stop if i is not None)
        self._torch = torch

    def _inputs(self, prompts: list[str]):
        texts = [self.tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
        # The template wrote the specials (a BOS too, where a model has one): add none twice.
        return self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 top_k: int = 0, seeds: list[int] | None = None) -> list[Generation]:
        """One Generation per prompt, in order. temperature 0: greedy, batched; above 0: sampled,
        row i under seeds[i] alone (see the module's docstring)."""
        torch = self._torch
        if temperature <= 0:
            # Instruct models ship a sampling generation_config: greedy has to be asked for.
            return self._run(prompts, max_new_tokens,
                             dict(do_sample=False, temperature=None, top_p=None, top_k=None))
        seeds = seeds if seeds is not None else [0] * len(prompts)
        out = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            torch.manual_seed(seed)
            out += self._run([prompt], max_new_tokens,
                             dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k))
        return out

    def _run(self, prompts: list[str], max_new_tokens: int, sampling: dict) -> list[Generation]:
        inputs = self._inputs(prompts)
        with self._torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, eos_token_id=self.stop_ids,
                                      pad_token_id=self.tok.pad_token_id, **sampling)
        new = out[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._decode(ids) for ids in new]

    def _decode(self, ids: list[int]) -> Generation:
        return decode_until_stop(self.tok, ids, self.stop_ids)


# ---------------------------------------------------------------- tiny model

_SPECIALS = ["<|endoftext|>", "<|im_start|>", END_OF_TURN]
# What the tiny model may write: whole words, "Ġ"-prefixed (a leading space in byte-level BPE).
# No merge builds them, so a prompt never tokenizes into them; only generation produces them,
# and generation produces nothing else (generation_config's suppress_tokens).
_WORDS = """
a the of with and in on at near above below beside between under over
figure figures person people child couple crowd hand hands arm arms head face body
two three several one small large tall tiny
standing sitting kneeling walking running jumping reaching dancing holding hugging lifting
leaning falling floating resting waving pointing carrying sleeping climbing
tree bird birds flower house door window chair table cup ball kite boat bridge moon sun star
heart circle line wave cloud rain road hill mountain river light shadow
together apart close away toward open raised bent
""".split()
_TINY_HIDDEN = 64
_EMBED_STD = 0.2
_LOGIT_GAIN = 2.0
_REPETITION_PENALTY = 3.0  # in generation_config: a word used once rarely comes back


def _tiny_vocab() -> tuple[dict[str, int], list[int]]:
    """The tiny vocabulary (specials, the 256 byte-level symbols, the words) and the word ids."""
    from tokenizers import pre_tokenizers

    vocab = {t: i for i, t in enumerate(_SPECIALS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # sorted: the ids must not depend on a set's order
        vocab[ch] = len(vocab)
    words = []
    for w in dict.fromkeys(_WORDS):
        words.append(len(vocab))
        vocab["Ġ" + w] = len(vocab)
    return vocab, words


def _shape_tiny_weights(model, seed: int) -> None:
    """Rescale the random initialisation so answers depend on the prompt and the seed.

    As transformers initialises it (std 0.02), the layers' outputs are tiny next to a token's
    embedding: the next word is the one most like the current one, and the model writes one
    word over and over whatever it is asked. Here every matrix is a unit-gain draw (std
    1/sqrt(fan-in)), so the layers carry the prompt; embedding rows are small (std
    `_EMBED_STD`) and the final norm's gain `_LOGIT_GAIN` gives logits of a few units, so
    sampling is neither uniform nor a certainty.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    emb = model.model.embed_tokens.weight  # tied with the output layer
    for name, w in model.named_parameters():
        if w.dim() == 2 and w is not emb:
            w.copy_(torch.randn(w.shape, generator=g) * w.shape[1] ** -0.5)
    emb.copy_(torch.randn(emb.shape, generator=g) * _EMBED_STD)
    model.model.norm.weight.fill_(_LOGIT_GAIN)


def build_tiny_qwen2(folder: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight Qwen2 chat model (weights, tokenizer, ChatML template) to `folder`.

    Qwen2ForCausalLM at width 64 with 2 layers; Qwen2's byte-level BPE over single bytes plus
    ~140 plain words (the only tokens it generates, so every answer is a string of words and
    never an end token: it runs to max_new_tokens). Deterministic for a seed; seconds on a CPU.
    """
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    folder = Path(folder)
    vocab, words = _tiny_vocab()
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], eos_token=END_OF_TURN, pad_token="<|endoftext|>",
                         unk_token=None, additional_special_tokens=[])
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END_OF_TURN]})
    tok.chat_template = CHAT_TEMPLATE
    pad, eot = vocab["<|endoftext|>"], vocab[END_OF_TURN]
    config = Qwen2Config(vocab_size=len(vocab), hidden_size=_TINY_HIDDEN, intermediate_size=2 * _TINY_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=pad,
                         eos_token_id=eot, pad_token_id=pad)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        _shape_tiny_weights(model, seed)
    allowed = set(words)
    model.generation_config = GenerationConfig(
        bos_token_id=pad, eos_token_id=[eot, pad], pad_token_id=pad, repetition_penalty=_REPETITION_PENALTY,
        suppress_tokens=[i for i in range(len(vocab)) if i not in allowed])
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    mark_tiny(folder, "Qwen2 chat model (Qwen2ForCausalLM)")
    return folder

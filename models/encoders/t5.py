"""T5 encoder: captions → per-token hidden states, trimmed to the real length.

The encoder and its tokenizer load from one resolved folder (models.hub), with
safetensors weights and no remote code. `build_tiny_t5` writes a tiny
random-weight model in the same layout for tests and the CPU-only profile.
"""
from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from models.hub import mark_tiny

log = logging.getLogger("niche.models.t5")

DEFAULT_MODEL = "google-t5/t5-large"
# What the encoder needs from a hub snapshot; the repo also holds TF, Flax and
# PyTorch-pickle copies of the weights, several GB we never read.
ALLOW_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "spiece.model",
                  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
# Hub T5 configs pad the embedding table past the tokenizer (t5-large: 32,128
# rows for 32,100 tokens), so an exact match cannot be required; a tokenizer
# far smaller than the table means it was not really loaded from the folder.
_MIN_VOCAB_FRACTION = 0.9


class T5Encoder:
    """A T5EncoderModel + T5Tokenizer on one device, in bf16 or fp32 (never fp16)."""

    def __init__(self, path: Path, dtype, device: str):
        import torch
        from transformers import T5Config, T5EncoderModel

        if dtype == torch.float16:
            raise ValueError("T5 overflows in float16 (its feed-forward activations exceed 65504); "
                             "use bfloat16 or float32")
        config = T5Config.from_pretrained(path)
        self.tokenizer = load_tokenizer(path)
        check_vocab(len(self.tokenizer), config.vocab_size, path)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has no EOS token; T5 needs one")
        self.model = T5EncoderModel.from_pretrained(path, dtype=dtype, use_safetensors=True).to(device).eval()
        self.device = device
        self.dim = config.d_model
        log.info("T5 encoder %s: d_model %d, vocab %d, %s on %s",
                 path, config.d_model, len(self.tokenizer), dtype, device)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Tokens of each text including EOS, before any truncation."""
        return count_tokens(self.tokenizer, texts)

    def encode(self, texts: list[str], max_length: int) -> list[tuple[np.ndarray, bool]]:
        """[(hidden (n, d) float32, truncated)] with n = the text's tokens incl. EOS, ≤ max_length.

        Right padding plus the attention mask: a padded position is never
        attended to, so a text's states do not depend on what it is batched with.
        """
        import torch

        full = self.count_tokens(texts)
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                               return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, d)
        hidden = hidden.float().cpu().numpy()
        lengths = mask.sum(1).tolist()
        return [(hidden[i, :n], full[i] > max_length) for i, n in enumerate(lengths)]


def load_tokenizer(path: Path):
    """The tokenizer alone: what a driver needs to sort captions by length (no weights)."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(path)


def count_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Tokens of each text including EOS, before any truncation."""
    ids = tokenizer(texts, truncation=False, verbose=False)["input_ids"]
    return [len(x) for x in ids]


def check_vocab(n_tokens: int, n_embeddings: int, path: Path) -> None:
    """Refuse a tokenizer that does not fit the model's embedding table.

    The trap this catches: a tokenizer built without its sentencepiece file
    (e.g. `T5TokenizerFast(vocab_file=...)`, silently ignored) has 4 tokens,
    encodes every word as <unk>, and the embeddings look fine but mean nothing.
    """
    if n_tokens > n_embeddings:
        raise ValueError(f"{path}: tokenizer has {n_tokens} tokens but the model embeds only "
                         f"{n_embeddings}; tokenizer and weights do not belong together")
    if n_tokens < _MIN_VOCAB_FRACTION * n_embeddings:
        raise ValueError(f"{path}: tokenizer has only {n_tokens} tokens for a model with {n_embeddings} "
                         "embeddings — it was not loaded from this folder's spiece.model/tokenizer.json")


# ── tiny random-weight model ─────────────────────────────────────────────────

_TINY_CONFIG = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=32, relative_attention_max_distance=128,
                    dropout_rate=0.0, feed_forward_proj="relu")
_TINY_VOCAB = 600  # sentencepiece pieces; the tokenizer adds T5's 100 <extra_id_*> tokens
# Everyday words of image descriptions: the figure captions alone have ~270
# distinct words, too few for a unigram vocabulary of several hundred pieces.
def train_tiny_spiece(corpus: list[str], vocab_size: int = _TINY_VOCAB) -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2), trained on
    `corpus` (the sample captions: tasks.sample.corpus); deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        # one thread: the trainer's result must not depend on the machine
        num_threads=1, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def build_tiny_t5(folder: Path, corpus: list[str]) -> Path:
    """Write a tiny random-weight T5 encoder (config, safetensors, spiece.model) to `folder`, its
    tokenizer trained on `corpus`."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_tiny_spiece(corpus))
    tok = T5Tokenizer.from_pretrained(folder)
    config = T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, **_TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    mark_tiny(folder, "T5")
    return folder

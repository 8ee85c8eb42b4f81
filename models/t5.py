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
        from transformers import T5Config, T5EncoderModel, T5Tokenizer

        if dtype == torch.float16:
            raise ValueError("T5 overflows in float16 (its feed-forward activations exceed 65504); "
                             "use bfloat16 or float32")
        config = T5Config.from_pretrained(path)
        self.tokenizer = T5Tokenizer.from_pretrained(path)
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
        ids = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]
        return [len(x) for x in ids]

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
_WORDS = """
woman man girl boy child children person people portrait face eyes nose mouth lips teeth smile ear
ears hair beard skin cheek chin forehead neck shoulder chest back waist hip hand hands finger
fingers arm leg foot knee elbow wrist ankle body head young old elderly tall short slender muscular
curly straight long wavy dark light pale tanned freckled bald braided blonde brown black white grey
gray red orange yellow green blue purple pink violet golden silver beige cream teal navy crimson
olive turquoise colour colours color bright dim soft harsh warm cool cold hot glowing shiny matte
glossy textured smooth rough wet dry dusty sunlight moonlight daylight lamp candle neon window
shadow shadows reflection reflections highlight glare backlit silhouette contrast saturated muted
vivid pastel monochrome sepia faded grainy sharp blurry blurred focus bokeh depth field foreground
background centre center left right top bottom corner edge middle frame framed composition
symmetrical diagonal horizon vertical horizontal close closeup wide angle view shot aerial overhead
low eye level profile frontal side behind front beside between under above below near far distant
inside outside indoor outdoor studio street road alley bridge river lake sea ocean beach sand wave
waves rock rocks stone cliff mountain mountains hill hills valley forest tree trees leaf leaves
grass flower flowers garden park meadow desert snow ice rain fog mist cloud clouds sky sun moon star
stars night morning evening afternoon dawn dusk sunset sunrise winter summer spring autumn season
weather city town village house building buildings tower wall walls door doors roof floor ceiling
room kitchen bedroom table chair sofa bed shelf book books cup glass bottle plate bowl food bread
fruit apple coffee tea car bicycle bus train boat ship plane rocket astronaut helmet suit jacket
coat shirt dress skirt trousers jeans hat cap scarf gloves shoes boots glasses necklace ring bag
umbrella flag sign poster painting photo photograph drawing sketch illustration render pattern
stripes dots dotted speckled checkered floral geometric abstract particle particles cluster
scattered sparse dense layer layers texture surface metal wood wooden plastic paper fabric cotton
leather wool marble brick concrete steel iron gold cat dog horse bird birds fish cow sheep rabbit
fox deer owl duck butterfly insect animal animals wild sitting standing walking running jumping
lying kneeling crouching bending leaning reaching holding looking smiling laughing crying sleeping
reading writing playing dancing swimming climbing riding driving flying talking eating drinking
waiting watching resting working carrying pulling pushing turning stretching calm quiet busy crowded
empty lonely peaceful dramatic moody cheerful serious gentle bold simple detailed elegant rustic
modern vintage ancient classic minimal clean messy bare rich plain tiny small large huge round
square flat curved thin thick narrow heavy full half one two three four five several many few some
every each both another other same different main new first last next little and or with without of
in on at to from into onto through across along around against over toward towards is are was were
has have had its their his her this that these those there here which while where who very quite
slightly mostly partly nearly almost fully softly gently clearly evenly loosely tightly
"""


def tiny_corpus() -> list[str]:
    """The sample figures' caption vocabulary plus seeded strings of everyday words."""
    import random

    from tasks.sample.skeleton import POSES

    subjects = ("a figure", "a human figure", "an abstract figure", "a dotted figure", "a particle figure")
    facings = ("facing the viewer", "seen from the front", "facing forward", "facing left",
               "turned to the right", "in profile facing left", "with its head toward the right")
    lines = []
    for specs in POSES.values():
        for spec in specs:
            for template in spec.captions:
                for i, subj in enumerate(subjects):
                    lines.append(template.format(subj=subj, facing=facings[i % len(facings)],
                                                 side=("left", "right")[i % 2], other=("right", "left")[i % 2])
                                 + (", drawn in sparse black dots on white" if i == 3 else ""))
    words = _WORDS.split()
    rng = random.Random(0)  # random.Random's choice() is stable across Python versions
    return lines + [" ".join(rng.choice(words) for _ in range(12)) for _ in range(400)]


def train_tiny_spiece(vocab_size: int = _TINY_VOCAB) -> bytes:
    """A unigram sentencepiece model with T5's special ids (pad 0, eos 1, unk 2); deterministic."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tiny_corpus()), model_writer=buf, vocab_size=vocab_size,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        # one thread: the trainer's result must not depend on the machine
        num_threads=1, hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def build_tiny_t5(folder: Path) -> Path:
    """Write a tiny random-weight T5 encoder (config, safetensors, spiece.model) to `folder`."""
    import torch
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(train_tiny_spiece())
    tok = T5Tokenizer.from_pretrained(folder)
    config = T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, **_TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    mark_tiny(folder, "T5")
    return folder

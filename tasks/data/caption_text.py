"""A caption's text as the pipeline uses it: normalised, with the trigger word, and checked for
the runaway generations VLM captioners produce (cut off at the token limit, looping).

The caption stage stores the raw model output and applies these when it writes its table;
the samplers apply the same normalisation and trigger to a prompt.
"""
from __future__ import annotations

import re

FLAG_MAX_TOKENS = "max_new_tokens"  # stopped by the limit, not by the model: likely cut off or looping
FLAG_REPETITION = "repetition"  # one repeated n-gram covers much of the text


def normalize(text: str) -> str:
    """Collapse every run of whitespace (newlines included) to one space; strip."""
    return " ".join(text.split())


def apply_trigger(text: str, trigger: str) -> str:
    """'TOK, <text>' — unless the text already starts with the trigger word."""
    if not trigger or re.match(rf"{re.escape(trigger)}(?!\w)", text):
        return text
    return f"{trigger}, {text}"


def repetition_coverage(text: str, max_n: int = 8, min_repeats: int = 3, min_words: int = 12) -> float:
    """Largest share of the words covered by one n-gram (n <= max_n) repeated >= min_repeats times.

    Occurrences are counted without overlap, so 'a a a a' is two of 'a a'. Natural
    prose stays under ~0.1 (its most frequent word, 'the', alone); a looping
    generation ('a red dot, a red dot, ...') goes towards 1.
    """
    words = re.findall(r"\w+", text.lower())
    if len(words) < min_words:
        return 0.0
    best = 0
    for n in range(1, max_n + 1):
        counts: dict[tuple[str, ...], int] = {}
        free_from: dict[tuple[str, ...], int] = {}
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if i >= free_from.get(gram, 0):
                counts[gram] = counts.get(gram, 0) + 1
                free_from[gram] = i + n
        top = max(counts.values(), default=0)
        if top >= min_repeats:
            best = max(best, top * n)
    return best / len(words)


def caption_flags(text: str, ended: bool, repetition_threshold: float) -> list[str]:
    flags = []
    if not ended:
        flags.append(FLAG_MAX_TOKENS)
    if repetition_coverage(text) >= repetition_threshold:
        flags.append(FLAG_REPETITION)
    return flags

"""bigASP's prompts, built on the fly for each sample of each step (the third seed):

- the caption, or 20% of the time (`tag_share`) the image's tag string when it has tags: its tags
  shuffled, the `important_tags` always kept, the rest dropped down to a random count, led by the
  image's quality tags 90% of the time (`quality_share`);
- then 5% of prompts (`ucg`) are dropped for classifier-free guidance: half to "", half to the
  image's quality tags alone ("most people don't use blank negative prompts these days").

Every draw comes from the sample's own seeded generator, so a prompt depends on (seed, step,
position in the global batch) only: the same with any number of ranks, and again after a resume.
"""
from __future__ import annotations

import random

import torch


def rng_for(g: torch.Generator) -> random.Random:
    return random.Random(int(torch.randint(0, 2**62, (1,), generator=g)))


def quality_of(tags: tuple[str, ...], quality_tags: tuple[str, ...]) -> list[str]:
    known = {q.lower() for q in quality_tags}
    return [t for t in tags if t.lower() in known]


def tag_string(tags: tuple[str, ...], p, rng: random.Random) -> str:
    quality = quality_of(tags, p.quality_tags)
    important = {t.lower() for t in p.important_tags}
    rest = [t for t in tags if t not in quality]
    kept = [t for t in rest if t.lower() in important]
    others = [t for t in rest if t.lower() not in important]
    rng.shuffle(others)
    chosen = kept + others[:rng.randint(min(1, len(others)), len(others))]
    rng.shuffle(chosen)
    if quality and rng.random() < p.quality_share:
        chosen = quality + chosen
    return ", ".join(chosen)


def build(caption: str, tags: tuple[str, ...], p, g: torch.Generator) -> str:
    """The prompt one sample trains with at one step."""
    rng = rng_for(g)
    if rng.random() < p.ucg:
        return ", ".join(quality_of(tags, p.quality_tags)) if rng.random() < p.ucg_quality_share else ""
    if p.prompt is None and tags and rng.random() < p.tag_share:
        return tag_string(tags, p, rng)
    return caption

"""The loader's epoch plan, decided before any byte is read: which shards each rank's workers
read this epoch (seeded by epoch, balanced by samples), how the shuffle buffer and the
workers' round robin order the batches, where a resumed epoch picks up, and which samples
are flipped (with their pose's left/right joints swapped). tasks/data/loader.py runs it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from tasks.data.s3 import Shard, size_of


# ---------------------------------------------------------------- flip
# COCO-WholeBody: 17 body, 6 feet, 68 face (iBUG order), 21 left hand, 21 right hand.
_BODY = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16)]
_FEET = [(17, 20), (18, 21), (19, 22)]
_FACE = ([(i, 16 - i) for i in range(8)]                                    # jaw
         + [(17 + i, 26 - i) for i in range(5)]                             # eyebrows
         + [(31, 35), (32, 34)]                                             # nostrils
         + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]     # eyes
         + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58)]               # outer lips
         + [(60, 64), (61, 63), (65, 67)])                                  # inner lips
FLIP_PERMUTATION = np.arange(133)
for _a, _b in _BODY + _FEET + [(23 + a, 23 + b) for a, b in _FACE] + [(91 + i, 112 + i) for i in range(21)]:
    FLIP_PERMUTATION[_a], FLIP_PERMUTATION[_b] = _b, _a


def flip_sample(s: dict) -> dict:
    """Mirror one decoded sample left-right, keeping its modalities consistent (see module doc)."""
    pose = s["pose"][FLIP_PERMUTATION].copy()  # (133, 3) [x_norm, y_norm, conf]
    pose[:, 0] = -pose[:, 0]
    scale = s.get("dino_scale")
    return dict(s, image=s["image"][:, ::-1], dino_patches=s["dino_patches"][:, ::-1], pose=pose,
                dino_scale=None if scale is None else scale[:, ::-1])


def _draw(seed: int, epoch: int, sample_id: str) -> float:
    h = hashlib.blake2b(f"{seed}/{epoch}/{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


# ---------------------------------------------------------------- the epoch plan
def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def deal(shards: list[Shard], seed: int, epoch: int, world_size: int, workers: int) -> list[list[dict]]:
    """[rank][worker] -> {bucket: shard indices in reading order}. Each bucket's shards, in a seeded
    order, go to the rank (then worker) holding the fewest samples of that bucket, then of all: every
    worker's bucket mix follows the whole one, so its proportional draw is proportional overall."""
    rng = _rng(seed, epoch, 1)
    plan = [[{} for _ in range(workers)] for _ in range(world_size)]
    load = np.zeros((world_size, workers), np.int64)

    def least(mine: np.ndarray, total: np.ndarray) -> int:  # ties drawn at random
        c = np.flatnonzero(mine == mine.min())
        c = c[total[c] == total[c].min()]
        return int(c[rng.integers(len(c))])

    for bucket in sorted({s.bucket for s in shards}):
        here = np.zeros_like(load)
        for i in rng.permutation([i for i, s in enumerate(shards) if s.bucket == bucket]):
            r = least(here.sum(1), load.sum(1))
            w = least(here[r], load[r])
            plan[r][w].setdefault(bucket, []).append(int(i))
            here[r, w] += shards[i].samples
            load[r, w] += shards[i].samples
    return plan


def buffer_shuffle(items: list, size: int, rng: np.random.Generator) -> list:
    """webdataset's shuffle(bufsize) on (shard, position) pairs: once the buffer is full each new item
    takes the place of a random one, which comes out; the rest comes out shuffled. 0 or 1: no shuffle."""
    if size < 2:
        return list(items)
    buf, out = list(items[:size]), []
    for it, j in zip(items[size:], rng.integers(0, size, max(len(items) - size, 0))):
        out.append(buf[j])
        buf[j] = it
    return out + [buf[k] for k in rng.permutation(len(buf))]


def interleave(counts: list[int]) -> list[int]:
    """The worker of each batch, in the order torch's DataLoader yields them (in_order=True): round
    robin from worker 0 each epoch, a finished worker skipped (dataloader.py, _try_put_index)."""
    left, order = list(counts), []
    while any(left):
        for w, n in enumerate(left):
            if n:
                order.append(w)
                left[w] -= 1
    return order


def resume_pads(order: list[int], k: int) -> list[int]:
    """Workers that yield one placeholder first when an epoch resumes at batch k: a new DataLoader
    iterator starts its round robin at worker 0, so if the epoch stopped mid-round, the workers that
    already had their turn in that round pass once (the main process drops the placeholders)."""
    j = k
    while 0 < j < len(order) and order[j - 1] < order[j]:
        j -= 1  # back to the start of batch k's round
    return sorted(set(order[j:k])) if 0 < k < len(order) else []


@dataclass(frozen=True)
class Plan:
    seed: int
    rank: int
    world_size: int
    workers: int  # DataLoader workers, at least 1 (0 workers plan like 1)
    batch_size: int
    shuffle_buffer: int

    def _n(self, shards: list[Shard], idx: list[int]) -> int:
        return -(-sum(shards[i].samples for i in idx) // self.batch_size)  # the last batch may be short

    def counts(self, shards: list[Shard], epoch: int) -> list[list[int]]:
        """Batches per [rank][worker] in this epoch."""
        return [[sum(self._n(shards, idx) for idx in a.values()) for a in rank]
                for rank in deal(shards, self.seed, epoch, self.world_size, self.workers)]

    def batches(self, shards: list[Shard], epoch: int, worker: int) -> tuple[dict, list]:
        """(this worker's {bucket: shards}, its batches [(bucket, [(shard, position), ...]), ...])."""
        mine = deal(shards, self.seed, epoch, self.world_size, self.workers)[self.rank][worker]
        per, B = {}, self.batch_size
        for b in sorted(mine):
            items = [(i, p) for i in mine[b] for p in range(shards[i].samples)]
            rng = _rng(self.seed, epoch, 2, self.rank, worker, *size_of(b))
            order = buffer_shuffle(items, self.shuffle_buffer, rng)
            per[b] = iter([order[k:k + B] for k in range(0, len(order), B)])
        labels = [b for b in sorted(mine) for _ in range(self._n(shards, mine[b]))]
        mix = _rng(self.seed, epoch, 3, self.rank, worker).permutation(len(labels))
        return mine, [(labels[j], next(per[labels[j]])) for j in mix]

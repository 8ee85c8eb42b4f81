"""The training loader: bucket-homogeneous batches from the shard stage's tars,
deterministic for a seed and exactly resumable.

    loader = ShardLoader("data/shards", batch_size=16, seed=0, num_workers=2, flip=0.5)
    for batch in loader:                      # the rest of the current epoch
        ...
        ckpt["loader"] = loader.state_dict()
    fresh.load_state_dict(ckpt["loader"])     # continues with the very next batch

Why resume is exact: an epoch is planned from shards.parquet alone (shard names
and sample counts) before a byte is read.
  1. `deal`: each bucket's shards, in a seeded order, go to a rank and then a
     DataLoader worker, the least loaded first: each sample has one rank, one worker.
  2. A worker reads its shards of a bucket one after another through a seeded
     shuffle buffer, simulated on (shard, position) pairs, and cuts them into
     batches of one bucket each (so the tensors stack).
  3. A worker interleaves its buckets' batches in a seeded random order that
     draws each bucket in proportion to its batches left.
  4. torch's DataLoader takes batches from its workers round robin, skipping a
     worker that has finished (`interleave`).
So an epoch is a pure function of (shards, seed, epoch, rank, world size,
workers, batch size, buffer), and the state is (epoch, batches taken). On resume
each worker rebuilds its plan, drops the batches already taken and re-reads only
shards still holding untaken samples (whole shards; taken samples are not
decoded). Every batch names its worker and the main process checks it against
the plan, so a change in torch's ordering fails loudly instead of silently.

Flip (`flip`: a probability, drawn per sample from (seed, epoch, id)): image
mirrored, DINO patch grid mirrored along w, pose x_norm negated and COCO-WholeBody
left/right keypoints swapped. Approximations: DINO's CLS and patch features of
the mirrored image would not be exactly these, and captions/T5 are unchanged, so
"left"/"right" words in a caption are wrong for a flipped sample.

With DDP, ranks get whole shards, so their batch counts may differ by a few;
`batches_per_rank()` gives them all, for the trainer to align its steps.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import multiprocessing
import os
import warnings
from collections import deque
from dataclasses import asdict

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from tasks.data.s3 import (Shard, ShardError, Source, decode_sample, open_source, read_samples, read_shards,
                             size_of)
from tasks.data.plan import FLIP_PERMUTATION, Plan, _draw, deal, flip_sample, interleave, resume_pads

log = logging.getLogger("niche.loader")
# Workers fork from a forkserver (see ShardLoader): have it import these once,
# so a new worker starts in milliseconds rather than re-importing torch.
multiprocessing.set_forkserver_preload(["torch", "numpy", "tasks.data.loader"])

__all__ = ["ShardLoader", "ShardError", "FLIP_PERMUTATION", "flip_sample", "deal", "interleave"]

# ---------------------------------------------------------------- decoding and batching
def _empty(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """In a worker, allocate in shared memory (as torch's default_collate does): no copy on sending."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=dtype).new(storage).view(shape)


def _t(a: np.ndarray) -> torch.Tensor:
    """A tensor view of an array; a flipped one is copied first (torch has no negative strides)."""
    return torch.from_numpy(np.ascontiguousarray(a) if any(s < 0 for s in a.strides) else a)


def _shapes(s: dict) -> tuple:
    return s["t5"].shape[1], s["dino_cls"].shape, s["dino_patches"].shape


def collate(samples: list[dict], bucket: str) -> dict:
    (B, (w, h)), L = (len(samples), size_of(bucket)), max(s["t5"].shape[0] for s in samples)
    D, cls, grid = _shapes(samples[0])
    out = {"image": _empty((B, 3, h, w), torch.uint8), "t5": _empty((B, L, D), torch.float16),
           "t5_mask": _empty((B, L), torch.bool), "dino_cls": _empty((B, *cls), torch.float16),
           "dino_patches": _empty((B, *grid), torch.float16), "pose": _empty((B, 133, 3), torch.float16)}
    out["t5"].zero_()
    out["t5_mask"].zero_()
    tmp = np.empty(grid, np.float32)
    with warnings.catch_warnings():  # PIL's arrays are read-only; they are only read here
        warnings.simplefilter("ignore", UserWarning)
        for i, s in enumerate(samples):  # torch's copy_ casts and permutes faster than numpy's assignment
            out["image"][i].copy_(_t(s["image"]).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
            n = s["t5"].shape[0]
            out["t5"][i, :n].copy_(_t(s["t5"]))
            out["t5_mask"][i, :n] = True
            out["dino_cls"][i].copy_(_t(s["dino_cls"]))
            out["pose"][i].copy_(_t(s["pose"]))
            if s["dino_scale"] is None:
                out["dino_patches"][i].copy_(_t(s["dino_patches"]))
            else:  # int8 x scale[..., None] in float32, rounded once to float16
                np.multiply(s["dino_patches"], s["dino_scale"].astype(np.float32)[..., None], out=tmp)
                out["dino_patches"][i].copy_(_t(tmp))
    return dict(out, flipped=torch.tensor([s.get("flipped", False) for s in samples]), bucket=bucket,
                ids=[s["id"] for s in samples], captions=[s["caption"] for s in samples])


# ---------------------------------------------------------------- what each worker runs
class _Streams(IterableDataset):
    def __init__(self, source: Source, shards: list[Shard], plan: Plan, flip: float, on_error: str,
                 control: torch.Tensor):
        self.source, self.shards, self.plan, self.flip, self.on_error = source, shards, plan, flip, on_error
        self.control = control  # shared memory: [epoch, skip of each worker, pad of each worker]

    def __iter__(self):
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.run(int(self.control[0]), w, int(self.control[1 + w]), bool(self.control[1 + n + w]))

    def _fail(self, err: ShardError, lost: int, errors: list) -> None:
        if self.on_error == "raise":
            raise err
        errors.append({"shard": err.shard, "member": err.member, "samples": lost, "message": str(err)})

    def _sample(self, raw: tuple, shard: Shard, bucket: str, epoch: int, batch: list, errors: list):
        try:
            s = decode_sample(*raw, shard.path, bucket)
            if batch and _shapes(s) != _shapes(batch[0]):
                raise ShardError(f"shard {shard.path}, member {s['id']}.*: shapes {_shapes(s)} differ from "
                                 f"the batch's {_shapes(batch[0])}", shard.path, f"{s['id']}.*")
        except ShardError as e:
            return self._fail(e, 1, errors)
        if self.flip and _draw(self.plan.seed, epoch, s["id"]) < self.flip:
            s = dict(flip_sample(s), flipped=True)
        batch.append(s)

    def run(self, epoch: int, worker: int, skip: int, pad: bool = False):
        """This worker's planned batches of the epoch, after the `skip` already taken."""
        if pad:
            yield {"_pad": True, "_worker": worker}
        mine, batches = self.plan.batches(self.shards, epoch, worker)
        todo: dict[int, set] = {}
        for _, items in batches[skip:]:
            for i, pos in items:
                todo.setdefault(i, set()).add(pos)
        io_, errors, pending = {}, [], {}  # pending: read, not yet batched (<= buffer + batch per bucket)
        fail = functools.partial(self._fail, errors=errors)
        readers = {b: read_samples(self.source, self.shards, order, todo, io_, fail)
                   for b, order in mine.items()}
        for k in range(skip, len(batches)):
            bucket, items = batches[k]
            samples: list[dict] = []
            for ip in items:
                while ip not in pending:
                    got = next(readers[bucket], None)
                    if got is None:
                        raise RuntimeError(f"loader: shards of {bucket} ran out before planned sample {ip}")
                    pending[got[0]] = got[1]
                if (raw := pending.pop(ip)) is not None:  # None: lost with its shard, reported already
                    self._sample(raw, self.shards[ip[0]], bucket, epoch, samples, errors)
            if k == len(batches) - 1:
                for r in readers.values():  # the shards' tails: their errors go with this last batch
                    for _ in r:
                        pass
            batch = collate(samples, bucket) if samples else {"_empty": True}
            yield dict(batch, _worker=worker, _errors=list(errors), _io=dict(io_))
            errors.clear()
            io_.clear()


def _aws_env(env: dict[str, str], worker_id: int) -> None:
    """Workers start from the forkserver, whose environment is the one it was
    started with: give them the AWS settings (credentials, profile, region) the
    loader saw when it was built."""
    for k in [k for k in os.environ if k.startswith("AWS_") and k not in env]:
        del os.environ[k]
    os.environ.update(env)


def _identity(x):
    return x


# ---------------------------------------------------------------- the loader
_COUNTERS = ("batches", "samples", "samples_skipped", "errors", "get_object", "bytes",
             "cache_hits", "cache_downloads", "cache_rejected")


class ShardLoader:
    """Batches of one epoch per `iter()`, continuing from where `state_dict()` says it stands.

    A batch: image uint8 (B, 3, H, W); t5 float16 (B, L, D) zero-padded to its longest + t5_mask
    bool (B, L); dino_cls float16 (B, D); dino_patches float16 (B, h, w, D), dequantized; pose
    float16 (B, 133, 3); flipped bool (B,); ids and captions (lists of str); bucket ("WxH").
    A worker holds about buckets x (shuffle_buffer + batch_size) samples in memory.
    """

    def __init__(self, source: str | os.PathLike, *, split: str = "train", batch_size: int = 16,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 2,
                 shuffle_buffer: int = 128, flip: float = 0.0, on_error: str = "raise",
                 cache_dir: str | os.PathLike | None = None, endpoint_url: str | None = None,
                 region: str | None = None, verify_cache: bool = True, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        checks = {"batch_size": batch_size >= 1, "seed": seed >= 0, "world_size": world_size >= 1,
                  "rank": 0 <= rank < world_size, "num_workers": num_workers >= 0,
                  "shuffle_buffer": shuffle_buffer >= 0, "flip": 0.0 <= flip <= 1.0,
                  "on_error": on_error in ("raise", "skip"), "prefetch_factor": prefetch_factor >= 1}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {locals()[name]!r} (rank: 0 <= rank < world_size; "
                                 "flip: a probability; on_error: 'raise' or 'skip'; the rest: >= 0 or >= 1)")
        self.split, self.flip, self.num_workers = split, flip, num_workers
        self.source = open_source(source, endpoint_url, region, cache_dir, verify_cache)
        self.shards = read_shards(self.source, split)
        self.plan = Plan(seed, rank, world_size, max(num_workers, 1), batch_size, shuffle_buffer)
        self._fingerprint = hashlib.sha256(json.dumps(
            [(s.path, s.samples, s.sha256) for s in self.shards]).encode()).hexdigest()
        self._epoch, self._taken = 0, 0
        self._stats = dict.fromkeys(_COUNTERS, 0)
        self._recent: deque = deque(maxlen=20)
        self._control = torch.zeros(1 + 2 * self.plan.workers, dtype=torch.int64).share_memory_()
        self._dl = DataLoader(_Streams(self.source, self.shards, self.plan, flip, on_error, self._control),
                              batch_size=None, num_workers=num_workers, collate_fn=_identity, in_order=True,
                              persistent_workers=num_workers > 0, pin_memory=pin_memory,
                              prefetch_factor=prefetch_factor if num_workers else None,
                              # Not fork: a trainer run by Prefect (or anything with
                              # threads holding locks) can deadlock a forked worker.
                              multiprocessing_context="forkserver" if num_workers else None,
                              worker_init_fn=functools.partial(
                                  _aws_env, {k: v for k, v in os.environ.items() if k.startswith("AWS_")}))

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch, self._taken = int(epoch), 0

    def __len__(self) -> int:
        """Planned batches of this rank in the current epoch (under on_error='skip' a batch whose
        samples were all lost is planned, counted here, and not yielded)."""
        return sum(self.plan.counts(self.shards, self._epoch)[self.plan.rank])

    def batches_per_rank(self) -> list[int]:
        return [sum(c) for c in self.plan.counts(self.shards, self._epoch)]

    def __iter__(self):
        if self._taken and self._taken >= len(self):  # finished, but the last next() never came
            self.set_epoch(self._epoch + 1)
        order, start = interleave(self.plan.counts(self.shards, self._epoch)[self.plan.rank]), self._taken
        W, pads = self.plan.workers, resume_pads(order, start)
        self._control[0] = self._epoch
        for w in range(W):
            self._control[1 + w], self._control[1 + W + w] = order[:start].count(w), w in pads
        it = iter(self._dl)
        for w in pads:
            batch = next(it, None)
            if batch is None or not batch.get("_pad") or batch["_worker"] != w:
                raise RuntimeError(f"loader: expected worker {w}'s placeholder on resuming; "
                                   "resume would not be exact")
        for k in range(start, len(order)):
            batch = next(it, None)
            if batch is None or batch.pop("_worker") != order[k]:
                raise RuntimeError(f"loader: batch {k} of epoch {self._epoch} did not come from worker "
                                   f"{order[k]} as planned; resume would not be exact")
            self._account(batch.pop("_errors"), batch.pop("_io"))
            self._taken = k + 1
            if not batch.pop("_empty", False):
                self._stats["batches"] += 1
                self._stats["samples"] += len(batch["ids"])
                yield batch
        if next(it, None) is not None:
            raise RuntimeError(f"loader: workers made more batches than the {len(order)} planned")
        self.set_epoch(self._epoch + 1)

    def _account(self, errors: list[dict], io_: dict) -> None:
        for k, v in io_.items():
            self._stats[k] = self._stats.get(k, 0) + v
        for e in errors:
            self._stats["errors"] += 1
            self._stats["samples_skipped"] += e["samples"]
            self._recent.append(e["message"])
            log.warning("loader: skipped %d sample(s): %s", e["samples"], e["message"])

    def _config(self) -> dict:
        p = asdict(self.plan)
        del p["rank"], p["workers"]  # lockstep DDP ranks take the same batches: one rank's state serves all
        return dict(p, num_workers=self.num_workers, split=self.split, flip=self.flip,
                    shards=self._fingerprint)

    def state_dict(self) -> dict:
        return {"format": 1, "epoch": self._epoch, "batches": self._taken, "config": self._config(),
                "stats": {**self._stats, "recent_errors": list(self._recent)}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != 1:
            raise ValueError(f"loader state: unknown format {state.get('format')!r}, expected 1")
        mine = self._config()
        diff = [f"{k}: saved {v!r}, here {mine.get(k)!r}"
                for k, v in state["config"].items() if mine.get(k) != v]
        if diff:
            raise ValueError("loader state: resuming exactly needs the same settings and shards; "
                             + "; ".join(diff))
        self._epoch, self._taken = int(state["epoch"]), int(state["batches"])
        stats = dict(state.get("stats", {}))
        self._recent = deque(stats.pop("recent_errors", []), maxlen=20)
        self._stats = {**dict.fromkeys(_COUNTERS, 0), **stats}

    def stats(self) -> dict:
        return {**self._stats, "epoch": self._epoch, "batches_this_epoch": self._taken,
                "recent_errors": list(self._recent)}

    def close(self) -> None:
        """Stop the persistent workers now (they also stop when the loader is garbage-collected)."""
        it, self._dl._iterator = self._dl._iterator, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""train: NanoDiT, pixel-space flow matching, on the shard stage's tars.

    python -m tasks.train                                  # one process (dvc.yaml runs this)
    torchrun --nproc_per_node 8 -m tasks.train             # DDP; gloo on CPU, NCCL on CUDA
    python -m tasks.train --stop-at 1200                   # checkpoint at 1200 and stop

A run lives in runs/<run>/: checkpoints/ (tasks/training/checkpoints.py), samples/ (the
fixed 4-image grid every `sample_every` steps: the conditioning images on top,
the EMA model's samples below) and live/ (dvclive metrics); metrics/train.json holds the
step and loss of the last log point (the stage's DVC metric).

The loop is tasks/nanodit/trainer.py; its parts (data, optimizers, checkpoints, logging)
are beside it in tasks/nanodit/.

Resume: the newest checkpoint is continued when it was made by the same
settings (the run's fingerprint: every parameter that changes what is computed,
the shards and the number of ranks). Anything else in runs/<run> is moved aside
to runs/<run>.superseded-<fingerprint>/ — never deleted — and training starts
over. Resuming is exact: each micro-step's randomness (timesteps, noise, CFG
categories, TREAD routing) comes from a generator seeded by (seed, step, micro,
rank), the loader continues from its saved position, and the losses after a
resume are those of a run that never stopped.

A non-finite loss or gradient skips the optimizer step (counted); `nan_patience`
such steps in a row stop the run with the last good checkpoint untouched.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch.distributed as dist

from models.hub import SetupError
from tasks.core.stage import section_or_exit, setup_logging
from tasks.nanodit.params import TrainParams
from tasks.nanodit.trainer import Trainer
from tasks.training.run import TrainError

log = logging.getLogger("niche.train")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train NanoDiT on the shards (params.yaml: train).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stop-at", type=int, default=None, help="checkpoint after this step and stop")
    args = ap.parse_args(argv)
    setup_logging()
    p = section_or_exit(TrainParams, "train", args.params)
    try:
        result = Trainer(p, params_file=Path(args.params)).fit(stop_at=args.stop_at)
    except (SetupError, TrainError) as e:
        sys.exit(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log.info("train: done %s", json.dumps(result))


if __name__ == "__main__":
    main()

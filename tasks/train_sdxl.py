"""train_sdxl: the SDXL full fine-tune with flow matching (bigASP v2.5), on the latents stage.

    python -m tasks.train_sdxl                                   # one process (dvc.yaml runs this)
    torchrun --nproc_per_node 8 -m tasks.train_sdxl              # DDP (train_sdxl.parallel: ddp)
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv-backend c10d \\
             --rdzv-endpoint HOST:29500 -m tasks.train_sdxl      # 32 GPUs; parallel: fsdp shards
    python -m tasks.train_sdxl --stop-at 300                     # checkpoint at 300 and stop

A run lives in runs/<run>/: checkpoints/step-N/ (tasks/sdxl/full_checkpoint.py: each a diffusers
SDXL folder plus one original-layout .safetensors for ComfyUI and `from_single_file`) and live/
(dvclive); metrics/train_sdxl.json holds the step and loss of the last log point. The loop is
tasks/sdxl/full.py; the recipe and the effective batch are explained in tasks/sdxl/full_params.py.

Resume is exact (model, AdamW, schedule, EMA, data position, RNG) and works across DDP/FSDP and
numbers of GPUs as long as batch_size x GPUs stays the same; a run made with other settings is
moved aside to runs/<run>.superseded-<time>/, never deleted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

import torch.distributed as dist

from models.hub import SetupError
from tasks.core.stage import section_or_exit, setup_logging
from tasks.sdxl.data import NoSamples
from tasks.sdxl.full import FullTrainer
from tasks.sdxl.full_params import FullParams
from tasks.training.run import TrainError

log = logging.getLogger("niche.train_sdxl")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Fine-tune all of SDXL's UNet on the latents stage (train_sdxl).")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--stop-at", type=int, default=None, help="checkpoint after this step and stop")
    args = ap.parse_args(argv)
    setup_logging()
    p = section_or_exit(FullParams, FullParams.SECTION, args.params)
    try:
        result = FullTrainer(p).fit(stop_at=args.stop_at)
    except (SetupError, TrainError, NoSamples, FileNotFoundError) as e:
        sys.exit(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log.info("train_sdxl: done %s", json.dumps(result))


if __name__ == "__main__":
    main()

"""train_lora / train_wrong: SDXL LoRA with textual-inversion pivotal tuning, on the latents stage.

    python -m tasks.train_lora                          # params.yaml: train_lora (dvc.yaml runs this)
    python -m tasks.train_lora --section train_wrong    # the negative LoRA on the curator's rejects
    python -m tasks.train_lora --stop-at 300            # checkpoint at 300 and stop

A run lives in runs/<run>/: checkpoints/step-N/ (tasks/sdxl/checkpoint.py: every checkpoint
holds its own LoRA, in diffusers and kohya formats, and its own TI embeddings, so a sweep
pairs step N's LoRA with step N's tokens) and live/ (dvclive); metrics/<section>.json holds
the step and loss of the last log point (the stage's DVC metric). The loop is
tasks/sdxl/trainer.py.

Pivotal tuning: new tokens <s0><s1> stand for the trigger word (<s2><s3> for a second
abstraction, ...) in both text encoders;
their embeddings train (at text_encoder_lr) for the first ti_frac of the steps, then
freeze while the LoRA goes on. Frozen text encoders run once per distinct prompt (a
cache), not every step. Resume is exact (the seeded per-step generator, the data
position, the optimizer and the LoRA/TI tensors themselves); a run made with other
settings is moved aside to runs/<run>.superseded-<time>/, never deleted.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from models.hub import SetupError
from tasks.core.stage import section_or_exit, setup_logging
from tasks.core.store import atomic_write, atomic_write_json
from tasks.sdxl import data as lora_data
from tasks.sdxl.params import SECTIONS
from tasks.sdxl.trainer import LoraTrainer
from tasks.training.run import TrainError

log = logging.getLogger("niche.train_lora")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Train an SDXL LoRA with pivotal tuning on the latents stage.")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--section", default="train_lora", choices=sorted(SECTIONS))
    ap.add_argument("--stop-at", type=int, default=None, help="checkpoint after this step and stop")
    args = ap.parse_args(argv)
    setup_logging()
    p = section_or_exit(SECTIONS[args.section], args.section, args.params)
    try:
        result = LoraTrainer(p).fit(stop_at=args.stop_at)
    except lora_data.NoSamples as e:
        if p.split != "rejected":
            sys.exit(str(e))
        # No rejects is a dataset without a negative LoRA, not a failed pipeline: say so where the
        # checkpoints would be (DVC needs the output) and where a person looks.
        # A fresh file renamed into place: the note of an earlier run is a hardlink to DVC's cache
        # object (cache.type hardlink), and writing into it would change the cached version too.
        note = (f"{e}\nNo negative LoRA was trained. Put rejected images in data/raw/rejected/ "
                "(see README) and run `dvc repro train_wrong`.\n")
        atomic_write(Path("runs") / p.run / "checkpoints" / "NO_SAMPLES.txt",
                     lambda t: t.write_text(note, encoding="utf-8"))
        # The stage's metric too (DVC needs it): no step was taken, there is no loss.
        atomic_write_json(Path("metrics") / f"{args.section}.json", {"step": 0, "loss": None})
        log.warning("%s", e)
        return
    except (SetupError, TrainError, FileNotFoundError, ValueError) as e:
        sys.exit(str(e))
    log.info("%s: done %s", args.section, json.dumps(result))


if __name__ == "__main__":
    main()

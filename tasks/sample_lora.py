"""Images from SDXL LoRA checkpoints: one, or the checkpoint sweep grid (tasks/report/sweep_grid.py).

    python -m tasks.sample_lora sweep [--section train_lora] [--scenes "juggling" ...] [--seeds 0 1] [--out PNG]
    python -m tasks.sample_lora generate --checkpoint runs/sdxl/checkpoints/step-001900 \\
        (--scene "riding a bicycle" | --prompt "TOK, ...") [--seed 0] --out out.png

Each checkpoint goes through the SDXL trainer's sampler (tasks/sdxl/sampler.py): its
diffusers LoRA and its own TI embeddings loaded as a user loads them. Prompts come from the section's
`prompt_template` ("TOK, a figure {scene}, white background") and `negative_prompt`;
the trigger becomes the checkpoint's tokens. With `negative_lora` (a negative run's
folder) its newest LoRA is applied too and `wrong` joins the negative prompt (the third
seed's method). Sampling inverts the run's objective: the base model's Euler scheduler
for `ddpm`, a flow-match Euler schedule with `sample_shift` for `flow`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.hub import SetupError
from tasks.core.stage import section_or_exit, setup_logging
from tasks.report.sweep_grid import SweepError, sweep
from tasks.sdxl.params import SECTIONS, LoraParams
from tasks.sdxl.sampler import SDXLSampler, negative_for
from tasks.training.live import save_png


def _params(section: str, path: str) -> LoraParams:
    return section_or_exit(SECTIONS[section], section, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.sample_lora", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=("sweep", "generate"))
    ap.add_argument("--section", default="train_lora", choices=sorted(SECTIONS))
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--scenes", nargs="+", help="sweep: fill the prompt template (default: the section's sweep_scenes)")
    ap.add_argument("--seeds", nargs="+", type=int, help="sweep: default the section's sweep_seeds")
    ap.add_argument("--checkpoint", help="generate: a checkpoint folder")
    ap.add_argument("--scene", help="generate: fill the prompt template")
    ap.add_argument("--prompt", help="generate: the whole prompt instead")
    ap.add_argument("--negative", help="the negative prompt (default: the section's, + 'wrong' with a negative LoRA)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--out", help="the PNG (sweep default: runs/<run>/sweep.png)")
    args = ap.parse_args(argv)
    setup_logging()
    p = _params(args.section, args.params)
    negative = negative_for(p) if args.negative is None else args.negative
    try:
        sampler = SDXLSampler(p, device=args.device)
        if args.command == "sweep":
            prompts = [p.prompt_template.format(scene=s) for s in (args.scenes or p.sweep_scenes)]
            out = Path(args.out) if args.out else sampler.run_dir / "sweep.png"
            sweep(sampler, prompts, list(args.seeds or p.sweep_seeds), negative, out)
            print(out)
            return
        if not args.checkpoint or not (args.scene or args.prompt) or not args.out:
            raise SweepError("generate needs --checkpoint, --scene or --prompt, and --out")
        ckpt = Path(args.checkpoint)
        if not (ckpt / "meta.json").is_file():
            raise SweepError(f"--checkpoint {ckpt}: not a finished checkpoint (no meta.json)")
        prompt = args.prompt or p.prompt_template.format(scene=args.scene)
        save_png(Path(args.out), sampler.sample(ckpt, prompt, args.seed, negative))
        print(args.out)
    except SetupError as e:
        sys.exit(f"sample_lora: {e}")


if __name__ == "__main__":
    main()

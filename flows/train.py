"""Flow `train`: bring the dataset up to date, then a trainer's DVC stages.

    trainer=nanodit   the `train` stage (NanoDiT)
    trainer=sdxl      `latents`, the negative LoRA (`train_wrong`, on the curator's
                      rejects), then `train_lora` (LoRA + pivotal tuning), and the
                      checkpoint sweep grid of the LoRA run
    trainer=sdxl-full `latents`, then `train_sdxl` (the whole UNet, flow matching: bigASP
                      v2.5), and the sweep grid of its checkpoints (the flow-match Euler
                      sampler with train_sdxl.sample_shift). One process; for many GPUs run
                      `torchrun ... -m tasks.train_sdxl` (README: "Full fine-tune")

DVC decides, as everywhere: the dataset stages run only when stale, and train
only when its code, its params section or the shards changed. A stopped or
crashed training resumes from its newest checkpoint on the next run (the
stage's outputs persist; see tasks/train.py). The trainer's log lines reach the
task run; the final metrics are posted as a table artifact and the run's state
(newest checkpoint, sample grid) as a markdown artifact.

    python -m flows.train [--root .] [--skip-dataset] [--trainer nanodit|sdxl|sdxl-full]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows import dvc_stage
from flows.build_dataset import build_dataset


TRAINERS = {"nanodit": ("train",), "sdxl": ("latents", "train_wrong", "train_lora"),
            "sdxl-full": ("latents", "train_sdxl")}
RUN_DEFAULTS = {"train": "nanodit", "train_lora": "sdxl", "train_wrong": "sdxl-wrong", "train_sdxl": "sdxl-full"}


def run_dir(root: Path, section: str = "train") -> Path:
    doc = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    return root / "runs" / (doc.get(section) or {}).get("run", RUN_DEFAULTS[section])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def stage_task(root: str, stage: str) -> bool:
    """A stage that is not a training run (latents): through DVC, like the dataset's."""
    return dvc_stage.reproduce(stage, Path(root), get_run_logger())


@task(task_run_name="{stage}", cache_policy=NO_CACHE, persist_result=False)
def train_stage(root: str, stage: str = "train") -> dict:
    logger = get_run_logger()
    root_p = Path(root)
    ran = dvc_stage.reproduce(stage, root_p, logger)
    run = run_dir(root_p, stage)
    summary = run / "live" / "metrics.json"
    metrics = _flat(json.loads(summary.read_text())) if summary.is_file() else {}
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    grids = sorted((run / "samples").glob("step-*.png"))
    if not ran:
        logger.info("%s: up to date according to DVC; nothing to do", stage)
    key = stage.replace("_", "-")
    if metrics:
        create_table_artifact(key=f"{key}-metrics", table=[{"metric": k, "value": v} for k, v in metrics.items()],
                              description=f"`{stage}`: the latest logged values of {run.relative_to(root_p)}")
    ckpts = [c for c in ckpts if c.is_dir()]
    if stage == "train_sdxl" and ckpts:
        single = next(ckpts[-1].glob("*-step-*.safetensors"), None)
        use = (f"`StableDiffusionXLPipeline.from_pretrained(\"{ckpts[-1].relative_to(root_p)}\")` with the flow-match "
               f"Euler sampler, or `{single.relative_to(root_p) if single else '?'}` in ComfyUI (ModelSamplingSD3, "
               "shift 3 to 6)")
    elif stage != "train" and ckpts:
        use = (f"`python -m tasks.sample_lora generate --section {stage} --checkpoint "
               f"{ckpts[-1].relative_to(root_p)} --scene \"...\" --out out.png`")
    else:
        use = f"`python -m tasks.generate --checkpoint {run.relative_to(root_p)} --prompt \"...\" --out out.png`"
    create_markdown_artifact(
        key=f"{key}-run",
        markdown="\n".join([
            f"# {stage}: `{run.relative_to(root_p)}`",
            f"- ran this time: {'yes' if ran else 'no (fresh according to DVC)'}",
            f"- step: {metrics.get('step', '?')}, loss: {metrics.get('train/loss', '?')}",
            f"- newest checkpoint: `{ckpts[-1].relative_to(root_p) if ckpts else 'none'}`",
            f"- newest sample grid: `{grids[-1].relative_to(root_p) if grids else 'none'}`",
            "",
            f"Generate: {use}",
        ]),
        description="The training run's state after this flow run")
    return {"stage": stage, "ran": ran, "metrics": metrics,
            "checkpoint": str(ckpts[-1]) if ckpts else None}


@task(task_run_name="sweep-lora", cache_policy=NO_CACHE, persist_result=False)
def sweep_lora(root: str) -> str:
    """The LoRA run's checkpoints x the section's scenes x seeds, in one grid (tasks/report/sweep_grid.py)."""
    from tasks.report.sweep_grid import sweep
    from tasks.sdxl.sampler import SDXLSampler, negative_for
    from tasks.core.stage import section_or_exit
    from tasks.sdxl.params import LoraParams

    p = section_or_exit(LoraParams, "train_lora", str(Path(root) / "params.yaml"))
    sampler = SDXLSampler(p, root=Path(root))
    out = sampler.run_dir / "sweep.png"
    sweep(sampler, [p.prompt_template.format(scene=s) for s in p.sweep_scenes], list(p.sweep_seeds),
          negative_for(p), out)
    create_markdown_artifact(key="train-lora-sweep", description="Every checkpoint of the LoRA run, side by side",
                             markdown=f"# LoRA sweep\n`{out.relative_to(root)}`: rows are checkpoints, columns "
                                      f"scenes x seeds; negative prompt: `{negative_for(p)}`")
    return str(out)


@task(task_run_name="sweep-sdxl-full", cache_policy=NO_CACHE, persist_result=False)
def sweep_full(root: str) -> str:
    """The full fine-tune's checkpoints x its scenes x seeds, with the flow-match Euler sampler."""
    from tasks.core.stage import section_or_exit
    from tasks.report.sweep_grid import sweep
    from tasks.sdxl.full_params import FullParams
    from tasks.sdxl.sampler import FullSampler

    p = section_or_exit(FullParams, FullParams.SECTION, str(Path(root) / "params.yaml"))
    sampler = FullSampler(p, root=Path(root))
    out = sampler.run_dir / "sweep.png"
    sweep(sampler, [p.prompt_template.format(scene=s) for s in p.sweep_scenes], list(p.sweep_seeds),
          p.negative_prompt, out)
    create_markdown_artifact(key="train-sdxl-sweep", description="Every checkpoint of the full fine-tune, side by side",
                             markdown=f"# SDXL full fine-tune sweep\n`{out.relative_to(root)}`: rows are checkpoints, "
                                      f"columns scenes x seeds; flow-match Euler, shift {p.sample_shift}, "
                                      f"{p.sample_steps} steps, CFG {p.guidance_scale}")
    return str(out)


@flow(name="train", log_prints=True)
def train(root: str = ".", skip_dataset: bool = False, trainer: str = "nanodit") -> dict:
    """build-dataset (as a subflow, unless skipped) → the trainer's stages."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer: expected one of {', '.join(TRAINERS)}, got {trainer!r}")
    root = str(Path(root).resolve())
    if not skip_dataset:
        build_dataset(root=root)
    if trainer == "nanodit":
        return train_stage(root)
    if trainer == "sdxl-full":
        stage_task(root, "latents")
        result = train_stage(root, "train_sdxl")
        drawn = Path(result["checkpoint"] or ".").parent.parent / "sweep.png"
        sweep = sweep_full(root) if result["checkpoint"] and (result["ran"] or not drawn.is_file()) else None
        return {**result, "sweep": sweep}
    stage_task(root, "latents")
    wrong = train_stage(root, "train_wrong")
    result = train_stage(root, "train_lora")
    drawn = Path(result["checkpoint"] or ".").parent.parent / "sweep.png"
    # A fresh run keeps its grid; a new checkpoint (or no grid yet) draws it again.
    sweep = sweep_lora(root) if result["checkpoint"] and (result["ran"] or not drawn.is_file()) else None
    return {**result, "negative": wrong["checkpoint"], "sweep": sweep}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--skip-dataset", action="store_true", help="do not bring the dataset up to date first")
    ap.add_argument("--trainer", default="nanodit", choices=sorted(TRAINERS))
    args = ap.parse_args(argv)
    state = train(root=args.root, skip_dataset=args.skip_dataset, trainer=args.trainer, return_state=True)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()

"""validate: the prx-tg validation suite on one NanoDiT checkpoint (params.yaml: validate).

    python -m tasks.validate [--params params.yaml] [--checkpoint PATH|STEP] [--skip-validated] [--dvc-stage]

The checkpoint: validate.checkpoint (or --checkpoint) is `latest` (the newest finished
checkpoint of runs/<run>), a step number (runs/<run>/checkpoints/step-NNNNNN), or a path:
a checkpoint folder or a run folder (its newest) — of any run, e.g. a superseded one, to
back-test an old checkpoint with today's checks. Checkpoints and training state are only
read, never written.

The samples: the first `holdout` of the holdout split, in the loader's order for `seed`
(the train split, with a warning and a flag, when the shards have no holdout), at the
image scale the checkpoint trained at (or validate.image_scale). The checks
(tasks/report/suite.py): reconstruction, dino_swap, text_manipulation, cfg_divergence —
each image generated from the noise of seed + its index, with the EMA weights by default.

Written, each file atomically, beside the checkpoints of the run the checkpoint belongs to:
  <run>/validation/step-NNNNNN/metrics.json    statistics per check, every image's LPIPS
  <run>/validation/step-NNNNNN/<check>.png     side-by-side grid per check (thumbnails)
  <run>/validation/step-NNNNNN/images/<check>/<index>_<id>_<role>.png
                                               every image a check compares, full size
  <run>/validation/history.tsv                 one row per validated step (re-validating
                                               a step replaces its row)
  metrics/validate.json                        the DVC stage's metric, three narrow columns of
                                               `dvc metrics show`: step, lpips (the
                                               reconstruction mean), comparable
  metrics/validate.details.json                metrics.json without per-image values (`dvc
                                               metrics show metrics/validate.details.json`)
                                               Both only with --dvc-stage (dvc.yaml's cmd), for
                                               validate.run.
A back-test or any other run outside DVC never writes metrics/validate*.json: it would put
another step's numbers in the pipeline's metrics.
Alarms: the reconstruction mean rose by more than alarm_jump since the previous row.
Flags: a check worse than the run's best earlier step by more than regress_margin (for
text_manipulation and cfg_divergence a drop is worse). Only rows of the same LPIPS net and
comparability are compared (a history row without lpips_net, from before that column, is
compared with none). LPIPS with a random backbone (lpips_allow_random) is labelled "not
comparable" wherever its numbers appear, the alarms and flags included.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from models.flow_matching import GUIDANCE
from models.hub import SetupError
from tasks.core.params import as_dict
from tasks.core.stage import details_path
from tasks.core.store import atomic_write_json
from tasks.nanodit.sampler import (GenerateError, NanoDiTSampler, find_checkpoint, read_meta, resolve_device,
                                   trained_scale)
from tasks.report.history import history_row, judge, read_history, summarise, write_history
from tasks.report.suite import IMAGE_ROLES, LPIPS_MIN, TESTS, Sample
from tasks.training import checkpoints as train_state

log = logging.getLogger("niche.validate")
DVC_METRICS = Path("metrics/validate.json")


class ValidateError(SetupError):
    """Something the person running validate fixes: the command stops with the message alone."""


@dataclass(frozen=True)
class ValidateParams:
    run: str = "nanodit"                  # runs/<run>/
    checkpoint: str = "latest"            # latest | a step number | a checkpoint or run folder
    weights: Literal["ema", "model"] = "ema"
    holdout: int = 25                     # the first N samples of the holdout split
    seed: int = 42                        # the loader's order; image i's noise is seed + i
    steps: int = 30                       # Euler steps
    guidance: str = "cfg"                 # none | cfg | self | dual
    scale: float = 3.0
    image_scale: float | None = None      # None: the scale the checkpoint trained at
    text_edits: tuple[tuple[str, str], ...] = (("left", "right"), ("woman", "man"), ("black", "white"),
                                               ("standing", "sitting"), ("red", "blue"))
    lpips_net: str = "alex"               # alex | vgg | squeeze
    lpips_backbone: str | None = None     # torchvision's ImageNet checkpoint; None: its hub cache
    lpips_allow_random: bool = False      # tests only: a random backbone, numbers not comparable
    alarm_jump: float = 0.1               # reconstruction mean rise since the previous step
    regress_margin: float = 0.05          # worse than the run's best by more than this: a flag
    device: Literal["auto", "cpu", "cuda"] = "auto"
    shards: str = "data/shards"
    # The checkpoint sweep (tasks/sweep.py) the validate flow draws after each validation.
    sweep_prompts: tuple[str, ...] = ("a figure juggling three balls", "two figures dancing together")
    sweep_seeds: tuple[int, ...] = (0, 1)
    sweep_negative: str = ""
    sweep_seen: int = 1                   # training captions added to sweep_prompts: seen vs never seen

    def validate(self) -> None:
        for k in ("holdout", "steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"validate.{k}: expected >= 1, got {getattr(self, k)}")
        if self.seed < 0:
            raise ValueError(f"validate.seed: expected >= 0, got {self.seed}")
        if self.guidance not in GUIDANCE:
            raise ValueError(f"validate.guidance: expected one of {', '.join(GUIDANCE)}, got {self.guidance!r}")
        if self.lpips_net not in ("alex", "vgg", "squeeze"):
            raise ValueError(f"validate.lpips_net: expected alex, vgg or squeeze, got {self.lpips_net!r}")
        if self.image_scale is not None and not 0 < self.image_scale <= 1:
            raise ValueError(f"validate.image_scale: expected null or 0 < scale <= 1, got {self.image_scale}")
        for k in ("scale", "alarm_jump"):
            if getattr(self, k) <= 0:
                raise ValueError(f"validate.{k}: expected > 0, got {getattr(self, k)}")
        if self.sweep_seen < 0:
            raise ValueError(f"validate.sweep_seen: expected >= 0, got {self.sweep_seen}")
        if self.regress_margin < 0:
            raise ValueError(f"validate.regress_margin: expected >= 0, got {self.regress_margin}")
        for i, pair in enumerate(self.text_edits):
            if not all(w.strip() for w in pair) or pair[0].lower() == pair[1].lower():
                raise ValueError(f"validate.text_edits[{i}]: expected two different words, got {list(pair)}")
        if not self.checkpoint.strip():
            raise ValueError("validate.checkpoint: expected latest, a step number or a path")


# ---------------------------------------------------------------- inputs
def resolve_checkpoint(p: ValidateParams, root: Path, spec: str | Path | None = None) -> Path:
    spec = str(p.checkpoint if spec is None else spec)
    checkpoints = root / "runs" / p.run / "checkpoints"
    if spec == "latest":
        found = train_state.latest(checkpoints)
        if found is None:
            raise ValidateError(f"validate.checkpoint latest: no finished checkpoint in {checkpoints} "
                                "(train first, or name a checkpoint folder)")
        return found
    if spec.isdigit():
        folder = checkpoints / f"step-{int(spec):06d}"
        if not (folder / "meta.json").is_file():
            have = ", ".join(str(s) for s, _ in train_state.step_dirs(checkpoints)) or "none"
            raise ValidateError(f"validate.checkpoint {spec}: no {folder} (steps here: {have})")
        return folder
    path = Path(spec).expanduser()
    try:
        return find_checkpoint(path if path.is_absolute() else root / path)
    except GenerateError as e:
        raise ValidateError(f"validate.checkpoint: {str(e).removeprefix('--checkpoint ')}") from None


def run_dir_of(ckpt: Path) -> Path:
    """The run a checkpoint belongs to (runs/<run>/checkpoints/step-N → runs/<run>)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_samples(p: ValidateParams, root: Path) -> tuple[list[Sample], str]:
    from tasks.data.loader import ShardLoader

    shards = p.shards if "://" in p.shards else str(root / p.shards)
    problem = None
    for split in ("holdout", "train"):
        try:
            found = []
            with ShardLoader(shards, split=split, batch_size=1, seed=p.seed, num_workers=0,
                             shuffle_buffer=0, on_error="skip") as loader:
                for batch in loader:
                    found.append(Sample(batch["ids"][0], batch["captions"][0], batch["bucket"], batch))
                    if len(found) == p.holdout:
                        break
        except ValueError as e:  # no shards.parquet, or no such split
            problem = e
            continue
        if found:
            if split != "holdout":
                log.warning("validate: no holdout samples (%s); validating on the first %d TRAIN samples, "
                            "which the model has seen", problem or "none readable", len(found))
            return found, split
    raise ValidateError(f"validate.shards {p.shards}: no readable samples ({problem})")


def open_lpips(p: ValidateParams, root: Path, device: str):
    from models.lpips_metric import LPIPSMetric

    backbone = p.lpips_backbone
    if backbone is not None and not Path(backbone).expanduser().is_absolute() and (root / backbone).exists():
        backbone = str(root / backbone)
    metric = LPIPSMetric(net=p.lpips_net, backbone=backbone, allow_random=p.lpips_allow_random, device=device)
    label = metric.label if metric.comparable or "not comparable" in metric.label \
        else f"{metric.label} (not comparable)"
    return metric, {"net": p.lpips_net, "label": label, "comparable": bool(metric.comparable)}


# ---------------------------------------------------------------- the run
def validate(p: ValidateParams, root: Path = Path("."), checkpoint: str | Path | None = None,
             skip_validated: bool = False, dvc_stage: bool = False) -> dict:
    """Validate one checkpoint; returns the metrics (see the module doc). dvc_stage: this is the
    DVC stage (validate.checkpoint, no other checkpoint): also write metrics/validate.json and
    metrics/validate.details.json."""
    from tasks.report.suite import Suite
    from tasks.training.live import grid, save_png

    t0, root = time.perf_counter(), Path(root)
    if dvc_stage and checkpoint is not None:
        raise ValidateError(f"--checkpoint {checkpoint} with --dvc-stage: the DVC stage validates "
                            "validate.checkpoint; another checkpoint is a back-test, run without --dvc-stage")
    ckpt = resolve_checkpoint(p, root, checkpoint)
    meta = read_meta(ckpt)
    if "step" not in meta:
        raise ValidateError(f"{ckpt / 'meta.json'}: no step")
    step, run_dir = int(meta["step"]), run_dir_of(ckpt)
    out_dir, history_file = run_dir / "validation" / f"step-{step:06d}", run_dir / "validation" / "history.tsv"
    history = read_history(history_file)
    if skip_validated and any(r["step"] == step for r in history):
        log.info("validate: step %d of %s is in %s already; nothing to do", step, run_dir, history_file)
        done = out_dir / "metrics.json"
        doc = json.loads(done.read_text(encoding="utf-8")) if done.is_file() else {"step": step}
        return {**doc, "already_validated": True}

    try:
        device = resolve_device(p.device)
    except GenerateError as e:
        raise ValidateError(f"validate.device: {e}") from None
    lpips, lpips_info = open_lpips(p, root, device)  # before anything slow: missing weights stop here
    (log.info if lpips_info["comparable"] else log.warning)("validate: distances are %s", lpips_info["label"])
    weights_dir = ckpt / p.weights
    if not (weights_dir / "config.json").is_file():
        raise ValidateError(f"validate.weights {p.weights}: {ckpt} has no {p.weights}/config.json")
    samples, split = load_samples(p, root)
    bf16 = device == "cuda" and (meta.get("params") or {}).get("precision", "auto") != "fp32"
    sampler = NanoDiTSampler(weights=p.weights, device=device, bf16=bf16)
    meta, model = sampler.load(ckpt)
    first = samples[0].batch
    for name, key, have in (("text_dim", "t5", first["t5"].shape[-1]), ("dino_dim", "dino_cls",
                                                                         first["dino_cls"].shape[-1])):
        if have != getattr(model.config, name):
            raise ValidateError(f"validate.shards {p.shards}: {key} is {have} wide but {ckpt} expects {name} "
                                f"{getattr(model.config, name)}: not the data this checkpoint was trained on")

    scale = p.image_scale if p.image_scale is not None else trained_scale(meta)
    sampling = meta.get("sampling") or {}
    settings = dict(steps=p.steps, guidance=p.guidance, scale=p.scale,
                    scale_dino=float(sampling.get("scale_dino", 1.5)), route=float(sampling.get("route", 0.5)),
                    shift=float(sampling.get("shift", 1.0)))
    log.info("validate: %s (step %d, %s weights) on %s; %d %s samples at scale %g; %s", ckpt, step, p.weights,
             device, len(samples), split, scale, ", ".join(f"{k} {v}" for k, v in settings.items()))
    suite = Suite(sampler, model, lpips, samples, scale=scale, sampling=settings, seed=p.seed,
                  encode=lambda text: sampler.encode(meta, ckpt, text), edits=p.text_edits,
                  images_dir=out_dir / "images")
    results = suite.run()
    # An earlier validation of this step on other samples leaves no image of them behind.
    for old in sorted((out_dir / "images").glob("*/*.png")):
        if old not in suite.written:
            old.unlink()

    tests = summarise(results)
    row = history_row(step, tests, lpips_info["comparable"], p.lpips_net)
    alarms, flags = judge(row, [r for r in history if r["step"] != step], p)
    if split != "holdout":
        flags.insert(0, f"split: no holdout samples in {p.shards}; validated on {len(samples)} TRAIN samples "
                        "(seen in training: reconstruction looks better than it is)")
    for msg in alarms + flags:
        log.warning("validate: %s", msg)
    if suite.upscaled > 1:
        lpips_info["upscaled"] = suite.upscaled
        log.info("validate: images under %d px a side were enlarged %dx (nearest) for LPIPS", LPIPS_MIN,
                 suite.upscaled)

    own = dvc_stage and run_dir.resolve() == (root / "runs" / p.run).resolve()
    try:
        shown_ckpt = str(ckpt.resolve().relative_to(root.resolve()))
    except ValueError:
        shown_ckpt = str(ckpt.resolve())
    doc = {"run": run_dir.name, "checkpoint": shown_ckpt, "step": step, "weights": p.weights, "split": split,
           "samples": len(samples), "seed": p.seed, "image_scale": scale, "sampling": settings,
           "text_edits": as_dict(p)["text_edits"], "lpips": lpips_info, "tests": tests, "alarms": alarms,
           "flags": flags, "seconds": round(time.perf_counter() - t0, 3),
           "images": {"files": "images/<check>/<index>_<id>_<role>.png",
                      "roles": {k: list(v) for k, v in IMAGE_ROLES.items()}}}
    for name, r in results.items():
        if r.rows:
            save_png(out_dir / f"{name}.png", grid(r.rows))
        else:  # nothing to show (every sample skipped): no grid left from an earlier validation either
            (out_dir / f"{name}.png").unlink(missing_ok=True)
    atomic_write_json(out_dir / "metrics.json", doc)
    write_history(history_file, [r for r in history if r["step"] != step] + [row])
    if own:
        summary = dict(doc, tests={k: {f: v for f, v in t.items() if not f.startswith("per_image")}
                                   for k, t in tests.items()})
        del summary["images"]  # where the step's files are: nothing for the DVC metrics
        # The metric is three columns of `dvc metrics show`, beside every stage's counts; the whole
        # summary (each check's statistics, LPIPS net, sampling, alarms, flags) goes beside it.
        atomic_write_json(details_path(root / DVC_METRICS), summary)
        atomic_write_json(root / DVC_METRICS, {"step": step, "lpips": tests.get("reconstruction", {}).get("mean"),
                                               "comparable": bool(lpips_info["comparable"])})
    elif dvc_stage:
        log.info("validate: %s is not runs/%s: %s left as it is", run_dir, p.run, DVC_METRICS)
    else:  # a back-test or the nightly outside DVC: the pipeline's metrics stay its own
        log.info("validate: not the DVC stage (--dvc-stage): %s left as it is", DVC_METRICS)
    note = "" if lpips_info["comparable"] else f" [{lpips_info['label']}]"
    for name in TESTS:
        t = tests[name]
        if t["n"]:
            log.info("validate: %s LPIPS mean %.4f (p10 %.4f, p90 %.4f) over %d image(s), %d skipped%s", name,
                     t["mean"], t["p10"], t["p90"], t["n"], t["skipped"], note)
        else:
            log.warning("validate: %s: no image to compare (%d skipped)", name, t["skipped"])
    log.info("validate: wrote %s and %s (%.1f s)", out_dir, history_file, doc["seconds"])
    return {**doc, "already_validated": False}


def main(argv: list[str] | None = None) -> None:
    from tasks.core.stage import section_or_exit, setup_logging

    ap = argparse.ArgumentParser(prog="python -m tasks.validate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--checkpoint", help="latest, a step number, or a checkpoint / run folder "
                    "(default: validate.checkpoint)")
    ap.add_argument("--skip-validated", action="store_true", help="do nothing when history.tsv has the step")
    ap.add_argument("--dvc-stage", action="store_true", help="run as dvc.yaml's validate stage: also write "
                    f"{DVC_METRICS} (the stage's metric); never with --checkpoint")
    args = ap.parse_args(argv)
    setup_logging()
    p = section_or_exit(ValidateParams, "validate", args.params)
    try:
        result = validate(p, checkpoint=args.checkpoint, skip_validated=args.skip_validated,
                          dvc_stage=args.dvc_stage)
    except SetupError as e:
        sys.exit(f"validate: {e}")
    if not result["already_validated"]:
        log.info("validate: step %d: %d alarm(s), %d flag(s)", result["step"], len(result["alarms"]),
                 len(result["flags"]))
        if not args.dvc_stage and result["run"] == p.run:
            # The flows record this themselves (flows/dvc_stage.record_outputs); a plain command says how.
            log.info("validate: runs/%s/validation changed outside DVC: `dvc commit validate` records it "
                     "(or the next `dvc repro`)", p.run)


if __name__ == "__main__":
    main()

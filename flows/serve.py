"""Serve the deployments: this process creates them on the server and executes
their runs until stopped.

    python -m flows.serve [--nightly-cron "0 2 * * *"]   # or `make serve` / `make demo` (background, 127.0.0.1)

Deployments: build-dataset/local, train/local, train/sdxl, train/sdxl-full, validate/local,
validate-nightly/local (on the cron; $NICHE_NIGHTLY_CRON or --nightly-cron, default 02:00
every day, the server's time zone UTC) and generate-candidates/local. Then e.g.
`prefect deployment run validate/local`. Stopping it (SIGINT) pauses its deployments, as Prefect's `serve` does.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.build_dataset import build_dataset
from flows.generate_candidates import generate_candidates
from flows.train import train
from flows.validate import validate, validate_nightly

NIGHTLY_CRON = "0 2 * * *"


def deployments(root: Path, nightly_cron: str = NIGHTLY_CRON) -> list[RunnerDeployment]:
    """Every deployment of this repo."""
    root = root.resolve()
    return [
        build_dataset.to_deployment(
            name="local",
            parameters={"root": str(root)},
            description=f"Build the dataset of {root} on this machine (tiny profile defaults).",
            tags=["niche", "local"],
        ),
        train.to_deployment(
            name="local",
            parameters={"root": str(root)},
            description=f"Bring the dataset of {root} up to date, then train NanoDiT (resumes a stopped run).",
            tags=["niche", "local"],
        ),
        train.to_deployment(
            name="sdxl",
            parameters={"root": str(root), "trainer": "sdxl"},
            description=f"Bring the dataset of {root} up to date, then the SDXL latents, the negative LoRA on "
                        "the rejects and the LoRA with pivotal tuning (resumes a stopped run); then the sweep.",
            tags=["niche", "local", "sdxl"],
        ),
        train.to_deployment(
            name="sdxl-full",
            parameters={"root": str(root), "trainer": "sdxl-full"},
            description=f"Bring the dataset of {root} up to date, then the SDXL latents and the full fine-tune "
                        "with flow matching (train_sdxl, one process; resumes a stopped run); then the sweep.",
            tags=["niche", "local", "sdxl"],
        ),
        validate.to_deployment(
            name="local",
            parameters={"root": str(root)},
            description="Validate the newest checkpoint (the validate DVC stage), or the `checkpoint` given "
                        "(a path or a step: back-testing); then the sweep and the HTML report.",
            tags=["niche", "local"],
        ),
        validate_nightly.to_deployment(
            name="local",
            parameters={"root": str(root)},
            cron=nightly_cron,
            description="Every night: validate the active run's newest checkpoint unless already validated.",
            tags=["niche", "local", "nightly"],
        ),
        generate_candidates.to_deployment(
            name="local",
            parameters={"root": str(root)},
            description="The front of the loop: words -> prompts (expand) -> candidates with the generator's "
                        "newest checkpoint (pinned in params.yaml); then `make curate` to keep or reject them.",
            tags=["niche", "local", "curate"],
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nightly-cron", default=os.environ.get("NICHE_NIGHTLY_CRON") or NIGHTLY_CRON,
                    help="cron of validate-nightly/local (default: $NICHE_NIGHTLY_CRON or %(default)s)")
    args = ap.parse_args(argv)
    serve(*deployments(Path.cwd(), args.nightly_cron))


if __name__ == "__main__":
    main()

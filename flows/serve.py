"""Serve the deployments: this process executes their runs until stopped.

    python -m flows.serve          # or `make serve` (background, 127.0.0.1)

Then `prefect deployment run build-dataset/local` or `train/local`. Stopping it (SIGINT)
pauses its deployments, as Prefect's `serve` does.
"""
from __future__ import annotations

from pathlib import Path

from prefect import serve
from prefect.deployments.runner import RunnerDeployment

from flows.build_dataset import build_dataset
from flows.train import train


def deployments(root: Path) -> list[RunnerDeployment]:
    """Every deployment of this repo. Later flows (train, validate, the nightly
    validation) add theirs here."""
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
    ]


def main() -> None:
    serve(*deployments(Path.cwd()))


if __name__ == "__main__":
    main()

"""Flow `generate-candidates`: the front of the loop. Words become image prompts (`expand`),
prompts x seeds become candidates (`candidates`), each a DVC stage run only when DVC says it
is stale; then the hit rate of every decision so far. Curate them with `make curate`.

    python -m flows.generate_candidates [--root .] [--checkpoint newest|PATH|keep]
    prefect deployment run generate-candidates/local [-p checkpoint=newest]

With a LoRA or NanoDiT generator (candidates.generator), `newest` means the newest checkpoint
now. DVC cannot depend on "the newest of a folder", so the flow pins it: it writes the
checkpoint it found into params.yaml's candidates.checkpoint (that line only, comments kept,
as `dvc exp run -S` would) and logs the change. params.yaml and dvc.lock then say exactly
which checkpoint drew the candidates, the next run after training renders the new
checkpoint's candidates (and only those: earlier renders stay in the store), and a run with
no new checkpoint finds nothing to do. `keep` leaves candidates.checkpoint as it is.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.build_dataset import run_stage
from tasks.candidates import CandidatesParams, resolve_checkpoint
from tasks.core.params import load_section
from tasks.curate.library import write_stats
from tasks.profile import set_values

STAGES = ("expand", "candidates")
KEEP = "keep"


@task(task_run_name="pin-checkpoint", cache_policy=NO_CACHE, persist_result=False)
def pin_checkpoint(root: str, checkpoint: str) -> str:
    """candidates.checkpoint := the folder `checkpoint` means now; returns what it holds."""
    logger = get_run_logger()
    params = Path(root) / "params.yaml"
    p = load_section(CandidatesParams, "candidates", params)
    if checkpoint == KEEP or p.generator == "sdxl":
        logger.info("candidates.checkpoint stays %s (generator %s)", p.checkpoint, p.generator)
        return p.checkpoint
    value, folder = resolve_checkpoint(replace(p, checkpoint=checkpoint), Path(root), params)
    text, changes = set_values(params.read_text(encoding="utf-8"), {"candidates": {"checkpoint": value}})
    if changes:
        params.write_text(text, encoding="utf-8")
        logger.info("params.yaml: %s (%s %s)", "; ".join(changes), p.generator, folder)
    else:
        logger.info("candidates.checkpoint is already %s, the newest", value)
    return value


@task(task_run_name="hit-rate", cache_policy=NO_CACHE, persist_result=False)
def hit_rate(root: str) -> dict:
    stats = write_stats(Path(root))
    rows = [{"by": dim, "name": name, "kept": c["kept"], "seen": c["seen"], "undecided": c["undecided"],
             "hit_rate": c["hit_rate"]} for dim in ("generator", "template") for name, c in stats[dim].items()]
    if rows:
        create_table_artifact(key="curate-hit-rate", table=rows,
                              description="Kept / seen (kept + rejected) per generator and per prompt template: "
                                          "which template wastes the curator's time")
    return stats


@flow(name="generate-candidates", log_prints=True)
def generate_candidates(root: str = ".", checkpoint: str = "newest") -> dict:
    """expand → candidates (each through DVC), with the generator's checkpoint pinned; the hit rate."""
    root = str(Path(root).resolve())
    pinned = pin_checkpoint(root, checkpoint)
    results = [run_stage(stage, root) for stage in STAGES]
    stats = hit_rate(root)
    o = stats["overall"]
    create_markdown_artifact(
        key="generate-candidates-summary",
        markdown="\n".join([
            "# generate-candidates", f"Repository: `{root}`; checkpoint: `{pinned}`", "",
            "| stage | ran | computed | reused | failed |", "|---|---|---|---|---|",
            *(f"| {r['stage']} | {'yes' if r['ran'] else 'no (fresh)'} | {r.get('metrics', {}).get('computed', '')} "
              f"| {r.get('metrics', {}).get('reused', '')} | {r.get('metrics', {}).get('failed', '')} |"
              for r in results),
            "", f"Curated so far: {o['kept']} kept of {o['seen']} seen"
            + (f" ({o['hit_rate']:.0%})" if o["hit_rate"] is not None else "") + f", {o['undecided']} undecided.",
            "Curate: `make curate` (http://127.0.0.1:8765/).",
        ]),
        description="What this run of generate-candidates did",
    )
    get_run_logger().info("candidates ready: curate them with `make curate` (python -m tasks.curate)")
    return {"checkpoint": pinned, "stages": results, "hit_rate": o}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=".")
    ap.add_argument("--checkpoint", default="newest",
                    help="lora / nanodit: newest (pin the newest checkpoint), a checkpoint folder, or keep")
    args = ap.parse_args(argv)
    state = generate_candidates(root=args.root, checkpoint=args.checkpoint, return_state=True)
    sys.exit(0 if state.is_completed() else 1)


if __name__ == "__main__":
    main()

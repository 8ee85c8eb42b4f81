"""What a build-dataset run produced and where, printed for a person."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from flows.dvc_stage import DATASET_STAGES as STAGES, stage_metrics
from tasks.core import manifest


def print_report(root: Path, state=None) -> None:
    root = root.resolve()
    con = Console()
    mdir = root / manifest.MANIFEST_DIR
    counts = Table(title="Stages (metrics/<stage>.json)", title_justify="left")
    for col in ("stage", "items", "computed", "reused", "failed", "seconds"):
        counts.add_column(col, justify="right" if col != "stage" else "left")
    for stage in STAGES:
        path = root / "metrics" / f"{stage}.json"
        if path.is_file():
            m = json.loads(path.read_text())
            counts.add_row(stage, *(str(m.get(k, "")) for k in ("total", "computed", "reused", "failed", "seconds")))
    con.print(counts)
    con.print("The rest of a stage's figures: `dvc metrics show metrics/<stage>.details.json`")

    ingest = mdir / "ingest.parquet"
    if ingest.is_file():
        rows = pq.read_table(ingest).to_pylist()
        split = {s: sum(r["split"] == s for r in rows) for s in ("train", "holdout", "rejected")}
        con.print(f"[bold]{len(rows)} samples[/] ({split['train']} train, {split['holdout']} holdout, "
                  f"{split['rejected']} rejected) → {ingest.relative_to(root)}")
    bucket = mdir / "bucket.parquet"
    if bucket.is_file():
        rows = pq.read_table(bucket).to_pylist()
        per: dict[str, int] = {}
        for r in rows:
            per[r["bucket"]] = per.get(r["bucket"], 0) + (r["error"] is None)
        con.print("buckets: " + ", ".join(f"{b}: {n}" for b, n in sorted(per.items())) +
                  f" → images in data/derived/bucket/, index {bucket.relative_to(root)}")
    _conditioning(con, root, mdir)
    quarantine = mdir / "quarantine.parquet"
    if quarantine.is_file():
        rows = pq.read_table(quarantine).to_pylist()
        q = Table(title=f"Quarantined: {len(rows)} files, left in place "
                        f"({quarantine.relative_to(root)})", title_justify="left")
        q.add_column("file", overflow="fold")
        q.add_column("reason")
        q.add_column("detail", overflow="fold")
        for r in rows:
            q.add_row(r["path"], r["reason"], r["detail"])
        con.print(q)
    if state is not None:
        from prefect.settings import PREFECT_UI_URL

        run_id = state.state_details.flow_run_id
        ui = PREFECT_UI_URL.value()
        con.print(f"Prefect run: {state.name}" + (f" — {ui}/runs/flow-run/{run_id}" if ui else ""))
    con.print("Next: `dvc status` (clean), `dvc repro` (does nothing), `make train`, "
              "`make serve` then `prefect deployment run build-dataset/local`; `make stop` stops the server.")


def _rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist() if path.is_file() else []


def _conditioning(con: Console, root: Path, mdir: Path) -> None:
    """One line per conditioning stage: what was made, an example, where it is."""
    captions = _rows(mdir / "caption.parquet")
    if captions:
        ok = [r for r in captions if r["error"] is None]
        flagged = sum(bool(r["flags"]) for r in ok)
        example = ok[0]["text"][:90] if ok else ""
        con.print(f"captions: {len(ok)} of {len(captions)} ({len(set(r['text'] for r in ok))} distinct, "
                  f"{flagged} flagged), e.g. {example!r} → data/manifest/caption.parquet")
    text = _rows(mdir / "embed_text.parquet")
    if text:
        lengths = [r["length"] for r in text if r["error"] is None]
        if lengths:
            con.print(f"T5: {len(lengths)} captions, {min(lengths)}–{max(lengths)} tokens "
                      f"(trimmed, fp16) → data/derived/embed_text/")
    image = _rows(mdir / "embed_image.parquet")
    if image:
        grids = sorted({f"{r['grid_h']}x{r['grid_w']}" for r in image if r["error"] is None})
        con.print(f"DINOv3: {sum(r['error'] is None for r in image)} images, CLS + patch grids "
                  f"{', '.join(grids)} → data/derived/embed_image/")
    pose = _rows(mdir / "embed_pose.parquet")
    if pose:
        found = sum((r["n_people"] or 0) > 0 for r in pose)
        con.print(f"DWPose: a person in {found} of {len(pose)} images, 133 keypoints each "
                  f"→ data/derived/embed_pose/")
    m = stage_metrics("shard", root)
    if "shards" in m:
        con.print(f"shards: {m['samples']} samples in {m['shards']['total']} WebDataset tars "
                  f"({m['shards']['written']} written, {m['shards']['unchanged']} unchanged), "
                  f"{m['total_1mp_mb']:.2f} MB per sample at 1 MP (prx-tg format: {m['prx_tg_1mp_mb']:.2f} MB) "
                  "→ data/shards/, index data/shards/index.parquet")
    params = root / "params.yaml"
    if params.is_file() and "models/tiny/" in params.read_text():
        con.print("[yellow]tiny profile: these models have RANDOM weights — the captions and embeddings "
                  "test the plumbing, they mean nothing. `python -m tasks.profile real` for the real ones.[/]")

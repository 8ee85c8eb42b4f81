"""What a build-dataset run produced and where, printed for a person."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from flows.build_dataset import STAGES
from tasks import manifest


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

    ingest = mdir / "ingest.parquet"
    if ingest.is_file():
        rows = pq.read_table(ingest).to_pylist()
        holdout = sum(r["split"] == "holdout" for r in rows)
        con.print(f"[bold]{len(rows)} samples[/] ({len(rows) - holdout} train, {holdout} holdout) "
                  f"→ {ingest.relative_to(root)}")
    bucket = mdir / "bucket.parquet"
    if bucket.is_file():
        rows = pq.read_table(bucket).to_pylist()
        per: dict[str, int] = {}
        for r in rows:
            per[r["bucket"]] = per.get(r["bucket"], 0) + (r["error"] is None)
        con.print("buckets: " + ", ".join(f"{b}: {n}" for b, n in sorted(per.items())) +
                  f" → images in data/derived/bucket/, index {bucket.relative_to(root)}")
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
    con.print("Next: `dvc status` (clean), `dvc repro` (does nothing), "
              "`make serve` then `prefect deployment run build-dataset/local`; `make stop` stops the server.")

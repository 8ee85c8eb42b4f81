"""The loop closes, through the real front doors: the generate-candidates flow on a real
Prefect server renders candidates with DVC keeping the record, a person curates them, the
LoRA trains on the dataset the kept ones joined, and the flow renders the new checkpoint's
candidates (pinned in params.yaml) to curate again."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.profile import set_values
from tests.conftest import BIN, run

pytestmark = pytest.mark.slow


def dvc(root: Path, *args: str) -> str:
    return run([str(BIN / "dvc"), *args], root).stdout


def ran(result: dict) -> dict[str, int]:
    return {r["stage"]: r["metrics"]["computed"] for r in result["stages"] if r["ran"]}


def set_params(root: Path, values: dict) -> list[str]:
    path = root / "params.yaml"
    text, changes = set_values(path.read_text(encoding="utf-8"), values)
    path.write_text(text, encoding="utf-8")
    return changes


def test_curate_train_generate_with_the_new_checkpoint_curate_again(tiny_repo, prefect_server):
    from flows.generate_candidates import generate_candidates
    from tasks.curate.server import Curation

    root = tiny_repo
    # The scaffold ships the words file with comments only; the user adds an idea.
    words = root / "data/prompts/words.txt"
    assert words.is_file()
    words.write_text(words.read_text(encoding="utf-8") + "joy\n", encoding="utf-8")
    set_params(root, {"candidates": {"seeds": [0]}, "train_lora": {"steps": 4, "checkpoint_every": 2}})

    first = generate_candidates(root=str(root))
    assert ran(first) == {"expand": 2, "candidates": 2}  # 1 word x 2 variations x 1 template x 1 seed
    assert first["checkpoint"] == "newest"  # the base model: nothing to pin
    assert "up to date" in dvc(root, "status", "candidates")
    assert ran(generate_candidates(root=str(root))) == {}  # DVC: nothing stale, nothing run

    cur = Curation(root, "curated")
    cur.start()
    cands = cur.items("candidates")
    assert len(cands) == 2 and {c["generator"] for c in cands} == {"sdxl"}
    assert cur.decide({"item": cands[0]["item"], "action": "keep"})["error"] is None
    assert cur.decide({"item": cands[1]["item"], "action": "reject"})["error"] is None
    kept = cur.log.state()[cands[0]["item"]]
    kept_path = f"data/raw/curated/{kept.info['name']}.png"

    # Train on the dataset the kept candidate joined (and the negative LoRA on the reject).
    out = dvc(root, "repro", "train_lora")
    assert re.search(r"Running stage 'train_lora'", out)
    ingest = {r["path"]: r for r in pq.read_table(root / "data/manifest/ingest.parquet").to_pylist()}
    assert ingest[kept_path]["split"] in ("train", "holdout")
    assert ingest[kept_path]["caption"] == cands[0]["prompt"]
    assert "rejected" == next(r["split"] for p, r in ingest.items() if p.startswith("data/raw/rejected/joy-"))

    # Candidates from the new checkpoint: newest is pinned in params.yaml, its line only.
    before = (root / "params.yaml").read_text(encoding="utf-8").splitlines()
    set_params(root, {"candidates": {"generator": "lora"}})
    second = generate_candidates(root=str(root))
    assert second["checkpoint"] == "runs/sdxl/checkpoints/step-000004"
    after = (root / "params.yaml").read_text(encoding="utf-8").splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert [b.split("#")[0].strip() for _, b in changed] == [
        "generator: lora", "checkpoint: runs/sdxl/checkpoints/step-000004"]
    assert ran(second) == {"candidates": 2}  # the same prompts, a new checkpoint: new images only
    assert "up to date" in dvc(root, "status", "candidates")

    cur.index.clear()
    again = cur.items("candidates")
    assert {c["generator"] for c in again} == {"lora"} and all(c["status"] == "new" for c in again)
    stats = cur.stats()
    assert stats["generator"]["sdxl"]["hit_rate"] == 0.5
    assert stats["generator"]["lora"]["undecided"] == 2
    metric = json.loads((root / "metrics/curate.json").read_text())
    assert metric["kept"] == 1 and metric["seen"] == 2
    cur.log.close()

"""Invalidation users can trust: `dvc repro` after one change recomputes only what
that change touches — checked by the stages DVC runs and the items each computes."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import BIN, _copy_repo, run

pytestmark = pytest.mark.slow
EMBEDS = ("caption", "embed_text", "embed_image", "embed_pose", "shard")


def repro(root: Path) -> dict[str, int]:
    """Run `dvc repro shard` (the dataset); {stage that ran: items it computed}."""
    out = run([str(BIN / "dvc"), "repro", "shard"], root).stdout
    ran = re.findall(r"Running stage '(\w+)'", out)
    return {s: json.loads((root / "metrics" / f"{s}.json").read_text())["computed"] for s in ran}


def shards_written(root: Path) -> int:
    return json.loads((root / "metrics/shard.details.json").read_text())["shards"]["written"]


def set_params(root: Path, **sections) -> None:
    path = root / "params.yaml"
    doc = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        doc[section].update(values)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


@pytest.fixture(scope="module")
def built_once(tiny_sample_repo, tmp_path_factory):
    """A tiny-profile repo after a first full `dvc repro`, captions from sidecar files: built once
    for the module (the first repro is most of each test's time), copied for each test."""
    root = _copy_repo(tiny_sample_repo, tmp_path_factory.mktemp("built") / "repo")
    set_params(root, caption={"backend": "sidecar"})
    first = repro(root)
    assert set(EMBEDS) <= set(first), first
    return root


@pytest.fixture
def built(built_once, tmp_path):
    root = _copy_repo(built_once, tmp_path / "repo")
    # The copy is the same repo: DVC finds nothing to do before the test changes something.
    assert "up to date" in run([str(BIN / "dvc"), "status", "--with-deps", "shard"], root).stdout
    return root


def test_editing_one_caption_file_recomputes_that_caption_and_its_t5_only(built):
    txt = sorted((built / "data/raw/figures").glob("*.txt"))[0]
    txt.write_text("a figure standing on one leg, arms spread wide\n")
    ran = repro(built)
    assert ran.get("caption") == 1 and ran.get("embed_text") == 1, ran
    assert "embed_image" not in ran and "embed_pose" not in ran, ran
    assert ran.get("bucket", 0) == 0  # bucket may re-run (ingest table changed) but computes nothing
    # One sample changed: one shard is rewritten, the others keep their bytes.
    assert shards_written(built) == 1


def test_the_curation_page_s_caption_fix_and_reject_recompute_only_what_they_touch(built):
    """The loop's way in: a caption fixed in place on the page is one caption and one T5 item;
    an image rejected later leaves the training shards and trains the negative LoRA only."""
    from tasks.curate.server import Curation

    cur = Curation(built)
    cur.start()
    figures = [r for r in cur.items("dataset") if r["path"].startswith("data/raw/figures/") and r["caption"]]
    out = cur.decide({"item": figures[0]["item"], "action": "caption", "caption": "a figure on one leg, arms wide"})
    assert out["error"] is None
    ran = repro(built)
    assert ran.get("caption") == 1 and ran.get("embed_text") == 1, ran
    assert "embed_image" not in ran and "embed_pose" not in ran, ran

    out = cur.decide({"item": figures[1]["item"], "action": "reject"})
    assert out["error"] is None and out["update"]["path"].startswith("data/raw/rejected/figures/")
    cur.log.close()
    ran = repro(built)
    # Same bytes, so every stage's item is reused; the sample only changes split.
    assert ran.get("ingest") == 0 and ran.get("bucket", 0) == 0 and ran.get("caption", 0) == 0, ran
    ingest = pq.read_table(built / "data/manifest/ingest.parquet").to_pylist()
    moved = next(r for r in ingest if r["path"] == out["update"]["path"])
    assert moved["split"] == "rejected"


def test_changing_the_t5_model_recomputes_all_t5_and_nothing_else(built):
    shutil.copytree(built / "models/tiny/t5", built / "models/tiny/t5-other")
    set_params(built, embed_text={"model": "models/tiny/t5-other"})
    total = json.loads((built / "metrics/embed_text.json").read_text())["total"]
    failed = json.loads((built / "metrics/embed_text.json").read_text())["failed"]
    ran = repro(built)
    assert ran.pop("shard") > 0  # every sample's T5 changed
    assert ran == {"embed_text": total - failed}, ran


def test_changing_a_caption_parameter_recomputes_captions_and_t5_only(built):
    set_params(built, caption={"backend": "transformers"})
    ran = repro(built)
    captions = json.loads((built / "metrics/caption.json").read_text())
    assert set(ran) == {"caption", "embed_text", "shard"}, ran
    assert ran["caption"] == captions["total"] - captions["failed"] > 0
    # The trigger word is applied to stored captions: nothing is regenerated,
    # but every text changes, so every T5 item is new.
    set_params(built, caption={"trigger": "TOK"})
    ran = repro(built)
    assert set(ran) == {"caption", "embed_text", "shard"} and ran["caption"] == 0, ran
    assert ran["embed_text"] > 0


def test_dvc_metrics_show_is_one_narrow_table_of_counts(built):
    """Every stage's DVC metric holds its counts only, so `dvc metrics show` fits 120 columns; the
    wide figures (per bucket, per reason, shard sizes) are beside it, shown with the file's path."""
    from flows.dvc_stage import DATASET_STAGES
    from tasks.core.stage import Report

    def show(*targets: str) -> list[str]:
        return run([str(BIN / "dvc"), "metrics", "show", *targets], built).stdout.splitlines()

    lines = show()
    assert max(map(len, lines)) <= 120, "\n".join(lines)
    assert lines[0].split() == ["Path", "computed", "failed", "reused", "seconds", "total"]
    assert {line.split()[0] for line in lines[1:]} >= {f"metrics/{s}.json" for s in DATASET_STAGES}
    details = show("metrics/shard.details.json", "metrics/ingest.details.json")
    assert {"shards.written", "total_1mp_mb", "quarantined"} <= set(details[0].split())
    # The rest of the demo's rows, in the shapes their stages write them (tasks/latents.py through
    # Report; the trainers' {step, loss}; tasks/validate.py's {step, lpips, comparable}), with
    # longer numbers than the demo's: still one narrow table.
    Report("latents", total=1000, computed=1000, seconds=999.5, extra={"per_size": {"64x64": 1000}}).write(
        built / "metrics")
    # The front of the loop's stages (tasks/expand.py, tasks/candidates.py) write Reports too.
    Report("expand", total=4000, computed=4000, seconds=812.25, extra={"prompts": 8000}).write(built / "metrics")
    Report("candidates", total=16000, computed=16000, seconds=99999.5, extra={"generator": "lora"}).write(
        built / "metrics")
    for name, doc in (("train", {"step": 100000, "loss": 0.123456}), ("train_lora", {"step": 2000, "loss": 0.1}),
                      ("train_sdxl", {"step": 36621, "loss": 0.123456}),
                      ("train_wrong", {"step": 0, "loss": None}),  # no rejects: no step, no loss
                      ("validate", {"step": 100000, "lpips": 0.512345, "comparable": False})):
        (built / "metrics" / f"{name}.json").write_text(json.dumps(doc))
    lines = show()
    assert max(map(len, lines)) <= 120, "\n".join(lines)
    assert set(lines[0].split()) == {"Path", "total", "computed", "reused", "failed", "seconds", "step", "loss",
                                     "lpips", "comparable"}
    # + latents, train, train_lora, train_sdxl, train_wrong, validate, expand, candidates
    assert len(lines) == 1 + len(DATASET_STAGES) + 8, "\n".join(lines)

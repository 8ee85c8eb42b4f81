"""tasks.validate end to end on random shards, tiny NanoDiT checkpoints (random but conditioning-
dependent weights), the tiny profile's T5 and LPIPS with a random backbone (no AlexNet offline);
and validate-nightly's way around a busy DVC (flows/validate.py), in-process."""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import logging.handlers
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import tasks.report.suite
from tasks.core.params import ParamsError, as_dict, from_dict
from tasks.nanodit.params import TrainParams
from tasks.report.history import HISTORY_COLUMNS, NOT_COMPARABLE, judge, read_history, write_history
from tasks.validate import ValidateError, ValidateParams, main, validate
from tasks.report.suite import IMAGE_ROLES, Sample, edit_caption, partners, stats
from tests import shardkit
from tests.conftest import BIN, ROOT
from tests.dit_kit import nudged

SETTINGS = dict(steps=2, device="cpu", lpips_allow_random=True, text_edits=[["left", "right"], ["64x32", "square"]])
TESTS = ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence")


def params(**over) -> ValidateParams:
    return from_dict(ValidateParams, {**SETTINGS, **over}, "validate")


def _checkpoint(folder: Path, tiny: Path, step: int, seed: int) -> None:
    """A finished checkpoint as the trainer writes it; every weight nudged so that the output depends
    on the conditioning (a fresh model's zero-init output layers would ignore it)."""
    model = nudged(seed, text_dim=64, dino_dim=16, repa_hidden=16)
    model.save_pretrained(folder / "model")
    model.save_pretrained(folder / "ema")
    torch.save({}, folder / "state.pt")
    train = as_dict(from_dict(TrainParams, {"preset": "tiny", "image_scale": 1.0, "resolution_schedule": []}, "train"))
    meta = {"step": step, "params": train, "data": {"text_dim": 64, "dino_dim": 16, "dino_pool": 1},
            "dataset_params": {"embed_text": {"model": str(tiny / "t5"), "max_length": 32}},
            "sampling": {"steps": 2, "guidance": "cfg", "scale": 3.0, "scale_dino": 1.5, "route": 0.5, "shift": 1.0}}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models):
    """Shards (4 holdout samples: three 64x32, one 32x64) and two checkpoints of runs/nanodit."""
    root = tmp_path_factory.mktemp("validate")
    shardkit.write_dataset(root / "data/shards", {"64x32": 4, "32x64": 4}, shard_size=4,
                           holdout={"64x32": 3, "32x64": 1}, spec=shardkit.Spec(t5_dim=64, dino_dim=16))
    for step, seed in ((50, 1), (100, 2)):
        _checkpoint(root / f"runs/nanodit/checkpoints/step-{step:06d}", tiny_models, step, seed)
    (root / "params.yaml").write_text(yaml.safe_dump({"validate": SETTINGS}))
    return root


@pytest.fixture
def root(base, tmp_path):
    return Path(shutil.copytree(base, tmp_path / "root"))


def _history(root: Path, run: str = "nanodit") -> list[dict]:
    with (root / "runs" / run / "validation/history.tsv").open() as f:
        reader = csv.DictReader(f, delimiter="\t")
        assert tuple(reader.fieldnames) == HISTORY_COLUMNS
        return list(reader)


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_the_contract_files_labelled_not_comparable_and_is_deterministic(root, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(tasks.report.suite, "THUMB", 16)  # grids of thumbnails smaller than the samples
    first = validate(params(), root, dvc_stage=True)  # checkpoint: latest, as the DVC stage
    out = root / "runs/nanodit/validation/step-000100"
    assert first["step"] == 100 and first["split"] == "holdout" and first["already_validated"] is False
    assert sorted(p.name for p in out.iterdir()) == sorted(["metrics.json", "images"] + [f"{t}.png" for t in TESTS])
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["checkpoint"] == "runs/nanodit/checkpoints/step-000100" and doc["weights"] == "ema"
    assert doc["lpips"]["comparable"] is False and "not comparable" in doc["lpips"]["label"]
    t = doc["tests"]
    assert set(t) == set(TESTS) and (doc["alarms"], doc["flags"]) == ([], [])
    for name in TESTS:
        assert set(t[name]) >= {"n", "mean", "std", "min", "p10", "p50", "p90", "max", "skipped", "per_image"}
    assert (t["reconstruction"]["n"], t["cfg_divergence"]["n"]) == (4, 4)
    # DINO pairs stay in their bucket: the lone 32x64 sample has no partner.
    assert (t["dino_swap"]["n"], t["dino_swap"]["skipped"]) == (3, 1)
    pairs = t["dino_swap"]["per_image_dino_source"]
    assert sorted(pairs) == sorted(pairs.values()) and all(a != b for a, b in pairs.items())
    assert t["dino_swap"]["to_text_source"]["n"] == 3
    # Only the 64x32 captions hold a word of text_edits; the edit moves the image.
    assert (t["text_manipulation"]["n"], t["text_manipulation"]["skipped"]) == (3, 1)
    assert set(t["text_manipulation"]["per_image_edit"].values()) == {"64x32 -> square"}
    assert t["text_manipulation"]["min"] > 0 and t["cfg_divergence"]["min"] > 0
    assert t["reconstruction"]["min"] <= t["reconstruction"]["p50"] <= t["reconstruction"]["max"]
    # The DVC metric: three narrow columns of `dvc metrics show`; the whole summary beside it.
    assert json.loads((root / "metrics/validate.json").read_text()) == {
        "step": 100, "lpips": t["reconstruction"]["mean"], "comparable": False}
    summary = json.loads((root / "metrics/validate.details.json").read_text())
    assert summary["lpips"] == doc["lpips"] and summary["step"] == 100
    assert not any(k.startswith("per_image") for v in summary["tests"].values() for k in v)
    assert summary["tests"]["reconstruction"]["mean"] == t["reconstruction"]["mean"]
    rows = _history(root)
    assert [(r["step"], r["comparable"]) for r in rows] == [("100", "false")]
    assert float(rows[0]["reconstruction_lpips"]) == pytest.approx(t["reconstruction"]["mean"], abs=1e-6)
    assert float(rows[0]["reconstruction_p90"]) == pytest.approx(t["reconstruction"]["p90"], abs=1e-6)
    assert any(r.levelno == logging.WARNING and "not comparable" in r.getMessage() for r in caplog.records)
    grid = (out / "reconstruction.png").read_bytes()
    with Image.open(out / "reconstruction.png") as im:
        assert im.height < 64  # two rows of 16-px thumbnails
    # Every image each check compares, at full size: <index>_<id>_<role>.png.
    images = {p.relative_to(out / "images").as_posix(): p for p in sorted((out / "images").rglob("*.png"))}
    named = [re.fullmatch(r"reconstruction/(\d{3})_(\w+)_(orig|gen)\.png", k) for k in images
             if k.startswith("reconstruction/")]
    pairs = {(m.group(1), m.group(2)) for m in named}  # (index, id), each with both roles
    assert len(named) == 8 and len(pairs) == 4 and {i for i, _ in pairs} == {"000", "001", "002", "003"}
    assert {sid for _, sid in pairs} == set(t["reconstruction"]["per_image"])
    for check, roles in IMAGE_ROLES.items():
        names = [k.split("/")[1] for k in images if k.startswith(f"{check}/")]
        assert len(names) == t[check]["n"] * len(roles), check
        for role in roles:  # each compared sample has one image of each role
            assert sum(n.endswith(f"_{role}.png") for n in names) == t[check]["n"], (check, role)
    sizes = {}
    for k, path in images.items():
        with Image.open(path) as im:
            sizes[k] = im.size
    assert set(sizes.values()) == {(64, 32), (32, 64)}  # the samples' own size, not the grids' 16 px
    saved = {k: p.read_bytes() for k, p in images.items()}

    again = validate(params(), root, checkpoint="100")  # the same step again: same numbers, row replaced
    assert again["tests"] == first["tests"]
    assert (out / "reconstruction.png").read_bytes() == grid
    assert {k: p.read_bytes() for k, p in images.items()} == saved  # deterministic, nothing added
    assert sorted((out / "images").rglob("*.png")) == list(images.values())
    assert [r["step"] for r in _history(root)] == ["100"]
    assert not list(root.rglob(".*.tmp"))


def test_backtesting_an_older_step_of_the_active_run_leaves_the_dvc_metric_alone(root):
    metric = root / "metrics/validate.json"  # as the DVC stage left it, on the newest step
    metric.parent.mkdir()
    metric.write_text('{"step": 100}\n')
    m = validate(params(), root, checkpoint="50")  # a back-test of the same run, outside DVC
    assert m["step"] == 50 and (root / "runs/nanodit/validation/step-000050/metrics.json").is_file()
    assert [r["step"] for r in _history(root)] == ["50"]
    assert metric.read_text() == '{"step": 100}\n' and not (root / "metrics/validate.details.json").exists()
    with pytest.raises(ValidateError, match="--dvc-stage"):  # the stage validates validate.checkpoint only
        validate(params(), root, checkpoint="50", dvc_stage=True)


def test_alarm_on_a_jump_flags_on_regression_rows_by_step_and_skip_validated(root, caplog):
    hist = root / "runs/nanodit/validation/history.tsv"
    hist.parent.mkdir(parents=True)
    rows = [["300", "0.5", "0.5", "0.01", "0.01", "0.5", "false", "alex"],
            ["50", "0.0", "0.0", "9.0", "9.0", "0.0", "false", "alex"],
            ["60", "0.0", "0.0", "0.0", "0.0", "0.0", "true", "alex"],    # another backbone: not compared
            ["70", "-1.0", "-1.0", "99", "99", "-1.0", "false", "vgg"]]   # another net: not compared
    hist.write_text("\t".join(HISTORY_COLUMNS) + "\n" + "".join("\t".join(r) + "\n" for r in rows))
    caplog.set_level(logging.WARNING)
    m = validate(params(alarm_jump=0.01, regress_margin=0.01), root, checkpoint="100")
    assert len(m["alarms"]) == 1 and "reconstruction" in m["alarms"][0] and "(step 50)" in m["alarms"][0]
    flagged = {f.split()[0] for f in m["flags"]}
    assert flagged == {"reconstruction_lpips", "dino_swap_lpips", "text_manipulation_lpips", "cfg_divergence_lpips"}
    assert all("(step 50)" in f for f in m["flags"])  # 300 is later; 60: another backbone; 70: another net
    # A random backbone's numbers are labelled wherever they appear, the alarms and flags too.
    assert all(line.endswith(NOT_COMPARABLE) for line in m["alarms"] + m["flags"])
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(any(msg in w for w in warned) for msg in m["alarms"] + m["flags"])
    assert [(r["step"], r["lpips_net"]) for r in _history(root)] == \
        [("50", "alex"), ("60", "alex"), ("70", "vgg"), ("100", "alex"), ("300", "alex")]
    assert json.loads((root / "runs/nanodit/validation/step-000100/metrics.json").read_text())["alarms"] == m["alarms"]

    before = _tree(root / "runs/nanodit/validation") | _tree(root / "metrics")
    skipped = validate(params(), root, checkpoint="100", skip_validated=True)
    assert skipped["already_validated"] is True and skipped["step"] == 100
    assert _tree(root / "runs/nanodit/validation") | _tree(root / "metrics") == before


def test_history_without_the_lpips_net_column_reads_and_is_compared_with_nothing(tmp_path):
    old = tmp_path / "history.tsv"  # written before lpips_net: alex or vgg, nobody knows
    old.write_text("step\treconstruction_lpips\tdino_swap_lpips\ttext_manipulation_lpips\tcfg_divergence_lpips\t"
                   "reconstruction_p90\tcomparable\n10\t0.1\t0.1\t0.9\t0.9\t0.2\ttrue\n")
    rows = read_history(old)
    assert rows == [{"step": 10, "comparable": True, "lpips_net": None, "reconstruction_lpips": 0.1,
                     "dino_swap_lpips": 0.1, "text_manipulation_lpips": 0.9, "cfg_divergence_lpips": 0.9,
                     "reconstruction_p90": 0.2}]
    worse = {"step": 20, "comparable": True, "lpips_net": "alex", "reconstruction_lpips": 0.9,
             "dino_swap_lpips": 0.9, "text_manipulation_lpips": 0.1, "cfg_divergence_lpips": 0.1,
             "reconstruction_p90": 0.9}
    p = params(alarm_jump=0.01, regress_margin=0.01)
    assert judge(worse, rows, p) == ([], [])
    alarms, flags = judge(worse, [dict(rows[0], lpips_net="alex")], p)  # the same net: compared, no label
    assert len(alarms) == 1 and len(flags) == 4 and not any(NOT_COMPARABLE in x for x in alarms + flags)
    write_history(old, rows + [worse])
    assert old.read_text().splitlines()[0].split("\t") == list(HISTORY_COLUMNS)
    assert [(r["step"], r["lpips_net"]) for r in read_history(old)] == [(10, None), (20, "alex")]


def test_backtesting_a_checkpoint_of_another_run_touches_none_of_its_checkpoints(root):
    old = root / "runs/nanodit.superseded-20240101-000000"
    shutil.copytree(root / "runs/nanodit/checkpoints/step-000050", old / "checkpoints/step-000050")
    before = _tree(old / "checkpoints")
    m = validate(params(), root, checkpoint=old)  # a run folder: its newest checkpoint
    assert m["step"] == 50 and m["run"] == old.name
    assert _tree(old / "checkpoints") == before
    assert (old / "validation/step-000050/metrics.json").is_file()
    assert [r["step"] for r in _history(root, old.name)] == ["50"]
    assert not (root / "runs/nanodit/validation").exists()
    assert not list((root / "metrics").glob("validate*.json"))  # the DVC metrics stay the pipeline run's


def test_nightly_validates_outside_dvc_while_dvc_is_busy(root):
    """validate-nightly when DVC cannot run the stage: training under `dvc repro` holds DVC's rwlock
    on the checkpoints (the repo lock is let go while a stage's command runs); another dvc command
    holds the repo lock itself. Both are DVC's own locks, held here as they would hold them."""
    from dvc.fs import localfs
    from dvc.lock import make_lock
    from dvc.rwlock import rwlock

    from flows import dvc_stage
    from flows.validate import _lock_error, nightly_validation

    root = root.resolve()  # DVC's lock paths are resolved ones
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=root, check=True)
    (root / ".dvc/tmp").mkdir(exist_ok=True)
    stage = {"cmd": "python -m tasks.validate --dvc-stage", "deps": ["runs/nanodit/checkpoints", "data/shards"],
             "params": ["validate"], "outs": [{"runs/nanodit/validation": {"persist": True}},
                                              {"metrics/validate.details.json": {"cache": False}}],
             "metrics": [{"metrics/validate.json": {"cache": False}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"validate": stage}}))
    # Its own handler: importing Prefect (flows.validate) reconfigures logging, caplog's handler too.
    log, lines = logging.getLogger("test.nightly"), logging.handlers.BufferingHandler(1000)
    log.addHandler(lines)
    log.setLevel(logging.INFO)

    with make_lock(str(root / ".dvc/tmp/lock")), pytest.raises(Exception) as busy:
        dvc_stage.reproduce("validate", root, log)
    assert _lock_error(busy.value) is not None  # what nightly_validation takes for "DVC is busy"

    with rwlock(str(root / ".dvc/tmp"), localfs, "dvc repro train", [], [str(root / "runs/nanodit/checkpoints")],
                False):
        result = nightly_validation(params(), root, log)
    assert result["ran"] is True and result["run_dir"] == str(root / "runs/nanodit") and "skipped" not in result
    assert result["metrics"]["step"] == 100 and set(result["metrics"]["tests"]) == set(TESTS)
    assert [r["step"] for r in _history(root)] == ["100"]
    assert not list((root / "metrics").glob("validate*.json")) and not (root / "dvc.lock").exists()
    warned = [r.getMessage() for r in lines.buffer if r.levelno == logging.WARNING]
    assert any("DVC is busy" in w and "outside DVC" in w for w in warned)
    # DVC busy: nothing is committed (training's checkpoints are still changing); dvc repro will.
    assert any("the next `dvc repro` records" in r.getMessage() for r in lines.buffer)

    again = nightly_validation(params(), root, log)  # DVC free or not: the step is in the history now
    assert again["skipped"] == "already validated" and again["metrics"]["step"] == 100
    log.removeHandler(lines)


def test_without_a_holdout_split_the_train_samples_are_used_with_a_flag(tmp_path, tiny_models, caplog):
    shardkit.write_dataset(tmp_path / "data/shards", {"64x32": 2}, shard_size=2,
                           spec=shardkit.Spec(t5_dim=64, dino_dim=16))
    _checkpoint(tmp_path / "runs/nanodit/checkpoints/step-000010", tiny_models, 10, seed=1)
    caplog.set_level(logging.WARNING)
    m = validate(params(holdout=2, text_edits=[]), tmp_path)
    assert m["split"] == "train" and m["samples"] == 2 and m["flags"][0].startswith("split: no holdout")
    assert m["tests"]["text_manipulation"] == {**stats([]), "skipped": 2, "per_image": {}, "per_image_edit": {}}
    assert "TRAIN samples" in caplog.text


def test_cli_stops_with_a_message_naming_the_parameter(root, tmp_path, monkeypatch):
    (root / "params.yaml").write_text(yaml.safe_dump({"validate": {**SETTINGS, "lpips_allow_random": False}}))
    p = subprocess.run([sys.executable, "-m", "tasks.validate", "--checkpoint", "100"], cwd=root,
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "TORCH_HOME": str(tmp_path / "no-torch-home")})
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "validate.lpips_backbone" in p.stderr and "alexnet-owt-7be5be79.pth" in p.stderr
    assert not (root / "runs/nanodit/validation").exists()
    monkeypatch.chdir(root)  # the same command in this process (a second interpreter costs seconds)
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", "999", "--skip-validated"])
    assert "validate.checkpoint 999" in str(stop.value.code) and "steps here: 50, 100" in str(stop.value.code)


def test_caption_edits_bucket_partners_stats_and_params():
    edits = (("left", "right"), ("woman", "man"))
    assert edit_caption("A Woman raises her left hand", edits) == ("A Woman raises her right hand", "left", "right")
    assert edit_caption("Right, the woman.", edits) == ("Left, the woman.", "right", "left")
    assert edit_caption("a WOMAN and a woman", edits[1:]) == ("a MAN and a man", "woman", "man")
    assert edit_caption("a leftover womanly shape", edits) is None  # whole words only
    batch = lambda h: {"dino_patches": torch.zeros(1, h, 2, 4)}  # noqa: E731
    samples = [Sample("a", "", "32x64", batch(4)), Sample("b", "", "64x32", batch(2)),
               Sample("c", "", "32x64", batch(4)), Sample("d", "", "32x64", batch(4))]
    assert partners(samples) == {0: 2, 2: 3, 3: 0, 1: None}
    s = stats([0.1, 0.2, 0.3, 0.4])
    assert (s["n"], s["mean"], s["min"], s["max"], s["p50"]) == (4, 0.25, 0.1, 0.4, 0.25)
    assert stats([])["n"] == 0 and stats([])["mean"] is None
    assert params().weights == "ema" and params().seed == 42 and params().holdout == 25
    assert ValidateParams().text_edits[0] == ("left", "right") and ValidateParams().image_scale is None
    for bad, key in (({"guidance": "strong"}, "validate.guidance"), ({"weights": "best"}, "validate.weights"),
                     ({"text_edits": [["red", "Red"]]}, "validate.text_edits[0]"),
                     ({"image_scale": 2.0}, "validate.image_scale")):
        with pytest.raises((ParamsError, ValueError), match=key.replace("[", r"\[").replace("]", r"\]")):
            params(**bad)

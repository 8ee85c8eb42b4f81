import dataclasses
from typing import Literal

import pytest

from tasks.bucket import BucketParams
from tasks.ingest import IngestParams
from tasks.core.params import ParamsError, from_dict, load_section

ROOT_PARAMS = __import__("pathlib").Path(__file__).resolve().parents[1] / "params.yaml"


def test_repo_params_load_into_frozen_dataclasses():
    ing = load_section(IngestParams, "ingest", ROOT_PARAMS)
    b = load_section(BucketParams, "bucket", ROOT_PARAMS)
    assert ing.holdout_count == 25 and ing.sources == ("data/raw",)
    assert b.buckets[0] == (1024, 1024) and len(b.buckets) == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.resample = "nearest"  # type: ignore[misc]


def test_unknown_key_is_named():
    with pytest.raises(ParamsError, match=r"ingest\.holdout_cnt"):
        from_dict(IngestParams, {"holdout_cnt": 3}, "ingest")


@pytest.mark.parametrize("raw, key", [
    ({"holdout_count": "25"}, "ingest.holdout_count"),
    ({"holdout_count": True}, "ingest.holdout_count"),  # YAML true is not a count
    ({"sources": "data/raw"}, "ingest.sources"),
    ({"max_pixels": 1.5}, "ingest.max_pixels"),
])
def test_wrong_types_are_refused_with_the_key(raw, key):
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        from_dict(IngestParams, raw, "ingest")


def test_nested_list_errors_point_at_the_item():
    with pytest.raises(ParamsError, match=r"bucket\.buckets\[1\]\[0\]"):
        from_dict(BucketParams, {"buckets": [[1024, 1024], ["wide", 768]]}, "bucket")
    with pytest.raises(ParamsError, match="expected 2 items"):
        from_dict(BucketParams, {"buckets": [[1024, 1024, 3]]}, "bucket")


def test_literal_lists_the_choices():
    with pytest.raises(ParamsError, match="'lanczos'"):
        from_dict(BucketParams, {"resample": "sinc"}, "bucket")


def test_validate_checks_values():
    with pytest.raises(ValueError, match=r"bucket\.buckets\[0\].*multiples of 16"):
        from_dict(BucketParams, {"buckets": [[1000, 1000]]}, "bucket")
    with pytest.raises(ValueError, match="holdout_max_fraction"):
        from_dict(IngestParams, {"holdout_max_fraction": 1.5}, "ingest")


def test_int_is_accepted_for_float_and_missing_section_is_named(tmp_path):
    assert from_dict(IngestParams, {"holdout_max_fraction": 0}, "ingest").holdout_max_fraction == 0.0
    f = tmp_path / "params.yaml"
    f.write_text("ingest: {}\n")
    with pytest.raises(ParamsError, match="no section 'bucket'"):
        load_section(BucketParams, "bucket", f)


def test_missing_required_key():
    @dataclasses.dataclass(frozen=True)
    class P:
        model: str
        mode: Literal["a", "b"] = "a"

    with pytest.raises(ParamsError, match=r"x\.model: missing"):
        from_dict(P, {}, "x")


def test_stage_command_refuses_a_bad_section_by_name(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "params.yaml"
    f.write_text("bucket:\n  resample: lanczos\n  bukets: [[1024, 1024]]\n")
    p = subprocess.run([sys.executable, "-m", "tasks.bucket", "--params", str(f)],
                       capture_output=True, text=True, cwd=tmp_path,
                       env={**__import__("os").environ,
                            "PYTHONPATH": str(ROOT_PARAMS.parent)})
    assert p.returncode != 0
    assert "bucket.bukets" in p.stderr and "Traceback" not in p.stderr


def test_params_yaml_and_the_real_profile_hold_the_stages_own_defaults(tmp_path):
    """params.yaml (on the real profile) documents the defaults; it must not drift from the code."""
    import shutil

    import yaml

    from tasks.candidates import CandidatesParams
    from tasks.caption import CaptionParams
    from tasks.core.executors import ExecutorParams
    from tasks.embed_image import EmbedImageParams
    from tasks.embed_pose import EmbedPoseParams
    from tasks.embed_text import EmbedTextParams
    from tasks.expand import ExpandParams
    from tasks.latents import LatentsParams
    from tasks.profile import apply, load_profile
    from tasks.shard import ShardParams
    from tasks.sdxl.full_params import FullParams
    from tasks.sdxl.params import LoraParams, WrongParams
    from tasks.nanodit.params import TrainParams
    from tasks.validate import ValidateParams

    params = tmp_path / "params.yaml"
    shutil.copy(ROOT_PARAMS, params)
    apply("real", params, build=False)  # the checkout may be on the tiny profile (after `make demo`)
    classes = {"ingest": IngestParams, "bucket": BucketParams, "caption": CaptionParams,
               "candidates": CandidatesParams,
               "embed_text": EmbedTextParams, "embed_image": EmbedImageParams,
               "embed_pose": EmbedPoseParams, "shard": ShardParams, "latents": LatentsParams,
               "train": TrainParams, "validate": ValidateParams,
               "train_lora": LoraParams, "train_wrong": WrongParams, "train_sdxl": FullParams, "executor": ExecutorParams,
               "expand": ExpandParams}
    doc = yaml.safe_load(params.read_text())
    assert set(doc) == set(classes)
    for section, cls in classes.items():
        assert load_section(cls, section, params) == cls(), section
    for section, values in load_profile("real").items():
        for key, value in values.items():
            if isinstance(value, list):  # YAML lists; the dataclasses hold tuples
                value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
            assert getattr(classes[section](), key) == value, f"profiles/real.yaml {section}.{key}"


def test_the_executor_section_is_read_and_no_stage_depends_on_it(monkeypatch):
    """Where model stages compute is the machine's business: DVC must not call a stage stale
    because `executor` changed, and $NICHE_RAY_ADDRESS switches to Ray for one command."""
    import yaml

    from tasks.core.executors import RAY_ADDRESS_ENV, ExecutorParams, executor_params

    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    assert executor_params(ROOT_PARAMS) == ExecutorParams()  # the defaults: this process
    stages = yaml.safe_load((ROOT_PARAMS.parent / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        named = [p if isinstance(p, str) else next(iter(p)) for p in stage.get("params", [])]
        assert not [p for p in named if p.split(".")[0] == "executor"], name
    monkeypatch.setenv(RAY_ADDRESS_ENV, "head:6379")
    assert executor_params(ROOT_PARAMS).kind == "ray" and executor_params(ROOT_PARAMS).address == "head:6379"
    with pytest.raises(ValueError, match="executor.actors"):
        from_dict(ExecutorParams, {"kind": "ray", "actors": 0}, "executor")

"""tasks.generate end to end: a tiny NanoDiT checkpoint (random but conditioning-
dependent weights) and the tiny profile's real encoders, loaded as the stages load them."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from models.nanodit import NanoDiT
from tests.dit_kit import nudged
from tasks.generate import GenerateError, find_checkpoint, generate, main, pose_from_json
from tests.conftest import ROOT

BUCKETS = [[128, 96], [64, 64], [96, 128]]
STEPS = 3


def _model(seed: int) -> NanoDiT:
    return nudged(seed, text_dim=64, dino_dim=64, repa_hidden=64)


def _meta(tiny, step: int, **dataset) -> dict:
    return {"step": step,
            "dataset_params": {
                "bucket": {"buckets": BUCKETS, "resample": "lanczos"},
                "caption": {"trigger": "TOK"},
                "embed_text": {"model": str(tiny / "t5"), "max_length": 32},
                "embed_image": {"model": str(tiny / "dinov3")},
                # the tiny detector finds "people" only under a low threshold
                "embed_pose": {"detector": str(tiny / "dwpose" / "yolox.onnx"),
                               "pose": str(tiny / "dwpose" / "dw-ll.onnx"), "det_score": 0.02},
                "shard": {"patch_pool": 2, "patch_dtype": "int8"}, **dataset},
            "data": {"dino_pool": 2, "text_dim": 64, "dino_dim": 64},
            "sampling": {"steps": STEPS, "guidance": "dual", "scale": 3.0, "scale_dino": 1.5, "route": 0.5,
                         "shift": 1.0}}


def _checkpoint(folder, tiny, step: int, seed: int, **dataset):
    model = _model(seed)
    model.save_pretrained(folder / "model")
    model.save_pretrained(folder / "ema")
    (folder / "meta.json").write_text(json.dumps(_meta(tiny, step, **dataset)))
    return folder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models):
    run = tmp_path_factory.mktemp("runs") / "nanodit"
    _checkpoint(run / "checkpoints" / "step-000050", tiny_models, 50, seed=1)
    _checkpoint(run / "checkpoints" / "step-000100", tiny_models, 100, seed=2)
    (run / "checkpoints" / "step-000200" / "model").mkdir(parents=True)  # still being written: no meta.json
    return run


@pytest.fixture(scope="module")
def ckpt(run_dir):
    return run_dir / "checkpoints" / "step-000100"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("inputs") / "ref.png"
    Image.fromarray(rng.integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(path)  # 4:3 → 128x96
    return path


def _pixels(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _info(path) -> dict:
    with Image.open(path) as im:
        return json.loads(im.text["niche"])


def test_png_of_the_size_asked_for_deterministic_for_a_seed(ckpt, tmp_path):
    a, = generate(ckpt, "a figure dancing", tmp_path / "a.png", size="96x128", seed=0)
    b, = generate(ckpt, "a figure dancing", tmp_path / "b.png", size=(96, 128), seed=0)
    c, = generate(ckpt, "a figure dancing", tmp_path / "c.png", size="96x128", seed=1)
    with Image.open(a) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGB", (96, 128))
    assert a.read_bytes() == b.read_bytes()
    assert not np.array_equal(_pixels(a), _pixels(c))
    assert np.ptp(_pixels(a)) > 0  # not a flat field
    info = _info(a)
    # The trigger went in front as the caption stage puts it; dual fell back to cfg without a reference.
    assert (info["text"], info["guidance"], info["steps"], info["step"]) == ("TOK, a figure dancing", "cfg",
                                                                            STEPS, 100)
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


def test_reference_and_pose_change_the_image(ckpt, reference, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    base, = generate(ckpt, "a figure", tmp_path / "base.png", size="128x96", guidance="cfg")
    ref, = generate(ckpt, "a figure", tmp_path / "ref.png", reference=reference, guidance="cfg")
    with Image.open(ref) as im:
        assert im.size == (128, 96)  # the reference's bucket
    rng = np.random.default_rng(1)
    rows = np.column_stack([rng.uniform(-0.8, 0.8, (133, 2)), np.ones(133)]).tolist()
    (tmp_path / "pose.json").write_text(json.dumps(rows))
    posed, = generate(ckpt, "a figure", tmp_path / "posed.png", size="128x96", pose=tmp_path / "pose.json",
                      guidance="cfg")
    figure = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8))
    figure.save(tmp_path / "figure.png")
    from_image, = generate(ckpt, "a figure", tmp_path / "from_image.png", size="128x96",
                           pose=tmp_path / "figure.png", guidance="cfg")
    assert "people found" in caplog.text  # DWPose ran on the pose image (the tiny one sees "people" anywhere)
    images = [_pixels(p) for p in (base, ref, posed, from_image)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not np.array_equal(images[i], images[j]), (i, j)
    # The reference is seen at its bucket's full size, whatever the output's: 64x48 is no
    # multiple of DINOv3's pooled 32 px, the 128x96 bucket is.
    small, = generate(ckpt, "a figure", tmp_path / "small.png", size="64x48", reference=reference, guidance="cfg")
    with Image.open(small) as im:
        assert im.size == (64, 48) and _info(small)["frame"] == "128x96"
    # "dual" guides by the reference, so with one the checkpoint's default stands
    dual, = generate(ckpt, "a figure", tmp_path / "dual.png", reference=reference)
    assert _info(dual)["guidance"] == "dual" and not np.array_equal(_pixels(dual), images[1])
    assert _info(dual)["scale_dino"] == 1.5  # the checkpoint's sampling.scale_dino
    stronger, = generate(ckpt, "a figure", tmp_path / "stronger.png", reference=reference, scale_dino=4.0)
    assert _info(stronger)["scale_dino"] == 4.0 and not np.array_equal(_pixels(stronger), _pixels(dual))


def test_only_the_encoders_needed_are_loaded(ckpt, tmp_path, monkeypatch):
    import models.encoders.dinov3
    import models.encoders.dwpose

    def refuse(*a, **kw):
        raise AssertionError("loaded an encoder nobody asked for")

    monkeypatch.setattr(models.encoders.dinov3, "DINOv3Encoder", refuse)
    monkeypatch.setattr(models.encoders.dwpose, "DWPose", refuse)
    path, = generate(ckpt, "", tmp_path / "plain.png", size="64x64", guidance="none")
    assert _info(path)["text"] == ""  # an empty prompt gets no trigger


def test_run_folder_means_its_newest_finished_checkpoint(run_dir, ckpt, tmp_path):
    assert find_checkpoint(run_dir) == ckpt
    assert find_checkpoint(run_dir / "checkpoints") == ckpt
    from_run, = generate(run_dir, "a figure", tmp_path / "run.png", size="64x64", guidance="none")
    from_ckpt, = generate(ckpt, "a figure", tmp_path / "ckpt.png", size="64x64", guidance="none")
    older, = generate(run_dir / "checkpoints" / "step-000050", "a figure", tmp_path / "old.png", size="64x64",
                      guidance="none")
    assert _info(from_run)["step"] == 100
    assert np.array_equal(_pixels(from_run), _pixels(from_ckpt))
    assert not np.array_equal(_pixels(from_run), _pixels(older))


def test_default_size_is_the_bucket_at_the_scale_the_checkpoint_trained_at(tmp_path, tiny_models, reference):
    # image_scale 0.5 with a schedule halving it again until step 3000: step 3000 trained at 0.25
    ckpt = _checkpoint(tmp_path / "half", tiny_models, 3000, seed=3)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["params"] = {"image_scale": 0.5, "resolution_schedule": [[3000, 0.5]]}
    (ckpt / "meta.json").write_text(json.dumps(meta))
    quarter, = generate(ckpt, "a figure", tmp_path / "q.png", guidance="none")
    with Image.open(quarter) as im:
        assert im.size == (32, 32)  # 128x96 x 0.25 = 32x24, rounded to the 16-px patch grid as training did
    meta["step"] = 3001
    (ckpt / "meta.json").write_text(json.dumps(meta))
    half, = generate(ckpt, "a figure", tmp_path / "h.png", reference=reference, guidance="none")
    with Image.open(half) as im:
        assert im.size == (64, 48) and _info(half)["frame"] == "128x96"


def test_batch_writes_numbered_images(ckpt, tmp_path):
    paths = generate(ckpt, "a figure", tmp_path / "out.png", size="64x64", guidance="none", batch=2)
    assert [p.name for p in paths] == ["out-0.png", "out-1.png"] and all(p.is_file() for p in paths)
    assert not np.array_equal(_pixels(paths[0]), _pixels(paths[1]))


def test_sample_pose_json_is_mapped_into_the_output_frame(tmp_path):
    kp = [[10.0 * i, 5.0 * i, 1.0] for i in range(133)]
    (tmp_path / "f.pose.json").write_text(json.dumps({"format": "coco_wholebody_133", "width": 1000,
                                                      "height": 2000, "keypoints": kp}))
    pose = pose_from_json(tmp_path / "f.pose.json", (100, 100))
    # 1000x2000 covers 100x100 at 0.1, its centre 1000x1000 crop starts at y = 500
    i = 60
    assert pose[i] == pytest.approx([2 * (10 * i * 0.1) / 100 - 1, 2 * ((5 * i - 500) * 0.1) / 100 - 1, 1.0],
                                    abs=1e-2)
    (tmp_path / "bad.json").write_text(json.dumps([[0, 0, 1]] * 10))
    with pytest.raises(GenerateError, match="133 rows"):
        pose_from_json(tmp_path / "bad.json", (100, 100))


def _exit_message(argv, capsys=None) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code not in (0, None)
    return str(e.value.code)


def test_errors_a_person_fixes_are_one_clear_message(ckpt, reference, tmp_path, tiny_models):
    base = ["--checkpoint", str(ckpt), "--prompt", "x", "--out", str(tmp_path / "o.png")]
    msg = _exit_message(base + ["--size", "100x64"])
    assert "--size 100x64" in msg and "multiples of 16" in msg
    (tmp_path / "broken.png").write_text("not an image")
    msg = _exit_message(base + ["--reference", str(tmp_path / "broken.png")])
    assert "--reference" in msg and "broken.png" in msg and "not a usable image" in msg
    msg = _exit_message(base + ["--guidance", "dual"])
    assert "--reference" in msg
    other = _checkpoint(tmp_path / "no-t5", tiny_models, 1, seed=0, embed_text={"model": str(tmp_path / "no-t5-here")})
    msg = _exit_message(["--checkpoint", str(other), "--prompt", "x", "--out", str(tmp_path / "o.png")])
    assert "embed_text.model" in msg and "no-t5-here" in msg and "meta.json" in msg
    assert not (tmp_path / "o.png").exists()

    # The command itself: a message and a non-zero exit, no traceback.
    p = subprocess.run([sys.executable, "-m", "tasks.generate", "--checkpoint", str(tmp_path / "nowhere"),
                        "--prompt", "x", "--out", str(tmp_path / "o.png")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert f"--checkpoint {tmp_path / 'nowhere'}: not found" in p.stderr
    assert "Traceback" not in p.stderr

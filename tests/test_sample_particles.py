"""The synthetic particle-figure dataset: determinism, true keypoints, and how the images look."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.sample.particles import SIZES, render_figure, write_particle_dataset
from tasks.sample.skeleton import (BONE_RADII, BONES, HEAD_R, KEYPOINT_NAMES, POSE_NAMES, SPINE,
                                   sample_pose)

N_IMAGES = 60
# Upright side-view poses, where "facing" says which way the body's front points.
SIDE_UPRIGHT = ("walking", "running", "sitting_ground", "sitting_chair", "reaching_forward", "kicking")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> list[tuple[Path, dict, str]]:
    out = tmp_path_factory.mktemp("figures")
    items = []
    for image in write_particle_dataset(out, N_IMAGES, seed=3):
        stem = image.name.split(".")[0]
        record = json.loads((out / f"{stem}.pose.json").read_text())
        items.append((image, record, (out / f"{stem}.txt").read_text(encoding="utf-8")))
    return items


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _cross(u: np.ndarray, v: np.ndarray) -> float:
    return float(u[0] * v[1] - u[1] * v[0])


def _unit(kp: np.ndarray) -> float:
    """Pixels per head unit, measured the way the renderer measures it."""
    return float(np.hypot(*((kp[5] + kp[6]) / 2 - (kp[11] + kp[12]) / 2))) / SPINE


def test_same_seed_gives_same_bytes_and_extending_keeps_old_files(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    write_particle_dataset(a, 5, seed=7)
    write_particle_dataset(b, 5, seed=7)
    paths = write_particle_dataset(c, 7, seed=7)
    assert _files(a) == _files(b)
    longer = _files(c)
    assert len(paths) == 7 and len(longer) == 21
    assert all(longer[name] == data for name, data in _files(a).items())
    write_particle_dataset(tmp_path / "d", 5, seed=8)
    assert _files(tmp_path / "d") != _files(a)


def test_adding_to_an_existing_folder_writes_only_the_new_items(tmp_path):
    first = write_particle_dataset(tmp_path, 5, seed=1)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    more = write_particle_dataset(tmp_path, 2, seed=1, start=5)
    assert [p.name for p in more] == [f"figure_{i:05d}.{p.suffix[1:]}" for i, p in zip((5, 6), more)]
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert len(list(tmp_path.iterdir())) == 21 and not list(tmp_path.glob(".*"))
    again = write_particle_dataset(tmp_path, 7, seed=1)  # regenerating is a no-op
    assert again[:5] == first and {p: p.stat().st_mtime_ns for p in before} == before


def test_sidecars_sizes_and_formats(dataset):
    suffixes = set()
    for image, record, caption in dataset:
        suffixes.add(image.suffix)
        with Image.open(image) as im:
            assert im.mode == "RGB"
            assert im.size == (record["width"], record["height"])
            assert "exif" not in im.info
        assert im.size in SIZES and im.size[0] * im.size[1] >= 0.95e6
        assert record["format"] == "coco_wholebody_133" and record["pose"] in POSE_NAMES
        assert caption.endswith("\n") and caption.count("\n") == 1 and len(caption) > 20
    assert suffixes == {".png", ".jpg"}


def test_keypoints_are_133_and_inside_the_image(dataset):
    for _, record, _ in dataset:
        kp = np.array(record["keypoints"])
        assert kp.shape == (133, 3) and (kp[:, 2] == 1.0).all()
        assert (kp[:, 0] >= 0).all() and (kp[:, 0] < record["width"]).all()
        assert (kp[:, 1] >= 0).all() and (kp[:, 1] < record["height"]).all()
        assert np.allclose(kp[:, :2], np.round(kp[:, :2], 2))


def test_hands_start_at_the_wrists_and_face_sits_on_the_head(dataset):
    for _, record, _ in dataset:
        kp = np.array(record["keypoints"])[:, :2]
        assert np.hypot(*(kp[91] - kp[9])) < 1.0 and np.hypot(*(kp[112] - kp[10])) < 1.0
        centre, radius = (kp[3] + kp[4]) / 2, HEAD_R * _unit(kp)
        face = np.concatenate([kp[:3], kp[23:91]])
        assert (np.hypot(*(face - centre).T) < 1.3 * radius).all()


def test_mostly_white_with_particles_near_the_body(dataset):
    for image, record, _ in dataset[:12]:
        grey = np.asarray(Image.open(image).convert("L"))
        assert (grey >= 240).mean() > 0.85
        ys, xs = np.nonzero(grey < 100)
        assert len(xs) > 300
        kp = np.array(record["keypoints"])[:, :2]
        unit = _unit(kp)
        segs = [(kp[i], kp[j]) for i, j in BONES] + [((kp[5] + kp[6]) / 2, (kp[11] + kp[12]) / 2)]
        a, b = np.array([s[0] for s in segs]), np.array([s[1] for s in segs])
        p = np.column_stack([xs, ys]).astype(float)[:, None, :]
        d = b - a
        t = np.clip(((p - a) * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-9), 0, 1)
        dist = np.hypot(*(p - (a + t[..., None] * d)).transpose(2, 0, 1)).min(1)
        head = np.hypot(*(p[:, 0] - (kp[3] + kp[4]) / 2).T) < 1.15 * HEAD_R * unit
        near = (dist < 0.8 * unit) | head
        assert near.mean() > 0.95, (image.name, near.mean())


def test_many_poses_and_captions_follow_the_pose(dataset):
    names = {record["pose"] for _, record, _ in dataset}
    assert len(names) >= 10
    owner: dict[str, str] = {}
    for _, record, caption in dataset:
        assert owner.setdefault(caption, record["pose"]) == record["pose"]
    by_pose = {}
    for _, record, caption in dataset:
        by_pose.setdefault(record["pose"], set()).add(caption)
    assert all(not (by_pose[x] & by_pose[y]) for x in by_pose for y in by_pose if x != y)


def test_every_pose_fits_every_size():
    for k, name in enumerate(POSE_NAMES):
        for s, (w, h) in enumerate(SIZES):
            pose = sample_pose(np.random.default_rng([k, s]), w, h, name)
            kp = pose.keypoints
            assert pose.name == name and kp.shape == (133, 2) and kp.dtype == np.float64
            assert (kp >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all(), (name, w, h)


def test_left_and_right_are_the_persons_own():
    for seed in range(20):
        front = sample_pose(np.random.default_rng(seed), 1024, 1024, "arms_crossed")
        kp = front.keypoints
        assert front.facing == "front" and kp[5, 0] > kp[6, 0] and kp[11, 0] > kp[12, 0]
        assert kp[23 + 45, 0] > kp[23 + 36, 0]  # left eye's outer corner is on image right
        side = sample_pose(np.random.default_rng(seed), 1024, 1024, "standing")
        if side.view == "side":
            nose_ahead = side.keypoints[0, 0] - (side.keypoints[3, 0] + side.keypoints[4, 0]) / 2
            assert (nose_ahead > 0) == (side.facing == "right")
            assert side.facing in side.caption.replace(",", " ").split()


def test_side_view_knees_and_elbows_bend_the_natural_way():
    for seed in range(10):
        for name in SIDE_UPRIGHT:
            pose = sample_pose(np.random.default_rng([seed, 1]), 1248, 832, name)
            kp, front = pose.keypoints, 1.0 if pose.facing == "right" else -1.0
            for hip, knee, ankle in ((11, 13, 15), (12, 14, 16)):
                # y points down, so a backward knee bend turns clockwise on screen for a right-facing figure
                assert front * _cross(kp[knee] - kp[hip], kp[ankle] - kp[knee]) >= -1e-6, (name, seed)
            for sh, el, wr in ((5, 7, 9), (6, 8, 10)):
                assert front * _cross(kp[el] - kp[sh], kp[wr] - kp[el]) <= 1e-6, (name, seed)


def test_names_bones_and_render_arguments():
    assert len(KEYPOINT_NAMES) == 133 and len(set(KEYPOINT_NAMES)) == 133
    assert KEYPOINT_NAMES[9] == "left_wrist" and KEYPOINT_NAMES[91] == "left_hand_wrist"
    assert len(BONES) == len(BONE_RADII) and all(0 <= i < 133 and 0 <= j < 133 for i, j in BONES)
    pose = sample_pose(np.random.default_rng(0), 900, 1200)
    sparse = render_figure(pose.keypoints, 900, 1200, np.random.default_rng(1), density=0.3)
    dense = render_figure(pose.keypoints, 900, 1200, np.random.default_rng(1), density=1.0)
    assert sparse.mode == "RGB" and sparse.size == (900, 1200)
    assert (np.asarray(sparse) < 100).sum() < (np.asarray(dense) < 100).sum()


def test_rejects_are_deterministic_new_and_visibly_defective(tmp_path):
    from tasks.sample.rejects import DEFECTS, make_reject, write_rejects

    a = write_rejects(tmp_path / "a", 3, seed=5)
    b = write_rejects(tmp_path / "b", 3, seed=5)
    assert [p.name for p in a] == ["reject_00000.png", "reject_00001.jpg", "reject_00002.png"]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    figures = {p.read_bytes() for p in write_particle_dataset(tmp_path / "f", 3, seed=5)}
    assert not figures & set(_files(tmp_path / "a").values())  # never the bytes of an approved figure
    for i, defect in enumerate(DEFECTS):
        img, clean, name = make_reject(5, i)
        r, c = np.asarray(img, np.int16), np.asarray(clean, np.int16)
        assert name == defect and img.size == clean.size and min(img.size) >= 512
        if defect == "scrambled":  # the same pixels, moved: the body is in pieces
            assert (r != c).any() and np.array_equal(np.sort(r, axis=None), np.sort(c, axis=None))
        elif defect == "noisy":  # grain over the whole white page
            assert np.abs(r - c)[c == 255].mean() > 20  # half the grain is clipped at white
        else:  # blurred: hardly a dark particle survives
            assert (r < 100).sum() < 0.1 * (c < 100).sum()

"""bench/bench_learn.py's pure pieces: the synthetic square images and their judge (no training)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_learn", ROOT / "bench" / "bench_learn.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_writer_leaves_out_the_held_out_combinations(tmp_path):
    paths = bench.write_squares(tmp_path)
    assert len(paths) == 12 and len(list(tmp_path.glob("*.png"))) == 12
    captions = {p.with_suffix(".txt").read_text().strip() for p in paths}
    seen = {bench.caption(c, p) for c, p in bench.COMBOS if (c, p) not in bench.HELD_OUT}
    assert captions == seen and len(captions) == 12
    assert not captions & {bench.caption(c, p) for c, p in bench.HELD_OUT}
    # One held-out combination per colour and per position: every unseen caption's words are seen.
    assert sorted(c for c, _ in bench.HELD_OUT) == sorted(bench.COLOURS)
    assert sorted(p for _, p in bench.HELD_OUT) == sorted(bench.POSITIONS)
    for p in paths:
        with Image.open(p) as img:
            assert img.size == (512, 512) and img.mode == "RGB"


def test_the_judge_reads_each_reference_image_at_the_trained_size():
    for colour, position in bench.COMBOS:
        img = bench.square_image(colour, position).resize((64, 64), Image.Resampling.LANCZOS)
        assert bench.judge(img) == (colour, position), (colour, position)
        assert bench.judge(np.asarray(img)) == (colour, position)  # arrays as well as images


def test_the_judge_finds_nothing_on_a_plain_background():
    assert bench.judge(Image.new("RGB", (64, 64), bench.BACKGROUND)) == (None, None)


def test_the_text_grid_frames_only_the_unseen_cells():
    samples = [np.asarray(bench.square_image(c, p, 64)) for c, p in bench.COMBOS]
    sheet = np.asarray(bench.text_grid(samples))
    assert sheet.shape[0] >= 4 * 68 and sheet.shape[1] >= 4 * 68
    # Each cell's top-left frame pixel: black for the unseen combinations, white for the seen ones.
    left, top, pad, side = 44, 24, 4, 68
    for k, combo in enumerate(bench.COMBOS):
        i, j = divmod(k, 4)
        corner = sheet[top + i * (side + pad), left + j * (side + pad)]
        assert (corner == 0).all() == (combo in bench.HELD_OUT), combo

"""tasks.sweep: the labelled checkpoint x prompt x seed grid (with a fake sampler), the
negative-prompt guidance of models/flow_matching.py, and NanoDiTSampler end to end
on hand-written tiny checkpoints with the tiny profile's real T5."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.hub import SetupError

from tasks.nanodit.sampler import GenerateError, NanoDiTSampler
from tasks.report.sweep_grid import PAD, PROMPT_LINES, Sampler, SweepError, _font, _width, layout_path, sweep, wrap
from tasks.sweep import DEFAULT_PROMPTS, default_prompts, main, seen_captions
from tests.dit_kit import nudged

WHITE = (255, 255, 255)


class FakeSampler:
    """Solid colours, one per (step, prompt, seed); landscape or portrait by prompt and step."""

    def __init__(self, steps=(100, 200, 300)):
        self.steps = steps
        self.calls = []

    def checkpoints(self):
        return [(s, Path(f"/nowhere/step-{s:06d}")) for s in self.steps]

    @staticmethod
    def size(step, prompt):
        return (40, 24) if (len(prompt) + step // 100) % 2 else (24, 40)

    @staticmethod
    def colour(step, prompt, seed):
        d = hashlib.sha256(f"{step}|{prompt}|{seed}".encode()).digest()
        return tuple(int(v) % 200 for v in d[:3])  # never white, never near it

    def sample(self, ckpt, prompt, seed, negative):
        step = int(Path(ckpt).name.split("-")[1])
        self.calls.append((step, prompt, seed, negative))
        return Image.new("RGB", self.size(step, prompt), self.colour(step, prompt, seed))


def _dark(a: np.ndarray) -> int:
    """Pixels that are not white."""
    return int((a != 255).any(-1).sum())


PROMPTS = ["a figure dancing", "a particle figure juggling three balls while balancing on one leg in the rain, "
                                "seen from the front, drawn in sparse black dots on white"]


def test_grid_layout_labels_and_cells(tmp_path):
    fake = FakeSampler()
    assert isinstance(fake, Sampler)
    out = sweep(fake, PROMPTS, [0, 7], None, tmp_path / "grid" / "sweep.png")
    doc = json.loads(layout_path(out).read_text())
    cols = [[p, s] for p in PROMPTS for s in (0, 7)]
    assert (doc["rows"], doc["cols"], doc["negative"], doc["image"]) == ([100, 200, 300], cols, None, "sweep.png")
    assert len(fake.calls) == 3 * 4 and {c[3] for c in fake.calls} == {None}

    with Image.open(out) as im:
        assert (im.format, im.mode) == ("PNG", "RGB")
        a = np.asarray(im)
        assert json.loads(im.text["niche"]) == doc
    lw, hh, (cw, ch) = doc["label_width"], doc["header"], doc["cell"]
    # image size = first column + columns x cells, header + rows x cells; cells hold the largest image
    assert (a.shape[1], a.shape[0]) == (lw + 4 * cw, hh + 3 * ch) == (doc["width"], doc["height"])
    assert cw >= 40 + 2 * PAD and ch == 40 + 2 * PAD
    assert doc["sizes"] == [[list(FakeSampler.size(s, p)) for p, _ in cols] for s in (100, 200, 300)]

    # labels: every header cell and every row label holds ink; the corner does not
    for c in range(4):
        assert _dark(a[:hh, lw + c * cw: lw + (c + 1) * cw]) > 20, c
    for r in range(3):
        assert _dark(a[hh + r * ch: hh + (r + 1) * ch, :lw]) > 20, r
    assert _dark(a[:hh, :lw]) == 0
    # the long prompt wrapped onto more lines than the short one; the seed labels differ
    short, long_ = a[:hh, lw: lw + cw], a[:hh, lw + 2 * cw: lw + 3 * cw]
    assert _dark(long_) > _dark(short)
    assert not np.array_equal(a[:hh, lw: lw + cw], a[:hh, lw + cw: lw + 2 * cw])
    # row labels differ by step
    assert not np.array_equal(a[hh: hh + ch, :lw], a[hh + ch: hh + 2 * ch, :lw])

    # each cell: the fake's colour at its centre, the image centred on white
    for r, step in enumerate((100, 200, 300)):
        for c, (prompt, seed) in enumerate(cols):
            x0, y0 = lw + c * cw, hh + r * ch
            cell = a[y0: y0 + ch, x0: x0 + cw]
            assert tuple(cell[ch // 2, cw // 2]) == FakeSampler.colour(step, prompt, seed), (r, c)
            w, h = FakeSampler.size(step, prompt)
            ink = np.argwhere((cell != 255).any(-1))
            assert len(ink) == w * h
            (top, left), (bottom, right) = ink.min(0), ink.max(0)
            assert (right - left + 1, bottom - top + 1) == (w, h)
            assert abs(left - (cw - 1 - right)) <= 1 and abs(top - (ch - 1 - bottom)) <= 1  # centred
    assert not list(out.parent.glob(".*"))  # written atomically, nothing left behind


def test_negative_is_passed_and_recorded(tmp_path):
    fake = FakeSampler(steps=(5,))
    out = sweep(fake, ["x"], [3], "blurry", tmp_path / "s.png")
    assert fake.calls == [(5, "x", 3, "blurry")]
    assert json.loads(layout_path(out).read_text())["negative"] == "blurry"
    fake.calls.clear()
    sweep(fake, ["x"], [3], "  ", tmp_path / "s.png")  # blank means none
    assert fake.calls == [(5, "x", 3, None)]


def test_wrap_fits_and_cuts():
    font = _font()
    lines = wrap(PROMPTS[1] * 3, font, 100)
    assert len(lines) == PROMPT_LINES and lines[-1].endswith("...")
    assert all(_width(font, ln) <= 100 for ln in lines)
    assert wrap("short", font, 100) == ["short"]
    assert all(_width(font, ln) <= 30 for ln in wrap("supercalifragilistic", font, 30))  # a long word breaks


@pytest.mark.parametrize("kw, match", [
    (dict(prompts=[]), "no prompts"), (dict(seeds=[]), "no seeds"),
    (dict(sampler=FakeSampler(steps=())), "no finished checkpoints"), (dict(out="grid.jpg"), "expected a .png"),
])
def test_sweep_refuses(tmp_path, kw, match):
    args = dict(sampler=FakeSampler(), prompts=["x"], seeds=[0], negative=None, out="g.png") | kw
    with pytest.raises(SweepError, match=match):
        sweep(args["sampler"], args["prompts"], args["seeds"], args["negative"], tmp_path / args["out"])


# ---------------------------------------------------------------- the negative-prompt loop

def _model(seed: int, text_dim: int = 64):
    return nudged(seed, text_dim=text_dim, dino_dim=64, repa_hidden=64).eval()


def _text_cond(t5: torch.Tensor):
    from models.nanodit import Conditioning

    return Conditioning(t5=t5[None], t5_mask=torch.ones(1, t5.shape[0], dtype=torch.bool),
                        dino_cls=torch.zeros(1, 64), dino_patches=torch.zeros(1, 1, 1, 64),
                        pose=torch.zeros(1, 133, 3), keep=torch.tensor([[True, False, False, False]]))


def test_negative_loop_mirrors_euler_sample():
    from models.flow_matching import _keep, euler_sample, pad_text

    model = _model(1)
    g = torch.Generator().manual_seed(0)
    cond = _text_cond(torch.randn(5, 64, generator=g))
    kw = dict(steps=3, scale=3.0, shift=2.0, seed=4)
    # against the unconditional prediction it is euler_sample's cfg, bit for bit
    ours = euler_sample(model, cond, (48, 64), guidance="cfg", negative=_keep(cond), **kw)
    ref = euler_sample(model, cond, (48, 64), guidance="cfg", **kw)
    assert torch.equal(ours, ref)
    # a negative prompt of another length: padded tokens are masked out, so they change nothing
    x, t = torch.randn(1, 3, 48, 64, generator=g), torch.full((1,), 0.7)
    with torch.no_grad():
        assert torch.allclose(model(x, t, cond).x0, model(x, t, pad_text(cond, 9)).x0, atol=1e-5)
    neg = _text_cond(torch.randn(9, 64, generator=g))
    other = euler_sample(model, cond, (48, 64), guidance="cfg", negative=neg, **kw)
    assert other.shape == ref.shape and not torch.allclose(other, ref)
    assert torch.equal(other, euler_sample(model, cond, (48, 64), guidance="cfg", negative=neg, **kw))


# ---------------------------------------------------------------- NanoDiTSampler end to end

BUCKETS = [[128, 96], [64, 64]]


def _checkpoint(folder: Path, tiny: Path, step: int, seed: int, image_scale: float):
    model = _model(seed)
    model.save_pretrained(folder / "model")
    model.save_pretrained(folder / "ema")
    torch.save({}, folder / "state.pt")
    meta = {"step": step, "params": {"image_scale": image_scale},
            "dataset_params": {"bucket": {"buckets": BUCKETS, "resample": "lanczos"},
                               "caption": {"trigger": "TOK"},
                               "embed_text": {"model": str(tiny / "t5"), "max_length": 32}},
            "sampling": {"steps": 2, "guidance": "cfg", "scale": 3.0, "shift": 1.0}}
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_models):
    run = tmp_path_factory.mktemp("runs") / "nanodit"
    ckpts = run / "checkpoints"
    _checkpoint(ckpts / "step-000050", tiny_models, 50, seed=1, image_scale=0.5)  # trained at half size
    _checkpoint(ckpts / "step-000100", tiny_models, 100, seed=2, image_scale=1.0)
    (ckpts / "step-000200" / "model").mkdir(parents=True)  # still being written: not a checkpoint
    return run


def _cells(path: Path) -> list[np.ndarray]:
    doc = json.loads(layout_path(path).read_text())
    lw, hh, (cw, ch) = doc["label_width"], doc["header"], doc["cell"]
    with Image.open(path) as im:
        a = np.asarray(im.convert("RGB"))
    out = []
    for r, row in enumerate(doc["sizes"]):
        for c, (w, h) in enumerate(row):
            x, y = lw + c * cw + (cw - w) // 2, hh + r * ch + (ch - h) // 2
            out.append(a[y: y + h, x: x + w])
    return out


def test_nanodit_sweep_deterministic_and_negative_changes_it(run_dir, tmp_path, monkeypatch):
    import tasks.nanodit.sampler

    encoded = []
    real = tasks.nanodit.sampler.encode_text

    def counting(meta, ckpt, text, device):
        encoded.append(text)
        return real(meta, ckpt, text, device)

    monkeypatch.setattr(tasks.nanodit.sampler, "encode_text", counting)
    prompts = ["a figure dancing", "two figures juggling"]
    a = sweep(NanoDiTSampler(run_dir, device="cpu"), prompts, [0, 1], None, tmp_path / "a" / "sweep.png")
    doc = json.loads(layout_path(a).read_text())
    assert doc["rows"] == [50, 100] and doc["cols"] == [[p, s] for p in prompts for s in (0, 1)]
    # the first bucket at each checkpoint's trained scale
    assert doc["sizes"] == [[[64, 48]] * 4, [[128, 96]] * 4]
    assert doc["sampler"]["guidance"] == "cfg" and doc["sampler"]["parts"] == "text only"
    assert sorted(encoded) == ["TOK, a figure dancing", "TOK, two figures juggling"]  # once per prompt

    cells = _cells(a)
    assert all(np.ptp(c) > 0 for c in cells)  # not flat fields
    for i in range(4):  # each column (prompt, seed) differs from the others
        for j in range(i + 1, 4):
            assert not np.array_equal(cells[4 + i], cells[4 + j]), (i, j)

    b = sweep(NanoDiTSampler(run_dir, device="cpu"), prompts, [0, 1], None, tmp_path / "b" / "sweep.png")
    assert a.read_bytes() == b.read_bytes()  # the same name: the same bytes, layout chunk included

    n = sweep(NanoDiTSampler(run_dir, device="cpu"), prompts, [0, 1], "blurry, low quality", tmp_path / "n.png")
    assert "TOK, blurry, low quality" in encoded
    for x, y in zip(cells, _cells(n)):
        assert x.shape == y.shape and not np.array_equal(x, y)


def test_nanodit_sampler_fixed_size_and_steps(run_dir, tmp_path):
    sampler = NanoDiTSampler(run_dir, size="64x64", steps=1, guidance="none", device="cpu")
    assert [s for s, _ in sampler.checkpoints()] == [50, 100]
    out = sweep(sampler, ["a figure"], [0], None, tmp_path / "s.png")
    doc = json.loads(layout_path(out).read_text())
    assert doc["sizes"] == [[[64, 64]], [[64, 64]]] and doc["sampler"]["steps"] == 1
    with pytest.raises(GenerateError, match="needs --guidance"):
        sweep(sampler, ["a figure"], [0], "blurry", tmp_path / "t.png")
    with pytest.raises(SetupError, match="multiples of 16"):
        sweep(NanoDiTSampler(run_dir, size="60x64", device="cpu"), ["a"], [0], None, tmp_path / "u.png")


def test_nanodit_sampler_samples_dual_as_cfg(run_dir, tmp_path, caplog):
    """validate.guidance may be dual, which needs a reference image: the text-only sweep uses cfg."""
    caplog.set_level("INFO", logger="niche")
    dual = NanoDiTSampler(run_dir, steps=1, guidance="dual", device="cpu")
    assert dual.guidance == "cfg" and dual.describe()["guidance"] == "cfg"
    assert any("guidance dual" in r.getMessage() and "uses cfg" in r.getMessage() for r in caplog.records)
    a = sweep(dual, ["a figure"], [0], None, tmp_path / "dual.png")
    b = sweep(NanoDiTSampler(run_dir, steps=1, guidance="cfg", device="cpu"), ["a figure"], [0], None,
              tmp_path / "cfg.png")
    assert _cells(a)[1].tobytes() == _cells(b)[1].tobytes()
    with pytest.raises(GenerateError, match="--guidance 'strong'"):
        NanoDiTSampler(run_dir, guidance="strong", device="cpu")


# ---------------------------------------------------------------- command line

def test_cli_writes_the_default_out(run_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("# comment\n\na figure running\n")
    main(["--run", str(run_dir), "--prompts", "a figure dancing", "--prompts-file", "prompts.txt",
          "--seeds", "3", "--negative", "blurry", "--steps", "1", "--device", "cpu"])
    doc = json.loads((run_dir / "sweep.json").read_text())
    assert (run_dir / "sweep.png").is_file()
    assert doc["cols"] == [["a figure dancing", 3], ["a figure running", 3]] and doc["negative"] == "blurry"


@pytest.mark.parametrize("make, args, match", [
    (None, [], "not found"),
    ("empty", [], "no finished checkpoint"),
    ("empty", ["--negative", "x", "--guidance", "none"], "needs --guidance cfg"),
    ("empty", ["--prompts-file", "missing.txt"], "unreadable"),
])
def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys, make, args, match):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "nanodit"
    if make:
        (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(SystemExit) as e:
        main(["--run", str(run), "--device", "cpu", *args])
    assert isinstance(e.value.code, str) and e.value.code.startswith("sweep: ") and match in e.value.code


def test_default_prompts(tmp_path):
    assert default_prompts(tmp_path / "absent.yaml") == list(DEFAULT_PROMPTS)
    (tmp_path / "params.yaml").write_text("train: {}\n")
    assert default_prompts(tmp_path / "params.yaml") == list(DEFAULT_PROMPTS)
    (tmp_path / "params.yaml").write_text("validate:\n  sweep_prompts: [a figure waving, a cat]\n")
    assert default_prompts(tmp_path / "params.yaml") == ["a figure waving", "a cat"]
    (tmp_path / "params.yaml").write_text("validate:\n  sweep_prompts: []\n")
    assert default_prompts(tmp_path / "params.yaml") == list(DEFAULT_PROMPTS)
    (tmp_path / "params.yaml").write_text("validate:\n  sweep_prompts: a figure\n")
    with pytest.raises(SweepError, match="list of prompts"):
        default_prompts(tmp_path / "params.yaml")


def test_seen_captions_are_the_first_training_captions_by_id(tmp_path, caplog):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [("c", "train", "a figure seen third", None), ("a", "train", "a figure seen first", None),
            ("b", "holdout", "a held-out figure", None), ("0", "train", "", "caption: model failed"),
            ("1", "train", "broken", "timeout"), ("b2", "train", "a figure seen second", None)]
    table = pa.table({k: [r[i] for r in rows] for i, k in enumerate(("id", "split", "text", "error"))})
    pq.write_table(table, tmp_path / "caption.parquet")
    assert seen_captions(tmp_path / "caption.parquet", 2) == ["a figure seen first", "a figure seen second"]
    assert seen_captions(tmp_path / "caption.parquet", 9) == ["a figure seen first", "a figure seen second",
                                                             "a figure seen third"]
    assert seen_captions(tmp_path / "caption.parquet", 0) == []
    assert seen_captions(tmp_path / "absent.parquet", 1) == [] and "absent.parquet not found" in caplog.text
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SweepError, match="bad.parquet: not a readable caption table"):
        seen_captions(tmp_path / "bad.parquet", 1)

"""tasks/run_report.py: the self-contained HTML page of a training run, checked as text and
as pixels (headless Chromium's screenshot of it)."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.report.chart import Series, svg_chart
from tasks.report.page import write_report
from tasks.report.run_files import read_series
from tasks.run_report import main

CHROMIUM = next((p for p in ("/usr/bin/chromium", *(shutil.which(n) for n in ("chromium", "chromium-browser")))
                 if p and os.access(p, os.X_OK)), None)
ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
RED = (255, 0, 0)
SWEEP_GREEN = (0, 160, 0)
LOSS_BLUE = (0x1f, 0x77, 0xb4)     # tasks.run_report.PALETTE[0]: the loss polyline
BANNER_FILL = (0xff, 0xf4, 0xe5)    # the not-comparable banner's background
ALARM = "reconstruction p90 rose 40% since step 200"
FLAG = "cfg_divergence below 0.05: guidance may do nothing"


def _tsv(path: Path, name: str, rows: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step\t{name}\n" + "".join(f"{s}\t{v!r}\n" for s, v in rows), encoding="utf-8")


def _png(path: Path, color: tuple[int, int, int] | None = None, size: tuple[int, int] = (256, 128)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if color is None:  # a gradient, as a "photo"
        w, h = size
        x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
        y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
        arr = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                              np.full((h, w, 1), 128, np.float32)], axis=2).astype(np.uint8)
        Image.fromarray(arr).save(path)
    else:
        Image.new("RGB", size, color).save(path)


def make_run(root: Path, comparable: bool = True, nested: bool = True) -> Path:
    """A run folder with every input the report reads. nested: validation stats under "tests",
    as tasks/validate.py writes them (else at the top level of metrics.json)."""
    run = root / "nanodit"
    live = run / "live"
    m = live / "plots" / "metrics"
    steps = list(range(0, 1201, 10))
    _tsv(m / "train" / "loss.tsv", "loss", [(s, 0.9 * math.exp(-s / 300) + 0.08) for s in steps])
    _tsv(m / "train" / "mse.tsv", "mse", [(s, 0.5 * math.exp(-s / 300) + 0.05) for s in steps])
    _tsv(m / "train" / "repa_loss.tsv", "repa_loss", [(s, 0.8 * math.exp(-s / 500) + 0.06) for s in steps])
    _tsv(m / "train" / "grad_norm.tsv", "grad_norm", [(s, 1.0 + 0.5 * math.sin(s / 50)) for s in steps])
    _tsv(m / "train" / "lr.tsv", "lr", [(s, 3e-4 * min(1.0, (s + 1) / 500)) for s in steps])
    _tsv(m / "train" / "velocity_rms.tsv", "velocity_rms", [(s, 1.2 - s / 2400) for s in steps])
    _tsv(m / "train" / "skipped_steps.tsv", "skipped_steps", [(s, float(s > 600)) for s in steps])
    _tsv(m / "sys" / "samples_per_s.tsv", "samples_per_s", [(s, 40.0 + (s % 30) / 10) for s in steps])
    _tsv(m / "memory" / "peak_gb.tsv", "peak_gb", [(s, 11.5) for s in steps])
    (live / "metrics.json").write_text(json.dumps({
        "train": {"loss": 0.081, "mse": 0.051, "repa_loss": 0.13, "grad_norm": 1.1, "lr": 3e-4},
        "sys": {"samples_per_s": 41.2}, "memory": {"peak_gb": 11.5}, "step": 1200}), encoding="utf-8")

    for s in (200, 400, 600, 800, 1000):
        _png(run / "samples" / f"step-{s:06d}.png")
    _png(run / "samples" / "step-001200.png", RED, (512, 256))     # the latest: pure red, found in the screenshot

    comp = "true" if comparable else "false"
    rows = [(200, 0.61, 0.55, 0.42, 0.20, 0.75), (600, 0.48, 0.50, 0.40, 0.18, 0.66),
            (1000, 0.39, 0.47, 0.37, 0.16, 0.58)]
    history = "step\treconstruction_lpips\tdino_swap_lpips\ttext_manipulation_lpips\tcfg_divergence_lpips\t" \
              "reconstruction_p90\tcomparable\n"
    history += "".join("\t".join(map(str, r)) + f"\t{comp}\n" for r in rows)
    (run / "validation").mkdir(parents=True)
    (run / "validation" / "history.tsv").write_text(history, encoding="utf-8")
    for s in (200, 600, 1000):
        d = run / "validation" / f"step-{s:06d}"
        d.mkdir()
        stats = {t: {"n": 16, "mean": 0.4, "std": 0.1, "min": 0.2, "p10": 0.3, "p50": 0.41, "p90": 0.58, "max": 0.7}
                 for t in ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence")}
        label = "alex (vgg16 backbone)" if comparable else "alex, random backbone (not comparable)"
        doc = {"step": s, "lpips": {"net": "alex", "label": label, "comparable": comparable},
               "alarms": [ALARM] if s == 1000 else [], "flags": [FLAG] if s == 1000 else []}
        if nested:
            doc.update(run="nanodit", checkpoint=f"runs/nanodit/checkpoints/step-{s:06d}", weights="ema",
                       split="holdout", samples=16,
                       tests={t: {**v, "skipped": 0, "per_image": {str(i): 0.4 for i in range(16)}}
                              for t, v in stats.items()})
        else:
            doc.update(stats)
        (d / "metrics.json").write_text(json.dumps(doc), encoding="utf-8")
        for name in ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence"):
            _png(d / f"{name}.png", size=(384, 192))

    _png(run / "sweep.png", SWEEP_GREEN, (600, 200))
    (run / "sweep.json").write_text(json.dumps({      # as tasks/sweep.py writes it
        "image": "sweep.png", "rows": [400, 800, 1200], "cols": [["a figure dancing", 0], ["a figure dancing", 1]],
        "prompts": ["a figure dancing"], "seeds": [0, 1], "sizes": [[[64, 64]] * 2] * 3}), encoding="utf-8")
    ck = run / "checkpoints" / "step-001000"
    ck.mkdir(parents=True)
    (ck / "meta.json").write_text(json.dumps({"step": 1000, "world_size": 1, "params": {
        "preset": "baseline", "steps": 6000, "lr": 3e-4, "optimizer": "muon", "tread": True, "repa": True,
        "image_scale": 0.5, "batch_size": 1, "grad_accum": 256}}), encoding="utf-8")
    (run / "checkpoints" / "step-000500").mkdir()   # older and incomplete: ignored
    return run


def external_refs(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", page, flags=re.I)


def screenshot(html: Path, png: Path, window: tuple[int, int] = (1280, 2400), timeout: float = 40) -> None:
    """Headless Chromium's screenshot of html; the whole process group is killed after timeout."""
    profile = png.parent / "chromium-profile"
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--disable-background-networking", f"--user-data-dir={profile}",
           f"--window-size={window[0]},{window[1]}", f"--screenshot={png}", html.resolve().as_uri()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = b""
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)   # the wrapper script's children too (own session)
        except ProcessLookupError:
            pass
        proc.wait()
    assert png.is_file(), f"chromium wrote no screenshot:\n{out.decode(errors='replace')[-2000:]}"


def near(arr: np.ndarray, rgb: tuple[int, int, int], tol: int) -> int:
    return int((np.abs(arr.astype(np.int16) - np.array(rgb, np.int16)).max(axis=2) <= tol).sum())


# ---------------------------------------------------------------- tests

def test_full_run_page_is_self_contained(tmp_path):
    run = make_run(tmp_path, comparable=True)
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    assert external_refs(page) == []
    assert "<script" not in page.lower() and "<link" not in page.lower() and "@import" not in page
    assert page.count("<svg") >= 8 and page.count("<polyline") >= 10
    # the loss chart carries loss, mse and repa_loss; LPIPS one line per test and the p90
    for name in ("loss", "mse", "repa_loss", "reconstruction", "dino_swap", "text_manipulation", "cfg_divergence",
                 "reconstruction p90"):
        assert f"<title>{name}</title>" in page
    # images: the latest sample, 5 earlier thumbnails, 4 validation grids, the sweep
    assert len(re.findall(r'src="data:image/(?:png|jpeg);base64,', page)) == 11
    assert "not comparable" not in page.lower()
    assert ALARM in page and FLAG in page and 'class="box alarm"' in page and 'class="box flag"' in page
    for text in ("nanodit", "1,200", "muon", "baseline", "step-001000", "Latest validation: step 1,000",
                 "cfg_divergence", "sweep.json", "Alarms (1)", "Flags (1)", "3 checkpoints (steps 400, 800, 1,200)",
                 "2 seed(s)", "split holdout"):
        assert text in page
    table = page[page.index('<table class="stats">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == 5 and "<th>p90</th>" in table and "<th>skipped</th>" in table
    assert "per_image" not in page
    assert not list(run.glob(".report.html.*"))   # atomic: no temporary left


def test_not_comparable_banner(tmp_path):
    run = make_run(tmp_path, comparable=False, nested=False)   # and the flat metrics.json layout
    page = write_report(run, tmp_path / "out" / "r.html").read_text(encoding="utf-8")
    assert 'class="banner"' in page and "LPIPS not comparable" in page
    assert "LPIPS per validation (not comparable)" in page
    assert "random backbone" in page
    table = page[page.index('<table class="stats">'):]
    assert table[:table.index("</table>")].count("<tr>") == 5


def test_empty_run_gives_notes(tmp_path):
    run = tmp_path / "empty"
    (run / "live").mkdir(parents=True)
    page = write_report(run).read_text(encoding="utf-8")
    for text in ("No training metrics yet", "No validation yet", "No samples yet", "No sweep yet",
                 "No checkpoint yet", "No metrics yet", "none yet"):
        assert text in page
    assert "<polyline" not in page and 'class="banner"' not in page


def test_broken_files_are_notes_not_crashes(tmp_path):
    run = make_run(tmp_path)
    (run / "live" / "metrics.json").write_text("{half", encoding="utf-8")
    (run / "validation" / "step-001000" / "metrics.json").write_text("[", encoding="utf-8")
    (run / "samples" / "step-001200.png").write_bytes(b"not a png")
    (run / "live" / "plots" / "metrics" / "train" / "lr.tsv").write_text("step\tlr\n10\tnan\nx\t1\n", encoding="utf-8")
    page = write_report(run).read_text(encoding="utf-8")
    assert "Could not render samples" in page
    assert "Learning rate: no data yet." in page
    assert page.count("<polyline") >= 8


def test_cli_and_chart_helpers(tmp_path, capsys):
    run = make_run(tmp_path)
    out = tmp_path / "x" / "page.html"
    main(["--run", str(run), "--out", str(out)])
    assert capsys.readouterr().out.strip() == str(out) and out.is_file()
    with pytest.raises(SystemExit):
        main(["--run", str(tmp_path / "missing")])
    xs, ys = read_series(run / "live" / "plots" / "metrics" / "train" / "loss.tsv")
    assert xs[0] == 0 and xs[-1] == 1200 and len(xs) == len(ys) == 121
    # dvclive's own layout (a timestamp column first) reads the same
    p = tmp_path / "loss.tsv"
    p.write_text("timestamp\tstep\tloss\n1700000000\t1\t0.5\n1700000001\t2\t0.25\n", encoding="utf-8")
    assert read_series(p) == ([1.0, 2.0], [0.5, 0.25])
    # long series are reduced, a spike survives; one point still draws
    n = 20000
    svg = svg_chart("t", [Series("s", list(range(n)), [1.0 if i != 12345 else 50.0 for i in range(n)])], log_y=False)
    pts = re.search(r'points="([^"]+)"', svg).group(1).split()
    assert len(pts) <= 1600 and min(float(p.split(",")[1]) for p in pts) < 80   # the spike is near the top
    assert "<circle" in svg_chart("one", [Series("s", [5.0], [0.3])])


def test_images_downscaled_and_thumbnails_spread(tmp_path):
    run = tmp_path / "r"
    (run / "live").mkdir(parents=True)
    for s in range(100, 1300, 100):                       # 12 grids: the latest + 6 of the 11 earlier
        _png(run / "samples" / f"step-{s:06d}.png", size=(3000, 1500) if s == 1200 else (640, 320))
    page = write_report(run).read_text(encoding="utf-8")
    assert 'width="1024" height="512"' in page            # the latest, downscaled
    assert page.count('class="thumb"') == 6 and 'width="320" height="160"' in page
    assert "step 100<" in page and "step 1,100<" in page  # the oldest and the one before the latest
    assert "Earlier (6 of 11)" in page


def need_chromium() -> str:
    """The browser, or a skip with the reason. Under CI=true a missing browser fails the test:
    CI must open the report in a real browser (.ci/run installs Debian's chromium)."""
    if CHROMIUM is None:
        missing = "no chromium binary (/usr/bin/chromium, or chromium / chromium-browser on PATH)"
        if ON_CI:
            pytest.fail(f"{missing}, and CI=true: the report must be opened in a real browser on CI "
                        "(.ci/run installs it: apt-get install chromium)", pytrace=False)
        pytest.skip(f"{missing} to render the page with: apt-get install chromium (under CI=true this fails)")
    return CHROMIUM


def test_screenshot_in_headless_chromium(tmp_path):
    need_chromium()
    run = make_run(tmp_path, comparable=False)
    html = write_report(run)
    png = tmp_path / "shot.png"
    screenshot(html, png)                      # the first 1280 x 2400 px, as a person sees them
    img = Image.open(png).convert("RGB")
    assert img.width == 1280
    arr = np.asarray(img)
    non_white = int((arr.min(axis=2) < 235).sum())
    assert non_white > 0.05 * arr.shape[0] * arr.shape[1], f"blank page? {non_white} non-white pixels"
    assert near(arr, LOSS_BLUE, 12) > 200, "no loss-chart line pixels"
    assert near(arr, BANNER_FILL, 3) > 20000, "no not-comparable banner"   # ~70k px; ~150 without it
    # the whole page, taller: the embedded images (a pure-red sample grid, a pure-green sweep) are drawn
    tall = tmp_path / "tall.png"
    screenshot(html, tall, window=(1280, 6000))
    arr = np.asarray(Image.open(tall).convert("RGB"))
    assert near(arr, RED, 10) > 0.8 * 512 * 256, "the embedded red sample grid is not drawn"
    assert near(arr, SWEEP_GREEN, 10) > 0.8 * 600 * 200, "the embedded green sweep is not drawn"

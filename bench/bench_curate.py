"""Benchmark: the curation page with many candidates, in Debian's chromium through Playwright.

    .venv/bin/python bench/bench_curate.py [--candidates 1000] [--size 1024] [--decisions 400]
                                           [--json bench/results/curate.json] [--screenshot bench/results/curate.png]

Makes a project with N candidates (PNG files at --size, synthetic particle figures: black
flecks on white, as the particleArt seed's; written in the real candidates table and store),
starts the real server (`python -m tasks.curate serve`, its own process), then measures:

  time to first grid   from navigation start until every card is in the page and every
                       thumbnail in the first screen has loaded: cold (fresh server: every
                       thumbnail decoded and scaled now) and warm (reloads). Goal <= 1 s.
  decisions per second keep / reject POSTs with the decision log fsync'ed at every commit,
                       each one materialised (the PNG copied into data/raw, its caption
                       written, both fsync'ed); from 1 and 4 concurrent clients, with latency
                       percentiles; and caption edits of undecided candidates (the log alone).

and saves a screenshot of the page for the README. Prints figures and writes JSON. Asserts nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WORDS = ["love", "joy", "grief", "dance", "wait", "run", "hope", "fall", "rest", "reach"]


def figure(rng: np.random.Generator, size: int) -> Image.Image:
    """Black flecks on white along a stick figure in a random pose."""
    s = size / 1024
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.4, 0.6)
    parts = [((cx, cy - 260 * s), 60 * s, 800)]  # head: centre, radius, flecks
    hip = (cx + rng.normal(0, 20) * s, cy + 120 * s)
    for a, b, n in [((cx, cy - 190 * s), hip, 900)] + [
            (start, (start[0] + np.cos(t) * 230 * s, start[1] + np.sin(t) * 230 * s), 500)
            for start, t in [((cx, cy - 150 * s), rng.uniform(-3.0, 0.3)), ((cx, cy - 150 * s), rng.uniform(2.8, 6.0)),
                             (hip, rng.uniform(0.9, 1.5)), (hip, rng.uniform(1.6, 2.3))]]:
        u = rng.random(n)
        parts.append(((a[0] + (b[0] - a[0]) * u, a[1] + (b[1] - a[1]) * u), 18 * s, n))
    img = np.full((size, size), 255, np.uint8)
    for (x, y), r, n in parts:
        xs = (np.asarray(x) + rng.normal(0, r, n)).astype(int).clip(0, size - 2)
        ys = (np.asarray(y) + rng.normal(0, r, n)).astype(int).clip(0, size - 2)
        for dx in (0, 1):
            for dy in (0, 1):
                img[ys + dy, xs + dx] = 0
    return Image.fromarray(img).convert("RGB")


def make_project(root: Path, n: int, size: int) -> None:
    from tasks.core import manifest
    from tasks.curate.tables import CANDIDATES, CANDIDATES_STORE, CANDIDATES_TABLE

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        word, seed, template = WORDS[i % len(WORDS)], i // len(WORDS) % 4, ("particle", "figure")[i % 2]
        prompt = f"Sparse black particle flecks on a pure white background forming a figure showing {word} ({i})"
        key = hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()
        rel = f"{key[:2]}/{key}.png"
        path = root / CANDIDATES_STORE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        figure(rng, size).save(path, compress_level=1)
        rows.append(dict(id=key, prompt=prompt, seed=seed, word=word, template=template, generator="sdxl",
                         checkpoint="stabilityai/stable-diffusion-xl-base-1.0", checkpoint_id="bench", key=key,
                         file=rel, width=size, height=size, error=None))
    manifest.write_table(rows, CANDIDATES, root / CANDIDATES_TABLE, sort_by="id")
    (root / "data/raw/photos").mkdir(parents=True, exist_ok=True)


def write_thumbs(root: Path) -> float:
    """The thumbnails the candidates stage writes beside its renders; returns the seconds."""
    import pyarrow.parquet as pq

    from tasks.curate.tables import CANDIDATES_STORE, CANDIDATES_TABLE
    from tasks.curate.thumbs import ensure_thumbs

    t0 = time.perf_counter()
    ensure_thumbs(root / CANDIDATES_STORE, pq.read_table(root / CANDIDATES_TABLE, columns=["key"])["key"].to_pylist())
    return time.perf_counter() - t0


class Server:
    def __init__(self, root: Path):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "tasks.curate", "serve", "--root", str(root), "--port",
                                      str(self.port)], cwd=root, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        for _ in range(300):
            try:
                urllib.request.urlopen(self.url + "/api/changes", timeout=2).read()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the curation server did not start")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)


FIRST_SCREEN = """() => {
  const cards = document.querySelectorAll('.card');
  if (!window.__gridReady || !cards.length) return false;
  const h = window.innerHeight;
  return [...cards].filter(c => c.getBoundingClientRect().top < h).every(c => c.querySelector('img').complete);
}"""


def first_grid(page, url: str) -> float:
    page.goto(url)
    page.wait_for_function(FIRST_SCREEN, timeout=60000, polling=10)
    return page.evaluate("performance.now()") / 1000  # since navigation start


def post(url: str, body: dict) -> float:
    t0 = time.perf_counter()
    req = urllib.request.Request(url + "/api/decide", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    out = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert out.get("error") is None, out
    return time.perf_counter() - t0


def decisions(url: str, items: list[str], n: int, clients: int, action: str) -> dict:
    lat: list[float] = []
    lock = threading.Lock()

    def work(c: int) -> None:
        for i in range(c, n, clients):
            item = items[i % len(items)]
            body = {"item": item, "action": "caption", "caption": f"edit {i}"} if action == "caption" else \
                {"item": item, "action": "keep" if i % 2 else "reject"}
            t = post(url, body)
            with lock:
                lat.append(t)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.perf_counter() - t0
    lat.sort()
    return {"clients": clients, "decisions": n, "what": action, "per_second": round(n / took, 1),
            "p50_ms": round(lat[len(lat) // 2] * 1000, 2), "p95_ms": round(lat[int(len(lat) * 0.95)] * 1000, 2)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--candidates", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1024, help="candidate images' side in pixels (SDXL: 1024)")
    ap.add_argument("--decisions", type=int, default=400)
    ap.add_argument("--json", default="bench/results/curate.json")
    ap.add_argument("--screenshot", default="bench/results/curate.png")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    tmp = Path(tempfile.mkdtemp(prefix="niche-curate-bench-"))
    t0 = time.perf_counter()
    make_project(tmp, args.candidates, args.size)
    print(f"{args.candidates} candidates of {args.size}x{args.size} written in {time.perf_counter() - t0:.1f}s")
    result: dict = {"machine": platform.node(), "cpus": os.cpu_count(), "candidates": args.candidates,
                    "size": args.size}
    srv = None
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            # Without the stage's thumbnails first (every one scaled by the server: the dataset
            # view's case), then with them (the candidates stage wrote them: the grid's case).
            srv = Server(tmp)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            on_demand = first_grid(page, srv.url)
            page.close()
            srv.stop()
            thumbs_s = write_thumbs(tmp)
            srv = Server(tmp)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            cold = first_grid(page, srv.url)
            warm = [first_grid(page, srv.url) for _ in range(3)]
            cards = page.eval_on_selector_all(".card", "cs => cs.length")
            result["first_grid_s"] = {"cold": round(cold, 3), "warm_median": round(statistics.median(warm), 3),
                                      "cold_thumbnails_on_demand": round(on_demand, 3), "cards": cards}
            result["stage_thumbnails_s"] = round(thumbs_s, 2)
            print(f"time to first grid, {cards} cards: cold {cold:.3f}s, warm {statistics.median(warm):.3f}s "
                  f"(goal <= 1 s); cold with every thumbnail scaled on demand {on_demand:.3f}s "
                  f"(the stage's thumbnails took {thumbs_s:.1f}s to write)")
            # The README's picture: a few decisions by key, the cursor on an undecided one.
            for key in "kxxk" + "l" + "xk":
                page.keyboard.press(key)
            page.wait_for_function("document.querySelectorAll('.card.pending').length === 0")
            page.wait_for_timeout(300)
            Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.screenshot)
            items = json.loads(urllib.request.urlopen(srv.url + "/api/items").read())["items"]
            ids = [r["item"] for r in items]
            runs = [decisions(srv.url, ids, args.decisions, 1, "keep/reject"),
                    decisions(srv.url, ids[::-1], args.decisions, 4, "keep/reject"),
                    decisions(srv.url, ids, args.decisions, 4, "caption")]
            for r in runs:
                print(f"decisions/s ({r['what']}, {r['clients']} client(s), fsync on): {r['per_second']} "
                      f"(p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms)")
            result["decisions"] = runs
            browser.close()
    finally:
        if srv is not None:
            srv.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json} and {args.screenshot}")


if __name__ == "__main__":
    main()

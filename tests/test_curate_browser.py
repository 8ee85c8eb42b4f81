"""The curation page in a real browser: Playwright driving Debian's chromium (installed by
.ci/run) against the real server, keys pressed as a person presses them, files checked on disk.
Under CI=true a missing chromium fails instead of skipping."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tasks.curate.decisions import DecisionLog
from tests.curate_kit import Server, make_project

CHROMIUM = next((p for p in ("/usr/bin/chromium", *(shutil.which(n) for n in ("chromium", "chromium-browser")))
                 if p and os.access(p, os.X_OK)), None)
ON_CI = os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")
# The flags the machine notes name: without the background-networking ones chromium keeps
# trying hosts it cannot reach.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        if ON_CI:
            pytest.fail("no chromium on PATH: .ci/run installs Debian's chromium")
        pytest.skip("no chromium on this machine")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def settled(page) -> None:
    """Every decision this tab sent is answered: no card says "saving"."""
    page.wait_for_function("document.querySelectorAll('.card.pending').length === 0", timeout=20000)


def statuses(page) -> dict[str, str]:
    return page.eval_on_selector_all(".card", "cs => Object.fromEntries(cs.map(c => [c.dataset.item, c.dataset.status]))")


def test_keys_caption_reload_and_a_second_tab(browser, tmp_path):
    root = make_project(tmp_path / "p", n_candidates=12)
    with Server(root, dest="particles") as srv:
        page = browser.new_page(viewport={"width": 1280, "height": 800})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(srv.url)
        page.wait_for_selector(".card")
        items = page.eval_on_selector_all(".card", "cs => cs.map(c => c.dataset.item)")
        assert len(items) == 12

        page.keyboard.press("k")              # keep the first, move on
        page.keyboard.press("x")              # reject the second
        page.keyboard.press("ArrowRight")     # skip the third
        page.keyboard.press("c")              # caption of the fourth, then keep it
        page.keyboard.press("End")
        page.keyboard.type(" — edited")
        page.keyboard.press("Enter")
        page.keyboard.press("k")
        settled(page)
        kept = sorted((root / "data/raw/particles").glob("*.png"))
        assert len(kept) == 2
        captions = {p.stem: p.with_suffix(".txt").read_text(encoding="utf-8") for p in kept}
        assert any(t.endswith(" — edited") for t in captions.values()), captions
        assert len(list((root / "data/raw/rejected").glob("*.png"))) == 2  # old.png + the reject

        # A burst of keypresses: every one is on disk once the page says so.
        page.keyboard.press("ArrowRight")
        for key in "kxkxkx":
            page.keyboard.press(key)
        page.keyboard.press("u")              # takes back the last reject
        settled(page)
        state = DecisionLog.at(root).state()
        decided = {i: s.status for i, s in state.items()}
        assert sum(s == "keep" for s in decided.values()) == 5
        assert sum(s == "reject" for s in decided.values()) == 3
        assert len(list((root / "data/raw/particles").glob("*.png"))) == 5
        shown = statuses(page)

        # The server killed (SIGKILL) and started again on the same port: the reloaded page shows
        # the same state, from the log, and the files are as they were.
        on_disk = sorted(p.relative_to(root).as_posix() for p in (root / "data/raw").rglob("*.png"))
        srv.kill()
        srv.start()
        page.reload()
        page.wait_for_selector(".card")
        assert statuses(page) == shown
        assert sorted(p.relative_to(root).as_posix() for p in (root / "data/raw").rglob("*.png")) == on_disk

        # A second tab sees the first one's decisions (polling), and its own are not lost.
        other = browser.new_page(viewport={"width": 1280, "height": 800})
        other.goto(srv.url)
        other.wait_for_selector(".card")
        last = items[-1]
        page.click(f'.card[data-item="{last}"]')
        page.keyboard.press("k")
        other.click(f'.card[data-item="{items[-2]}"]')
        other.keyboard.press("x")
        settled(page)
        settled(other)
        other.wait_for_selector(f'.card[data-item="{last}"][data-status="keep"]', timeout=10000)
        page.wait_for_selector(f'.card[data-item="{items[-2]}"][data-status="reject"]', timeout=10000)

        # The dataset view: the quarantine reason shows; a caption fixed in place; a later reject.
        page.keyboard.press("d")
        page.wait_for_selector(".card .quarantine")
        assert "corrupt" in page.inner_text(".card .quarantine")
        page.click('.card[data-item="raw:data/raw/photos/a.png"]')
        page.keyboard.press("c")
        page.keyboard.press("Control+a")
        page.keyboard.type("a figure, caption fixed in place")
        page.keyboard.press("Enter")
        settled(page)
        assert (root / "data/raw/photos/a.txt").read_text(encoding="utf-8") == "a figure, caption fixed in place"
        page.keyboard.press("x")
        settled(page)
        assert (root / "data/raw/rejected/photos/a.png").is_file() and not (root / "data/raw/photos/a.png").exists()
        assert (root / "data/raw/rejected/photos/a.txt").read_text(encoding="utf-8").startswith("a figure, caption")

        page.keyboard.press("z")
        assert page.is_visible("#zoom")
        page.keyboard.press("Escape")
        assert not page.is_visible("#zoom")
        page.screenshot(path=str(tmp_path / "curate.png"))
        assert (tmp_path / "curate.png").stat().st_size > 10_000
        assert errors == []

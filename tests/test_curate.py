"""Curation without a browser: the decision log, its materialisation into data/raw, and the
real server (`python -m tasks.curate serve`, its own process) under a burst, a SIGKILL, path
traversal and a second client."""
from __future__ import annotations

import http.client
import json
import threading
import urllib.request
from pathlib import Path

import pytest

from tasks.curate.decisions import DecisionError, DecisionLog
from tasks.curate.materialise import MaterialiseError, materialise_all, safe_set
from tasks.curate.server import Curation
from tests.curate_kit import Server, make_project


def files(root: Path, under: str = "") -> dict[str, bytes]:
    """Every file under root (or root/under) but the decision log, with its bytes."""
    base = root / under if under else root
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(base.rglob("*"))
            if p.is_file() and ".curate" not in p.parts}


def request(url: str, path: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """A raw HTTP request: the path goes out exactly as written (no client-side `..` folding)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    conn.request("POST" if body is not None else "GET", path, body=data, headers={**hdrs, **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        return r.status, json.loads(raw)
    except ValueError:
        return r.status, {}


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "p")


def test_the_fold_undo_and_caption_edits(tmp_path):
    log = DecisionLog(tmp_path / "d.sqlite")
    a = log.append("cand:a", "keep", dest="set1", info={"name": "a"})
    r = log.append("cand:a", "reject")
    assert log.state()["cand:a"].status == "reject"
    log.append("cand:a", "undo", undoes=r.seq)
    s = log.state()["cand:a"]
    assert (s.status, s.dest) == ("keep", "set1")  # back to the decision before
    log.append("cand:a", "undo", undoes=a.seq)
    assert log.state()["cand:a"].status == "new"
    c = log.append("cand:a", "caption", caption="first")
    log.append("cand:a", "caption", caption="second")
    assert log.state()["cand:a"].caption == "second"
    log.append("cand:a", "undo", undoes=c.seq + 1)
    assert log.state()["cand:a"].caption == "first"
    with pytest.raises(DecisionError, match="undo of"):
        log.append("cand:b", "undo", undoes=a.seq)  # another item's decision
    with pytest.raises(DecisionError, match="action"):
        log.append("cand:a", "delete")
    with pytest.raises(MaterialiseError):
        safe_set("../x")
    assert log.changed_since(c.seq) == {"cand:a"}


def test_decisions_materialise_into_data_raw_idempotently(project):
    cur = Curation(project, "particles")
    cands = cur.items("candidates")
    keep, reject, edited = cands[0], cands[1], cands[2]
    cur.decide({"item": keep["item"], "action": "caption", "caption": "a figure of joy"})
    cur.decide({"item": keep["item"], "action": "keep"})
    cur.decide({"item": reject["item"], "action": "reject"})
    cur.decide({"item": edited["item"], "action": "caption", "caption": "not kept: no file"})
    ds = {r["path"]: r for r in cur.items("dataset")}
    assert ds["data/raw/photos/broken.png"]["reason"] == "corrupt"
    cur.decide({"item": ds["data/raw/photos/a.png"]["item"], "action": "reject"})
    cur.decide({"item": ds["data/raw/photos/a.png"]["item"], "action": "caption", "caption": "fixed"})
    cur.decide({"item": ds["data/raw/rejected/old.png"]["item"], "action": "keep"})

    raw = files(project, "data/raw")
    kept = [p for p in raw if p.startswith("data/raw/particles/") and p.endswith(".png")]
    assert len(kept) == 2  # the candidate, and the old reject brought back into the set
    cand_png = next(p for p in kept if keep["item"][5:17] in p)
    assert raw[cand_png] == (project / keep["file"]).read_bytes()
    assert raw[cand_png[:-4] + ".txt"] == b"a figure of joy"
    assert (project / "data/raw/particles/old.png").is_file() and not (project / "data/raw/rejected/old.png").exists()
    assert any(p.startswith("data/raw/rejected/") and reject["item"][5:17] in p for p in raw)
    assert raw["data/raw/rejected/photos/a.png"] and raw["data/raw/rejected/photos/a.txt"] == b"fixed"
    assert raw["data/raw/rejected/photos/a.tags"] == b"1girl, solo"  # the tags follow the image
    assert "data/raw/photos/a.png" not in raw and "data/raw/photos/a.txt" not in raw
    assert "data/raw/photos/a.tags" not in raw
    assert not any(edited["item"][5:17] in p for p in raw)

    # Idempotent: materialising the whole log again (the server's start) changes nothing.
    before = files(project)
    assert materialise_all(project, cur.log) == {}
    assert files(project) == before

    # Undo everything: data/raw is back as it was, but the log keeps every decision.
    for d in reversed([d for d in cur.log.decisions() if d.action != "undo"]):
        cur.decide({"item": d.item, "action": "undo", "undoes": d.seq})
    after = files(project, "data/raw")
    assert "data/raw/photos/a.png" in after and after["data/raw/photos/a.txt"] == b"a photo of a figure"
    assert after["data/raw/photos/a.tags"] == b"1girl, solo"
    assert "data/raw/rejected/old.png" in after
    assert not any(p.startswith(("data/raw/particles/",)) for p in after)
    assert set(after) == set(files(make_project(project.parent / "fresh"), "data/raw"))
    assert len(cur.log.decisions()) == 14


def test_a_file_that_is_not_ours_is_never_overwritten(project):
    cur = Curation(project)
    c = cur.items("candidates")[0]
    name = c["info"]["name"]
    squatter = project / "data/raw/curated" / f"{name}.png"
    squatter.parent.mkdir(parents=True)
    squatter.write_bytes(b"the user's own file")
    out = cur.decide({"item": c["item"], "action": "keep"})
    assert out["error"] and "another file" in out["error"]
    assert squatter.read_bytes() == b"the user's own file"
    assert cur.log.state()[c["item"]].status == "keep"  # recorded all the same: nothing is lost


def test_a_burst_then_sigkill_loses_no_acknowledged_decision(project):
    srv = Server(project).start()
    try:
        _, listing = request(srv.url, "/api/items?view=candidates")
        items = [r["item"] for r in listing["items"]]
        acked: list[tuple[int, str, str]] = []
        stop = threading.Event()

        def burst(worker: int) -> None:
            n = 0
            while not stop.is_set():
                item = items[(n + worker) % len(items)]
                action = "keep" if (n + worker) % 2 else "reject"
                try:
                    status, out = request(srv.url, "/api/decide", {"item": item, "action": action,
                                                                    "client": f"tab{worker}"})
                except OSError:
                    return  # the server died mid-request: that decision was never acknowledged
                if status == 200:
                    acked.append((out["seq"], item, action))
                n += 1

        threads = [threading.Thread(target=burst, args=(w,)) for w in range(4)]
        for t in threads:
            t.start()
        while len(acked) < 40:
            threading.Event().wait(0.01)
        srv.kill()  # SIGKILL, mid-burst
        stop.set()
        for t in threads:
            t.join()
    finally:
        srv.kill()
    log = DecisionLog.at(project)
    logged = {(d.seq, d.item, d.action) for d in log.decisions()}
    assert set(acked) <= logged, set(acked) - logged
    last = {}
    for seq, item, action in sorted(logged):
        last[item] = action
    log.close()
    with Server(project) as again:  # the restart materialises; the page shows the same state
        _, listing = request(again.url, "/api/items?view=candidates")
        assert {r["item"]: r["status"] for r in listing["items"] if r["item"] in last} == last
        once = files(project)
    with Server(project):
        assert files(project) == once  # materialisation is idempotent across restarts
    kept = {p for p in once if p.startswith("data/raw/curated/") and p.endswith(".png")}
    rejected = {p for p in once if p.startswith(("data/raw/rejected/joy-", "data/raw/rejected/love-"))}
    assert len(kept) == sum(a == "keep" for a in last.values())
    assert len(rejected) == sum(a == "reject" for a in last.values())
    assert len(acked) >= 40


def test_only_data_and_runs_are_served_and_nothing_outside_data_raw_is_written(project):
    before = files(project)
    with Server(project) as srv:
        for path in ("/files/../secret.txt", "/files/data/../secret.txt", "/files/%2e%2e/secret.txt",
                     "/files/data/%2e%2e/secret.txt", "/files/data/raw/.curate/decisions.sqlite",
                     "/files//etc/passwd", "/files/%2Fetc%2Fpasswd", "/thumb/../secret.txt",
                     "/files/params.yaml", "/static/../server.py"):
            status, _ = request(srv.url, path)
            assert status == 404, path
        (project / "data/raw/link.png").symlink_to(project / "secret.txt")
        assert request(srv.url, "/files/data/raw/link.png")[0] == 404  # a link pointing out
        assert request(srv.url, "/files/runs/sdxl/sweep.png")[0] == 200
        assert request(srv.url, "/thumb/data/raw/photos/b.png?w=64")[0] == 200
        # Decisions: a JSON POST from this page only; a cross-site form or another origin is refused.
        _, listing = request(srv.url, "/api/items?view=candidates")
        item = listing["items"][0]["item"]
        assert request(srv.url, "/api/decide", {"item": item, "action": "keep"},
                       headers={"Origin": "http://evil.example"})[0] == 403
        conn = http.client.HTTPConnection("127.0.0.1", srv.port)
        conn.request("POST", "/api/decide", body="item=x", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert conn.getresponse().status == 415
        assert request(srv.url, "/api/items", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding
        assert request(srv.url, "/api/decide", {"item": "cand:nope", "action": "keep"})[0] == 404
        assert request(srv.url, "/api/decide", {"item": item, "action": "keep", "set": "../../etc"})[0] == 400
        assert request(srv.url, "/api/decide", {"item": item, "action": "keep"})[0] == 200
    (project / "data/raw/link.png").unlink()
    after = files(project)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert changed and all(p.startswith("data/raw/") for p in changed), changed


def test_a_second_client_sees_the_first_ones_decisions(project):
    with Server(project) as srv:
        _, a = request(srv.url, "/api/items?view=candidates")
        seq0 = a["seq"]
        one, two = a["items"][0]["item"], a["items"][1]["item"]
        request(srv.url, "/api/decide", {"item": one, "action": "keep", "client": "tab-a"})
        request(srv.url, "/api/decide", {"item": two, "action": "reject", "client": "tab-b"})
        _, changes = request(srv.url, f"/api/changes?since={seq0}")
        assert {u["item"]: u["status"] for u in changes["updates"]} == {one: "keep", two: "reject"}
        _, stats = request(srv.url, "/api/stats")
        assert stats["overall"]["seen"] == 2 and stats["overall"]["hit_rate"] == 0.5
        assert set(stats["template"]) <= {"particle", "figure"}


def test_stats_are_written_as_a_dvc_metric(project, monkeypatch):
    from tasks.curate.library import write_stats

    cur = Curation(project)
    c = cur.items("candidates")
    for r, action in zip(c, ["keep", "reject", "reject", "reject"]):
        cur.decide({"item": r["item"], "action": action})
    cur.log.close()
    monkeypatch.chdir(project)
    stats = write_stats(project)
    metric = json.loads((project / "metrics/curate.json").read_text())
    assert metric == {"kept": 1, "rejected": 3, "seen": 4, "undecided": len(c) - 4, "hit_rate": 0.25}
    details = json.loads((project / "metrics/curate.details.json").read_text())
    assert details == stats and sum(v["seen"] for v in details["template"].values()) == 4

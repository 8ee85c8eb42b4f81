"""The curation page's server: FastAPI on 127.0.0.1, one process, plain HTML/JS (static/).

    python -m tasks.curate serve [--port 8765] [--set curated]     (make curate)

Safe by default:
- it binds 127.0.0.1 and answers only requests addressed to this machine's names (a DNS
  rebinding page cannot reach it); a decision must be a JSON POST (a cross-site form cannot
  send one without a CORS preflight, which is never granted) from no origin or this one;
- it serves files under data/ and runs/ only, hidden files never (the decision log is one):
  anything else, `..` and links pointing out included, is a 404;
- a request writes only under data/raw: the decision log (data/raw/.curate/) and what
  materialising it puts there. A decision is committed (fsync'ed) before the answer says done.

Decisions are appended and materialised one at a time (a lock): the log's order is the
order the files were changed in, and two tabs deciding on one item cannot interleave.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

import anyio
# At the top, not in make_app: FastAPI reads the routes' annotations (strings, under
# `from __future__ import annotations`) in this module's globals.
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tasks.curate import library
from tasks.curate.decisions import DecisionError, DecisionLog, ItemState
from tasks.curate.materialise import MaterialiseError, materialise, materialise_all, places, safe_set
from tasks.curate.tables import CANDIDATES_STORE
from tasks.curate.thumbs import THUMB_WIDTH, thumb_of, thumbnail

log = logging.getLogger("niche.curate")

STATIC = Path(__file__).with_name("static")
SERVED_ROOTS = ("data", "runs")
VIEWS = ("candidates", "dataset")
THUMB_CACHE = 4096  # thumbnails kept in memory (never written to disk: no request writes outside data/raw)


class Curation:
    """The state behind the routes: the log, the listing index, the thumbnail cache."""

    def __init__(self, root: Path, dest: str = "curated", caption_ext: str = ".txt"):
        self.root = Path(root).resolve()
        self.dest = safe_set(dest)
        self.ext = caption_ext
        self.log = DecisionLog.at(self.root)
        self.lock = threading.Lock()
        self.index: dict[str, dict] = {}  # item -> its info (what a decision on it records)
        self.thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self.failed: dict[str, str] = {}
        self.renders = (self.root / CANDIDATES_STORE).resolve()  # where the stage's thumbnails are

    def start(self) -> None:
        """Materialise everything the log says (a server killed mid-write finishes here)."""
        t0 = time.perf_counter()
        self.failed = materialise_all(self.root, self.log, self.ext)
        # Both listings once now: the first read of a table pays pyarrow's one-time set-up
        # (~0.3 s) here, not in the page's first request; it also fills the index.
        for view in VIEWS:
            self.items(view)
        log.info("curate: %d decisions materialised, listings ready in %.2fs (%d items could not be "
                 "materialised)", self.log.last_seq(), time.perf_counter() - t0, len(self.failed))

    def items(self, view: str) -> list[dict]:
        state = self.log.state()
        rows = library.candidates(self.root, state) if view == "candidates" else \
            library.dataset(self.root, state, self.ext)
        for r in rows:
            self.index[r["item"]] = r["info"]
        return rows

    def info_of(self, item: str) -> dict:
        if item not in self.index:  # a new render or a new file since the page loaded
            self.items("candidates")
            self.items("dataset")
        if item not in self.index:
            raise KeyError(item)
        return self.index[item]

    def update(self, s: ItemState) -> dict:
        """What a page needs to redraw one item after a decision (its own or another tab's)."""
        try:
            target = places(s).target
        except (KeyError, ValueError):
            target = None
        if s.item.startswith("cand:"):
            caption = s.caption if s.caption is not None else s.info.get("prompt", "")
        else:
            caption = _read_text((self.root / target).with_suffix(self.ext)) if target else ""
        return {"item": s.item, "status": s.status, "set": s.dest, "caption": caption,
                "path": target.as_posix() if target else None, "seq": s.seq}

    def decide(self, body: dict) -> dict:
        item, action = str(body.get("item") or ""), str(body.get("action") or "")
        with self.lock:
            info = dict(self.info_of(item))
            state = self.log.state({item}).get(item)
            if state and "caption_before" in state.info:
                info.pop("caption_before", None)  # the text before the FIRST edit stays the one restored
            dest = safe_set(body.get("set") or self.dest) if action == "keep" else None
            caption = body.get("caption")
            if caption is not None and not isinstance(caption, str):
                raise DecisionError("caption: expected a string")
            undoes = body.get("undoes")
            if action == "undo" and (not isinstance(undoes, int) or isinstance(undoes, bool)):
                raise DecisionError("undo: expected the number of the decision it takes back (undoes)")
            d = self.log.append(item, action, caption=caption, dest=dest, undoes=undoes,
                                client=str(body.get("client") or "")[:64] or None, info=info)
            s = self.log.state({item})[item]
            error = None
            try:
                materialise(self.root, s, self.ext)
                self.failed.pop(item, None)
            except (MaterialiseError, OSError) as e:
                error = self.failed[item] = str(e)
                log.warning("curate: %s: recorded as #%d but not materialised: %s", item, d.seq, e)
        return {"seq": d.seq, "update": self.update(s), "error": error}

    def changes(self, since: int) -> dict:
        seq = self.log.last_seq()
        items = self.log.changed_since(since)
        state = self.log.state(items) if items else {}
        return {"seq": seq, "updates": [self.update(s) for s in state.values()]}

    def stats(self) -> dict:
        state = self.log.state()
        return library.hit_rate(state, library.candidates(self.root, state))

    def file(self, rel: str) -> Path | None:
        """The file under data/ or runs/ that `rel` names, or None: outside, hidden, or missing."""
        if not rel or "\x00" in rel or "\\" in rel:
            return None
        try:
            path = (self.root / rel).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        for base in SERVED_ROOTS:
            b = (self.root / base).resolve()
            if path.is_relative_to(b) and path.is_file():
                if any(part.startswith(".") for part in path.relative_to(b).parts):
                    return None
                return path
        return None

    def thumb(self, path: Path, width: int) -> Path | bytes:
        """The candidates stage's thumbnail when there is one and it is big enough, else one
        scaled now and kept in memory."""
        made = thumb_of(path)
        if width <= THUMB_WIDTH and path.is_relative_to(self.renders) and made.is_file():
            return made
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size, width)
        if key in self.thumbs:
            self.thumbs.move_to_end(key)
            return self.thumbs[key]
        data = self.thumbs[key] = thumbnail(path, width)
        if len(self.thumbs) > THUMB_CACHE:
            self.thumbs.popitem(last=False)
        return data


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def make_app(root: Path, dest: str = "curated", caption_ext: str = ".txt", hosts: tuple[str, ...] = ()):
    cur = Curation(root, dest, caption_ext)

    @asynccontextmanager
    async def lifespan(app):
        cur.start()
        yield
        cur.log.close()

    app = FastAPI(title="Niche curation", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.curation = cur
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]", *hosts])

    def not_found() -> HTTPException:
        return HTTPException(status_code=404, detail="not found")

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse((STATIC / "page.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-store"})

    @app.get("/static/{name}")
    def static(name: str):
        if name not in ("page.js", "page.css"):
            raise not_found()
        return FileResponse(STATIC / name, headers={"Cache-Control": "no-store"})

    @app.get("/api/items")
    def items(view: str = "candidates"):
        if view not in VIEWS:
            raise HTTPException(status_code=400, detail=f"view {view!r}: expected candidates or dataset")
        seq = cur.log.last_seq()  # before the listing: a decision made meanwhile comes again as a change
        rows = cur.items(view)
        for r in rows:
            r.pop("info", None)
        # A JSONResponse straight away: FastAPI's encoder walks 1,000 rows in ~60 ms, json in ~7.
        stats = library.hit_rate(cur.log.state(), rows) if view == "candidates" else None
        return JSONResponse({"view": view, "items": rows, "seq": seq, "set": cur.dest, "failed": cur.failed,
                             "root": str(cur.root), "stats": stats})

    @app.get("/api/changes")
    def changes(since: int = 0):
        return cur.changes(since)

    @app.get("/api/stats")
    def stats():
        return cur.stats()

    @app.post("/api/decide")
    async def decide(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return JSONResponse({"error": "expected a JSON body (Content-Type: application/json)"}, status_code=415)
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            return JSONResponse({"error": f"origin {origin} is not this page"}, status_code=403)
        try:
            body = await request.json()
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "expected a JSON object"}, status_code=400)
        try:
            return await anyio.to_thread.run_sync(cur.decide, body)
        except KeyError:
            return JSONResponse({"error": f"unknown item {body.get('item')!r}"}, status_code=404)
        except (DecisionError, MaterialiseError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    @app.get("/files/{rel:path}")
    def files(rel: str):
        path = cur.file(rel)
        if path is None:
            raise not_found()
        return FileResponse(path)

    @app.get("/thumb/{rel:path}")
    def thumb(rel: str, w: int = 320):
        path = cur.file(rel)
        if path is None:
            raise not_found()
        try:
            data = cur.thumb(path, max(32, min(int(w), 1024)))
        except OSError as e:  # not an image (a quarantined file): the page shows its reason instead
            raise HTTPException(status_code=415, detail=f"{rel}: not a readable image ({e})") from None
        # Revalidated every time: a path can hold another image after a move back (cheap: memory cache).
        headers = {"Cache-Control": "no-cache"}
        if isinstance(data, Path):
            return FileResponse(data, media_type="image/jpeg", headers=headers)
        return Response(data, media_type="image/jpeg", headers=headers)

    return app

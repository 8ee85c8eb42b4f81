"""The curator's decision log: every keep, reject, caption edit and undo, appended to SQLite
in WAL mode with synchronous=FULL, so a decision is on disk (fsync'ed) before the page is told
it is done. The log is the record; the files in data/raw are derived from it
(tasks/curate/materialise.py) and can always be derived again.

Why SQLite and not a JSONL: two tabs (two request threads) append at once, the page asks
"what changed since decision N" every second, and a torn last line after a SIGKILL needs no
repair code: a transaction is there whole or not at all.

An item is `cand:<render key>` (a candidate) or `raw:<path>` (a dataset file, named by where
it was when first decided on). Its state is the fold of its decisions in order, skipping the
undone ones: the last keep/reject is its status, the last caption edit its caption.
"""
from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ACTIONS = ("keep", "reject", "caption", "undo")
LOG_DIR = Path("data/raw/.curate")  # inside data/raw: no request writes outside it (.dvcignore'd)
LOG_NAME = "decisions.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    item    TEXT NOT NULL,
    action  TEXT NOT NULL CHECK (action IN ('keep', 'reject', 'caption', 'undo')),
    caption TEXT,
    dest    TEXT,      -- keep: the set (data/raw/<set>/) it goes to
    undoes  INTEGER,   -- undo: the seq it takes back
    client  TEXT,      -- which tab
    info    TEXT       -- JSON: what materialising needs (a candidate's file, prompt, name...)
);
CREATE INDEX IF NOT EXISTS decisions_item ON decisions (item);
"""


class DecisionError(ValueError):
    """A decision that cannot be recorded (unknown action, undo of nothing); the message says why."""


@dataclass(frozen=True)
class Decision:
    seq: int
    at: float
    item: str
    action: str
    caption: str | None = None
    dest: str | None = None
    undoes: int | None = None
    client: str | None = None
    info: dict = field(default_factory=dict)


@dataclass
class ItemState:
    item: str
    status: str = "new"  # new | keep | reject
    dest: str | None = None  # keep: the set
    caption: str | None = None  # the last caption edit; None: never edited
    info: dict = field(default_factory=dict)
    sets: set[str] = field(default_factory=set)  # every set it was ever kept into (places to clean up)
    seq: int = 0  # its latest decision (undos included)


class DecisionLog:
    """One SQLite file; safe to share between the server's request threads."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsync'ed at every commit (NORMAL would only sync at checkpoints, and a
        # power cut could take back the last decisions the page already showed as done).
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    @classmethod
    def at(cls, root: Path) -> "DecisionLog":
        return cls(Path(root) / LOG_DIR / LOG_NAME)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def append(self, item: str, action: str, *, caption: str | None = None, dest: str | None = None,
               undoes: int | None = None, client: str | None = None, info: dict | None = None) -> Decision:
        """Record one decision durably (one fsync'ed transaction) and return it with its seq."""
        if action not in ACTIONS:
            raise DecisionError(f"action {action!r}: expected one of {', '.join(ACTIONS)}")
        if not item or not item.startswith(("cand:", "raw:")):
            raise DecisionError(f"item {item!r}: expected cand:<key> or raw:<path>")
        if action == "caption" and caption is None:
            raise DecisionError("a caption edit needs the caption's text")
        if action == "keep" and not dest:
            raise DecisionError("a keep needs the set (data/raw/<set>/) it goes to")
        at = time.time()
        blob = json.dumps(info, sort_keys=True, ensure_ascii=False) if info else None
        with self._lock:
            if action == "undo":
                row = self._db.execute("SELECT item, action FROM decisions WHERE seq = ?", (undoes,)).fetchone()
                if row is None or row[1] == "undo" or row[0] != item:
                    raise DecisionError(f"undo of {undoes!r}: no keep, reject or caption edit of {item} with "
                                        f"that number")
            cur = self._db.execute(
                "INSERT INTO decisions (at, item, action, caption, dest, undoes, client, info) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (at, item, action, caption, dest, undoes, client, blob))
            seq = cur.lastrowid
        return Decision(seq, at, item, action, caption, dest, undoes, client, info or {})

    def decisions(self, item: str | None = None, since: int = 0, items: set[str] | None = None) -> list[Decision]:
        q = "SELECT seq, at, item, action, caption, dest, undoes, client, info FROM decisions WHERE seq > ?"
        args: tuple = (since,)
        if item is not None:
            items = {item}
        if items is not None:  # the index on item: a decision costs the same with 10 or 100,000 before it
            q += f" AND item IN ({', '.join('?' * len(items))})"
            args += tuple(sorted(items))
        with self._lock:
            rows = self._db.execute(q + " ORDER BY seq", args).fetchall()
        return [Decision(*r[:8], info=json.loads(r[8]) if r[8] else {}) for r in rows]

    def last_seq(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM decisions").fetchone()[0]

    def changed_since(self, seq: int) -> set[str]:
        """Items with a decision after `seq` (what another tab needs to redraw)."""
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT DISTINCT item FROM decisions WHERE seq > ?", (seq,))}

    def state(self, items: set[str] | None = None) -> dict[str, ItemState]:
        """Every item's (or only `items`') state: the fold of its decisions, undone ones skipped."""
        out: dict[str, ItemState] = {}
        # An undo is always of its own item's decision, so an item's rows alone give its state.
        ds = self.decisions() if items is None else [d for chunk in _chunks(sorted(items), 500)
                                                      for d in self.decisions(items=set(chunk))]
        ds.sort(key=lambda d: d.seq)
        undone = {d.undoes for d in ds if d.action == "undo"}
        for d in ds:
            s = out.setdefault(d.item, ItemState(d.item))
            s.seq = d.seq
            if d.info:
                s.info = {**s.info, **d.info}
            if d.action == "keep" and d.dest:
                s.sets.add(d.dest)
            if d.seq in undone or d.action == "undo":
                continue
            if d.action in ("keep", "reject"):
                s.status, s.dest = d.action, d.dest
            elif d.action == "caption":
                s.caption = d.caption
        # Undone decisions never enter the fold, so an item whose every keep/reject was undone
        # is back to "new", and one whose last was undone is back to the one before.
        return out


def _chunks(xs: list, n: int):
    """SQLite binds at most ~32,000 parameters per statement: ask for items in chunks."""
    for i in range(0, len(xs), n):
        yield xs[i:i + n]

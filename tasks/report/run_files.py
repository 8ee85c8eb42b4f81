"""Reading a training run's folder for its report (tasks/report/page.py): dvclive's series, the
newest checkpoint's settings, the validation history and newest step, images as data URIs.
Anything unreadable is logged and left out; the page says so instead of crashing.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from tasks.report.chart import Series, esc

log = logging.getLogger("niche.report")

STEP_RE = re.compile(r"^step-(\d+)$")


# ---------------------------------------------------------------- reading the run folder

def _float(s: Any) -> float | None:
    try:
        v = float(s)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Rows of a tab-separated file with a header; [] when it is missing or empty."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f, delimiter="\t") if row]


def read_series(path: Path) -> tuple[list[float], list[float]]:
    """(steps, values) of a dvclive TSV (`step\\t<name>`, maybe with a timestamp column);
    rows whose step or value is not a finite number are left out."""
    rows = read_tsv(path)
    if not rows:
        return [], []
    cols = list(rows[0].keys())
    value_col = path.stem if path.stem in cols else next(
        (c for c in reversed(cols) if c not in ("step", "timestamp")), None)
    if value_col is None or "step" not in cols:
        return [], []
    xs, ys = [], []
    for r in rows:
        x, y = _float(r.get("step")), _float(r.get(value_col))
        if x is not None and y is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def step_entries(folder: Path, suffix: str = "") -> list[tuple[int, Path]]:
    """(step, path) of the `step-NNNNNN<suffix>` entries in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    out = []
    for p in folder.iterdir():
        name = p.name[:-len(suffix)] if suffix and p.name.endswith(suffix) else (None if suffix else p.name)
        m = STEP_RE.match(name) if name else None
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {prefix: doc} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in doc.items():
        out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


# ---------------------------------------------------------------- images

def data_uri(path: Path, max_width: int) -> tuple[str, int, int]:
    """The image as a data URI no wider than max_width: PNG or JPEG, whichever is smaller."""
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P", "PA"):
            im = im.convert("RGBA")
            sheet = Image.new("RGB", im.size, "white")
            sheet.paste(im, mask=im.getchannel("A"))
            im = sheet
        elif im.mode not in ("RGB", "L"):
            im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, max(1, round(im.height * max_width / im.width))), Image.Resampling.LANCZOS)
        best = None
        for fmt_name, kwargs in (("png", {}), ("jpeg", {"quality": 88})):
            buf = io.BytesIO()
            im.save(buf, format=fmt_name.upper(), **kwargs)
            if best is None or buf.tell() < len(best[1]):
                best = (fmt_name, buf.getvalue())
        fmt_name, data = best
        return f"data:image/{fmt_name};base64,{base64.b64encode(data).decode('ascii')}", im.width, im.height


def figure(path: Path, caption: str, max_width: int, cls: str = "") -> str:
    uri, w, h = data_uri(path, max_width)
    return (f'<figure class="{cls}"><img src="{uri}" width="{w}" height="{h}" alt="{esc(caption)}">'
            f'<figcaption>{esc(caption)}</figcaption></figure>')



@dataclass
class Run:
    dir: Path
    metrics_dir: Path
    summary: dict
    meta: dict | None
    meta_step: int | None
    history: list[dict[str, str]]
    validation_dir: Path | None     # the newest validation/step-* with metrics.json (else with PNGs)
    validation: dict | None

    @classmethod
    def load(cls, run_dir: Path) -> "Run":
        def guarded(what: str, fn: Callable[[], Any], default: Any) -> Any:
            try:
                return fn()
            except Exception as e:  # a half-written or malformed file is a note, not a crash
                log.warning("run report: cannot read %s: %s", what, e)
                return default

        summary = guarded("live/metrics.json", lambda: read_json(run_dir / "live" / "metrics.json"), None)
        ckpts = [(s, p) for s, p in step_entries(run_dir / "checkpoints") if (p / "meta.json").is_file()]
        meta, meta_step = None, None
        if ckpts:
            meta_step = ckpts[-1][0]
            meta = guarded("checkpoint meta.json", lambda: read_json(ckpts[-1][1] / "meta.json"), None)
        history = guarded("validation/history.tsv", lambda: read_tsv(run_dir / "validation" / "history.tsv"), [])
        vdirs = [p for _, p in step_entries(run_dir / "validation") if p.is_dir()]
        with_metrics = [p for p in vdirs if (p / "metrics.json").is_file()]
        with_pngs = [p for p in vdirs if any(p.glob("*.png"))]
        vdir = with_metrics[-1] if with_metrics else (with_pngs[-1] if with_pngs else None)
        validation = None
        if vdir is not None and (vdir / "metrics.json").is_file():
            validation = guarded(f"{vdir.name}/metrics.json", lambda: read_json(vdir / "metrics.json"), None)
        return cls(run_dir, run_dir / "live" / "plots" / "metrics", summary if isinstance(summary, dict) else {},
                   meta if isinstance(meta, dict) else None, meta_step, history, vdir,
                   validation if isinstance(validation, dict) else None)

    def series(self, rel: str, name: str | None = None, **kw: Any) -> Series:
        xs, ys = read_series(self.metrics_dir / rel)
        return Series(name or Path(rel).stem, xs, ys, **kw)

    @property
    def params(self) -> dict:
        p = (self.meta or {}).get("params")
        return p if isinstance(p, dict) else {}

    def newest_step(self) -> int | None:
        candidates = []
        if isinstance(self.summary.get("step"), (int, float)):
            candidates.append(int(self.summary["step"]))
        xs, _ = read_series(self.metrics_dir / "train" / "loss.tsv")
        if xs:
            candidates.append(int(max(xs)))
        if self.meta_step is not None:
            candidates.append(self.meta_step)
        return max(candidates) if candidates else None

    def not_comparable_steps(self) -> list[str]:
        steps = [r.get("step", "?") for r in self.history
                 if str(r.get("comparable", "")).strip().lower() in ("false", "0", "no")]
        lp = (self.validation or {}).get("lpips")
        if isinstance(lp, dict) and lp.get("comparable") is False:
            s = str(self.validation.get("step", self.validation_dir.name if self.validation_dir else "?"))
            if s not in steps:
                steps.append(s)
        return steps

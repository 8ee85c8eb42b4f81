"""One self-contained HTML page per training run: the page a person opens to see how it goes
(the reading is tasks/report/run_files.py, the charts tasks/report/chart.py). See
tasks/run_report.py for what it shows and `python -m tasks.run_report`.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from tasks.core.store import atomic_write
from tasks.report.chart import PALETTE, Series, esc, fmt, note, svg_chart
from tasks.report.run_files import Run, _flatten, _float, figure, step_entries

log = logging.getLogger("niche.report")

LPIPS_TESTS = ("reconstruction", "dino_swap", "text_manipulation", "cfg_divergence")
HIGHER_IS_BETTER = frozenset({"text_manipulation", "cfg_divergence"})  # as tasks/report/suite.py (no torch here)
SETTINGS = ("preset", "steps", "lr", "optimizer", "tread", "repa", "image_scale")
MORE_SETTINGS = ("batch_size", "grad_accum", "min_lr", "warmup_steps", "repa_weight", "tread_rate", "seed")
LATEST_WIDTH, THUMB_WIDTH, EARLIER_SAMPLES = 1024, 320, 6
WIDE, SMALL = {"width": 1170, "height": 380}, {"width": 285, "height": 210}


def section_header(run: Run) -> str:
    step = run.newest_step()
    total = run.params.get("steps")
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    progress = ""
    if step is not None and isinstance(total, (int, float)) and total > 0:
        pct = max(0.0, min(100.0, 100.0 * step / total))
        progress = (f'<div class="progress" title="{pct:.1f}%"><div style="width:{pct:.2f}%"></div></div>'
                    f'<span class="muted">{fmt(step)} / {fmt(int(total))} steps ({pct:.1f}%)</span>')
    step_txt = fmt(step) if step is not None else "none yet"
    chips = []
    flat = _flatten({k: v for k, v in run.summary.items() if k != "step"})
    for k, v in flat.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            chips.append(f'<span class="chip"><b>{esc(k)}</b> {esc(fmt(v))}</span>')
    latest = ('<div class="chips">' + "".join(chips) + "</div>") if chips else note(
        "No metrics yet (live/metrics.json not found).")
    return (f'<header><h1>{esc(run.dir.resolve().name)}</h1>'
            f'<div class="meta"><span>newest step <b>{esc(step_txt)}</b></span>'
            f'<span>generated {esc(now)}</span><span class="muted">{esc(str(run.dir))}</span></div>'
            f'{progress}{latest}</header>')


def banner(run: Run) -> str:
    steps = run.not_comparable_steps()
    if not steps:
        return ""
    lp = (run.validation or {}).get("lpips")
    label = lp.get("label") if isinstance(lp, dict) else None
    which = f" (validated step{'s' if len(steps) > 1 else ''} {', '.join(steps)})"
    lab = f" Backbone: {esc(label)}." if label else ""
    some = "The" if len(steps) >= len(run.history) else "Some"
    return (f'<div class="banner" role="alert"><b>LPIPS not comparable.</b> {some} LPIPS numbers on this page'
            f'{esc(which)} were computed with a random (untrained) backbone: they are not comparable with '
            f'other runs or published LPIPS values, only loosely with each other.{lab}</div>')


def section_settings(run: Run) -> str:
    p = run.params
    if not p:
        return note("No checkpoint yet (checkpoints/step-*/meta.json not found): settings unknown.")
    cells = []
    for k in SETTINGS + MORE_SETTINGS:
        if k in p:
            cells.append(f'<div class="kv"><span>{esc(k)}</span><b>{esc(fmt(p[k]))}</b></div>')
    if run.meta and "world_size" in run.meta:
        cells.append(f'<div class="kv"><span>world_size</span><b>{esc(fmt(run.meta["world_size"]))}</b></div>')
    rest = "".join(f"<tr><td>{esc(k)}</td><td>{esc(json.dumps(v))}</td></tr>" for k, v in sorted(p.items()))
    return (f'<p class="muted">From checkpoint step-{run.meta_step:06d}.</p><div class="kvs">{"".join(cells)}</div>'
            f'<details><summary>all {len(p)} parameters</summary><table class="params">{rest}</table></details>')


def section_training(run: Run) -> str:
    loss = svg_chart("Loss", [run.series("train/loss.tsv"), run.series("train/mse.tsv"),
                              run.series("train/repa_loss.tsv")], y_label="loss", **WIDE)
    if loss.startswith('<p class="note">'):
        return note("No training metrics yet (live/plots/metrics/train/loss.tsv not found).")
    lr = svg_chart("Learning rate", [run.series("train/lr.tsv")], y_label="lr", log_y=False)
    gn = svg_chart("Gradient norm", [run.series("train/grad_norm.tsv", color=PALETTE[3])], y_label="norm")
    others = [svg_chart("Velocity RMS", [run.series("train/velocity_rms.tsv", "rms", color=PALETTE[4])], **SMALL),
              svg_chart("Throughput", [run.series("sys/samples_per_s.tsv", "samples/s", color=PALETTE[2])],
                        log_y=False, **SMALL),
              svg_chart("Peak memory", [run.series("memory/peak_gb.tsv", "GB", color=PALETTE[5])],
                        log_y=False, **SMALL),
              svg_chart("Skipped steps", [run.series("train/skipped_steps.tsv", "total", color=PALETTE[1])],
                        log_y=False, **SMALL)]
    return (f'<div class="wide">{loss}</div><div class="grid2">{lr}{gn}</div>'
            f'<div class="grid4">{"".join(others)}</div>')


def validation_tests(validation: dict | None) -> dict[str, dict]:
    """The per-test statistics of a validation metrics.json, in the suite's order: tasks/validate.py
    nests them under "tests"; a flat file has them at the top level."""
    doc = validation or {}
    src = doc["tests"] if isinstance(doc.get("tests"), dict) else doc
    found = {k: v for k, v in src.items() if isinstance(v, dict) and "mean" in v}
    return {k: found[k] for k in sorted(found, key=lambda k: (k not in LPIPS_TESTS,
                                                               LPIPS_TESTS.index(k) if k in LPIPS_TESTS else 0, k))}


def section_validation(run: Run) -> str:
    parts = []
    if run.history:
        cols = [c for c in run.history[0].keys() if c and c.endswith("_lpips")]
        series = []
        for i, c in enumerate(cols):
            xs, ys = [], []
            for r in run.history:
                x, y = _float(r.get("step")), _float(r.get(c))
                if x is not None and y is not None:
                    xs.append(x)
                    ys.append(y)
            series.append(Series(c[: -len("_lpips")], xs, ys, PALETTE[i % len(PALETTE)]))
        if "reconstruction_p90" in run.history[0]:
            xs, ys = [], []
            for r in run.history:
                x, y = _float(r.get("step")), _float(r.get("reconstruction_p90"))
                if x is not None and y is not None:
                    xs.append(x)
                    ys.append(y)
            series.append(Series("reconstruction p90", xs, ys, PALETTE[0], dashed=True))
        title = "LPIPS per validation" + (" (not comparable)" if run.not_comparable_steps() else "")
        parts.append(f'<div class="wide">{svg_chart(title, series, y_label="LPIPS", log_y=False, **WIDE)}</div>')
    else:
        parts.append(note("No validation yet (validation/history.tsv not found)."))

    v = run.validation
    if v is not None:
        step = v.get("step", run.validation_dir.name if run.validation_dir else "?")
        lp = v.get("lpips") if isinstance(v.get("lpips"), dict) else {}
        head = f"<h3>Latest validation: step {esc(fmt(step))}</h3>"
        context = [f"{k} {fmt(v[k])}" for k in ("checkpoint", "split", "samples", "weights") if k in v]
        if lp.get("label"):
            comp = lp.get("comparable")
            tag = ('<span class="tag bad">random backbone</span>' if comp is False
                   else '<span class="tag ok">comparable</span>' if comp is True else "")
            context.append(f"LPIPS {lp['label']}")
        else:
            tag = ""
        if context:
            head += f'<p class="muted">{esc(" · ".join(context))} {tag}</p>'
        tests = validation_tests(v)
        cols = ["n", "mean", "p50", "p90", "max"] + (["skipped"] if any("skipped" in t for t in tests.values()) else [])
        rows = []
        for name, st in tests.items():
            better = "higher" if name in HIGHER_IS_BETTER else "lower"
            rows.append(f"<tr><td>{esc(name)}</td>" + "".join(
                f'<td class="num">{esc(fmt(st.get(k)))}</td>' for k in cols) + f'<td class="muted">{better}</td></tr>')
        table = ('<table class="stats"><thead><tr><th>test</th>' + "".join(f"<th>{c}</th>" for c in cols)
                 + f'<th>better</th></tr></thead><tbody>{"".join(rows)}</tbody></table>') if rows else note(
            "The latest validation has no per-test statistics.")
        alarms, flags = ([x for x in ([v[k]] if isinstance(v.get(k), str) else v.get(k) or []) if str(x).strip()]
                         for k in ("alarms", "flags"))
        boxes = []
        boxes.append(f'<div class="box alarm"><b>Alarms ({len(alarms)})</b><ul>'
                     + "".join(f"<li>{esc(a)}</li>" for a in alarms) + "</ul></div>" if alarms
                     else '<div class="box okbox"><b>No alarms.</b></div>')
        boxes.append(f'<div class="box flag"><b>Flags ({len(flags)})</b><ul>'
                     + "".join(f"<li>{esc(f)}</li>" for f in flags) + "</ul></div>" if flags
                     else '<div class="box okbox"><b>No flags.</b></div>')
        parts.append(head + f'<div class="valrow">{table}<div class="boxes">{"".join(boxes)}</div></div>')
    elif run.history:
        parts.append(note("No validation/step-*/metrics.json yet: no per-test statistics."))
    return "".join(parts)


def section_samples(run: Run) -> str:
    samples = [(s, p) for s, p in step_entries(run.dir / "samples", ".png") if p.is_file()]
    if not samples:
        return note("No samples yet (samples/step-*.png not found).")
    (step, latest), earlier = samples[-1], samples[:-1]
    out = ['<p class="muted">Top row: the conditioning images; bottom row: the EMA model\'s samples.</p>',
           figure(latest, f"step {step:,} (latest)", LATEST_WIDTH, "latest")]
    if len(earlier) > EARLIER_SAMPLES:  # evenly spaced, the oldest and the one before the latest included
        idx = sorted({round(i * (len(earlier) - 1) / (EARLIER_SAMPLES - 1)) for i in range(EARLIER_SAMPLES)})
        earlier = [earlier[i] for i in idx]
    if earlier:
        out.append(f"<h3>Earlier ({len(earlier)} of {len(samples) - 1})</h3><div class='thumbs'>")
        out.extend(figure(p, f"step {s:,}", THUMB_WIDTH, "thumb") for s, p in reversed(earlier))
        out.append("</div>")
    return "".join(out)


def section_validation_grids(run: Run) -> str:
    vdir = run.validation_dir
    pngs = sorted(vdir.glob("*.png")) if vdir else []
    if not pngs:
        return note("No validation grids yet (validation/step-*/*.png not found).")
    order = {t: i for i, t in enumerate(LPIPS_TESTS)}
    pngs.sort(key=lambda p: (order.get(p.stem, len(order)), p.stem))
    return (f'<p class="muted">{esc(vdir.name)}</p>'
            + "".join(figure(p, p.stem, LATEST_WIDTH, "grid") for p in pngs))


def section_sweep(run: Run) -> str:
    png, js = run.dir / "sweep.png", run.dir / "sweep.json"
    if not png.is_file():
        return note("No sweep yet (sweep.png not found).")
    out = []
    doc: Any = None
    if js.is_file():
        try:
            doc = json.loads(js.read_text(encoding="utf-8"))
            text = json.dumps({k: v for k, v in doc.items() if k != "sizes"} if isinstance(doc, dict) else doc,
                              indent=2, ensure_ascii=False)
        except (OSError, ValueError) as e:
            text = f"cannot read sweep.json: {e}"
    if isinstance(doc, dict) and isinstance(doc.get("rows"), list):
        prompts, seeds = doc.get("prompts") or [], doc.get("seeds") or []
        out.append(f'<p class="muted">Rows: {len(doc["rows"])} checkpoints (steps '
                   f'{esc(", ".join(fmt(r) for r in doc["rows"]))}); columns: {len(prompts)} prompt(s) × '
                   f'{len(seeds)} seed(s).</p>')
    out.append(figure(png, "checkpoint sweep", LATEST_WIDTH, "grid"))
    if js.is_file():
        if len(text) > 20000:
            text = text[:20000] + "\n…"
        out.append(f"<details><summary>sweep.json</summary><pre>{esc(text)}</pre></details>")
    return "".join(out)


CSS = """
:root{--fg:#1d2330;--muted:#667085;--line:#e4e7ec;--bg:#f6f7f9}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1260px;margin:0 auto;padding:20px 24px 60px}
header{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin-bottom:14px}
h1{margin:0 0 6px;font-size:24px}
h2{font-size:18px;margin:0 0 10px}
h3{font-size:15px;margin:16px 0 8px}
section{background:#fff;border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:14px 0}
nav{margin:6px 0 0;font-size:13px}
nav a{color:#1f5fa8;margin-right:14px;text-decoration:none}
.meta{display:flex;flex-wrap:wrap;gap:18px;color:var(--fg)}
.muted{color:var(--muted)}
.note{color:var(--muted);font-style:italic;margin:6px 0}
.chips{display:flex;flex-wrap:wrap;gap:6px;margin-top:10px}
.chip{background:var(--bg);border:1px solid var(--line);border-radius:999px;padding:2px 10px;font-size:12px}
.chip b{font-weight:600;color:var(--muted);margin-right:4px}
.progress{height:8px;background:var(--line);border-radius:4px;overflow:hidden;margin:10px 0 4px;max-width:480px}
.progress div{height:100%;background:#2ca02c}
.banner{background:#fff4e5;border:2px solid #f08c00;color:#7a4100;border-radius:10px;padding:12px 16px;
 margin:14px 0;font-size:15px}
.kvs{display:flex;flex-wrap:wrap;gap:8px}
.kv{border:1px solid var(--line);border-radius:8px;padding:6px 12px;min-width:110px}
.kv span{display:block;color:var(--muted);font-size:12px}
table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{font-weight:600;color:var(--muted);font-size:12px}
table.params td{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:12px;margin-top:12px}
.grid4{display:grid;grid-template-columns:repeat(4,1fr);gap:12px;margin-top:12px}
.wide svg{max-width:100%}
svg.chart{width:100%;height:auto;display:block;border:1px solid var(--line);border-radius:8px}
svg .ct{font-size:14px;font-weight:600;fill:#1d2330}
svg .lg{font-size:11px;fill:#344054}
svg .tk{font-size:11px;fill:#667085}
svg .al{font-size:12px;fill:#475467}
svg .gr{stroke:#eef0f3;stroke-width:1}
svg .ax{stroke:#98a2b3;stroke-width:1}
.valrow{display:flex;flex-wrap:wrap;gap:20px;align-items:flex-start}
.boxes{flex:1;min-width:280px}
.box{border-radius:8px;padding:8px 12px;margin-bottom:8px}
.box ul{margin:4px 0 0;padding-left:20px}
.alarm{background:#fdecea;border:1px solid #d92d20;color:#912018}
.flag{background:#fffaeb;border:1px solid #f79009;color:#7a2e0e}
.okbox{background:#ecfdf3;border:1px solid #75e0a7;color:#05603a}
.tag{border-radius:4px;padding:1px 6px;font-size:12px}
.tag.bad{background:#fdecea;color:#912018}.tag.ok{background:#ecfdf3;color:#05603a}
figure{margin:8px 0}
figure img{max-width:100%;height:auto;display:block;border:1px solid var(--line);border-radius:6px}
figcaption{color:var(--muted);font-size:12px;margin-top:3px}
.thumbs{display:flex;flex-wrap:wrap;gap:10px}
.thumbs figure{margin:0}
pre{background:var(--bg);padding:8px;border-radius:6px;overflow:auto;max-height:400px;font-size:12px}
"""

SECTIONS: tuple[tuple[str, str, Callable[[Run], str]], ...] = (
    ("settings", "Settings", section_settings),
    ("training", "Training", section_training),
    ("validation", "Validation", section_validation),
    ("samples", "Samples", section_samples),
    ("grids", "Validation grids", section_validation_grids),
    ("sweep", "Checkpoint sweep", section_sweep),
)


def _safe(what: str, fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:  # one unreadable file costs its section, not the page
        log.warning("run report: %s: %s: %s", what, type(e).__name__, e)
        return note(f"Could not render {what}: {type(e).__name__}: {e}")


def render(run_dir: Path) -> str:
    """The report page for run_dir as an HTML string."""
    run = Run.load(run_dir)
    nav = "<nav>" + "".join(f'<a href="#{sid}">{esc(t)}</a>' for sid, t, _ in SECTIONS) + "</nav>"
    body = [_safe("header", lambda: section_header(run)).replace("</header>", nav + "</header>"),
            _safe("banner", lambda: banner(run))]
    for sid, title, fn in SECTIONS:
        body.append(f'<section id="{sid}"><h2>{esc(title)}</h2>{_safe(title.lower(), lambda: fn(run))}</section>')
    name = esc(run_dir.resolve().name)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{name}: training report</title><style>{CSS}</style></head>'
            f'<body><main>{"".join(body)}</main></body></html>\n')


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write the run's report (default runs/<run>/report.html) atomically; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    out = Path(out) if out is not None else run_dir / "report.html"
    page = render(run_dir)
    atomic_write(out, lambda p: p.write_text(page, encoding="utf-8"))
    return out

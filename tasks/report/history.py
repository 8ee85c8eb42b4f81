"""A run's validation history (runs/<run>/validation/history.tsv, one row per validated step)
and the judgement of a new step against it: alarms (the reconstruction mean jumped by more than
alarm_jump) and flags (a check worse than the run's best by more than regress_margin). Only rows
of the same LPIPS net and comparability are compared; a random backbone's numbers are labelled
"not comparable" in every alarm and flag.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from tasks.core.store import atomic_write
from tasks.report.suite import HIGHER_IS_BETTER, TESTS, stats

HISTORY_COLUMNS = ("step", "reconstruction_lpips", "dino_swap_lpips", "text_manipulation_lpips",
                   "cfg_divergence_lpips", "reconstruction_p90", "comparable", "lpips_net")
VALUE_COLUMNS = HISTORY_COLUMNS[1:6]
NOT_COMPARABLE = " [LPIPS not comparable: random backbone]"


def read_history(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8")), delimiter="\t"):
        # lpips_net None: a row from before that column, of an unknown net (compared with none).
        row = {"step": int(r["step"]), "comparable": str(r.get("comparable", "")).lower() == "true",
               "lpips_net": (r.get("lpips_net") or "").strip() or None}
        for k in VALUE_COLUMNS:
            row[k] = float(r[k]) if r.get(k) not in (None, "", "nan") else None
        rows.append(row)
    return rows


def write_history(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    w = csv.writer(out, delimiter="\t", lineterminator="\n")
    w.writerow(HISTORY_COLUMNS)
    for r in sorted(rows, key=lambda r: r["step"]):
        w.writerow([r["step"], *("" if r[k] is None else f"{r[k]:.6f}" for k in VALUE_COLUMNS),
                    "true" if r["comparable"] else "false", r.get("lpips_net") or ""])
    text = out.getvalue()
    atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def history_row(step: int, tests: dict, comparable: bool, lpips_net: str) -> dict:
    row = {"step": step, "comparable": comparable, "lpips_net": lpips_net,
           "reconstruction_p90": tests["reconstruction"]["p90"]}
    row.update({f"{t}_lpips": tests[t]["mean"] for t in TESTS})
    return row


def summarise(results: dict) -> dict:
    """Per check: the statistics, samples skipped, and every image's values."""
    tests = {}
    for name, r in results.items():
        tests[name] = {**stats(r.values.values()), "skipped": r.skipped, "per_image": dict(r.values)}
        for extra, values in r.extra.items():
            tests[name][f"per_image_{extra}"] = values
        if name == "dino_swap":  # the distance to the text source, beside the one to the style source
            tests[name]["to_text_source"] = stats(r.extra["to_text_source"].values())
    return tests


def judge(row: dict, earlier: list[dict], p) -> tuple[list[str], list[str]]:
    """(alarms, flags) of one step against the run's earlier steps of the same LPIPS net and
    comparability (distances of different nets or backbones are on different scales); `p` gives
    alarm_jump and regress_margin (validate's params)."""
    alarms, flags = [], []
    earlier = [r for r in earlier if r["step"] < row["step"] and r["comparable"] == row["comparable"]
               and row["lpips_net"] is not None and r["lpips_net"] == row["lpips_net"]]
    note = "" if row["comparable"] else NOT_COMPARABLE
    prev = max(earlier, key=lambda r: r["step"], default=None)
    cur, before = row["reconstruction_lpips"], prev and prev["reconstruction_lpips"]
    if cur is not None and before is not None and cur - before > p.alarm_jump:
        alarms.append(f"reconstruction LPIPS rose from {before:.4f} (step {prev['step']}) to {cur:.4f} "
                      f"(step {row['step']}): +{cur - before:.4f} > validate.alarm_jump {p.alarm_jump:g}{note}")
    for test in TESTS:
        key, value = f"{test}_lpips", row[f"{test}_lpips"]
        seen = [r for r in earlier if r[key] is not None]
        if value is None or not seen:
            continue
        higher = test in HIGHER_IS_BETTER
        best = min(seen, key=lambda r: (-r[key] if higher else r[key], r["step"]))  # ties: the earliest
        gap = best[key] - value if higher else value - best[key]
        if gap > p.regress_margin:
            flags.append(f"{key} {value:.4f} is worse than the run's best {best[key]:.4f} (step {best['step']}) "
                         f"by {gap:.4f} > validate.regress_margin {p.regress_margin:g} "
                         f"({'higher' if higher else 'lower'} is better){note}")
    return alarms, flags

"""One self-contained HTML page per training run: the page a person opens to see how it goes.

    python -m tasks.run_report [--run runs/nanodit] [--out runs/nanodit/report.html]

It reads (tasks/report/run_files.py) what the trainer, the validation and the sweep leave in runs/<run>/:

    live/metrics.json, live/plots/metrics/**.tsv    dvclive: the latest values, one row per logged step
    samples/step-NNNNNN.png                         the fixed 4-image grid (conditioning on top, EMA samples below)
    validation/history.tsv                          LPIPS per validated step, and whether it is comparable
    validation/step-NNNNNN/metrics.json, *.png      the latest validation: per-test stats, alarms, flags, grids
    sweep.png, sweep.json                           the checkpoint sweep grid
    checkpoints/step-NNNNNN/meta.json               the settings the run was trained with

and writes (tasks/report/page.py) one HTML file (atomically) that renders offline: no scripts, no external
CSS or fonts, images as base64 data URIs (downscaled with PIL), charts as inline SVG
drawn here. Anything missing (no validation yet, no sweep) is a short note on the
page; a file that cannot be read is a note too, never a crash.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tasks.report.page import write_report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tasks.run_report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="runs/nanodit", help="the run folder (default: runs/nanodit)")
    ap.add_argument("--out", help="the HTML file to write (default: <run>/report.html)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = write_report(Path(args.run), Path(args.out) if args.out else None)
    except FileNotFoundError as e:
        sys.exit(str(e))
    print(path)


if __name__ == "__main__":
    main()

"""Switch params.yaml between model profiles: `real` (the defaults) and `tiny`.

    python -m tasks.profile tiny      # build the tiny models if missing, point params.yaml at them
    python -m tasks.profile real      # back to the real models

A profile is a small YAML of `section.key` values (profiles/<name>.yaml). Only
those values are rewritten in params.yaml — comments and layout kept — as a
person or `dvc exp run -S` would, so DVC sees the change and params.yaml stays
the one record of what ran.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

PROFILES = Path(__file__).resolve().parents[1] / "profiles"


def load_profile(name: str) -> dict[str, dict]:
    path = PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise SystemExit(f"profile {name!r}: no {path} (known: {known})")
    return yaml.safe_load(path.read_text())


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def set_values(text: str, values: dict[str, dict]) -> tuple[str, list[str]]:
    """Set `section.key` scalars in a params.yaml text, changing only those values:
    comments, order and layout stay byte for byte (a YAML round trip would
    reflow them). Returns the new text and 'section.key: old -> new' lines."""
    lines = text.splitlines(keepends=True)
    changes, section = [], None
    pending = {(s, k): v for s, kv in values.items() for k, v in kv.items()}
    for n, line in enumerate(lines):
        top = re.match(r"^([A-Za-z_]\w*):", line)
        if top:
            section = top.group(1)
            continue
        m = re.match(r"^(  ([A-Za-z_]\w*):)([ \t]*)([^#\n]*?)([ \t]*)(#.*)?(\n?)$", line)
        if not m or (section, m.group(2)) not in pending:
            continue
        key = m.group(2)
        new = _scalar(pending.pop((section, key)))
        old = m.group(4)
        if yaml.safe_load(old or "null") != yaml.safe_load(new):
            comment = m.group(6) or ""
            head = f"{m.group(1)} {new}"
            # Keep the comment in its column when the new value fits.
            pad = max(1, len(m.group(1) + m.group(3) + old + m.group(5)) - len(head)) if comment else 0
            lines[n] = head + " " * pad + comment + m.group(7)
            changes.append(f"{section}.{key}: {old} -> {new}")
    if pending:
        missing = ", ".join(f"{s}.{k}" for s, k in pending)
        raise SystemExit(f"params.yaml has no line for {missing} (a one-line `key: value` under its section)")
    return "".join(lines), changes


def build_tiny(root: Path = Path("models/tiny")) -> Path:
    """The tiny profile's random-weight models in `root` (a folder already built is kept)."""
    from models.tiny import build_all
    from tasks.sample.corpus import tiny_corpus

    return build_all(root, tiny_corpus())


def apply(name: str, params: Path = Path("params.yaml"), build: bool = True) -> list[str]:
    """Write the profile into `params`; returns the changes as 'section.key: old -> new'."""
    profile = load_profile(name)
    if build and name == "tiny":
        build_tiny(Path("models/tiny"))
    text, changes = set_values(params.read_text(encoding="utf-8"), profile)
    doc = yaml.safe_load(text)
    for section, kv in profile.items():  # the edit did what it says
        assert all(doc[section][k] == v for k, v in kv.items()), section
    params.write_text(text, encoding="utf-8")
    return changes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", help="profile name (profiles/<name>.yaml)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--no-build", action="store_true", help="do not build missing tiny models")
    args = ap.parse_args(argv)
    changes = apply(args.name, args.params, build=not args.no_build)
    print(f"profile {args.name}: " + ("; ".join(changes) if changes else "params.yaml already set"),
          file=sys.stderr)


if __name__ == "__main__":
    main()

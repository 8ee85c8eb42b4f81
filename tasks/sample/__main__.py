"""Make the sample dataset (generated, or shipped with scikit-image; never downloaded).

    python -m tasks.sample --out data/raw --figures 60 --photos --bad-examples --rejects 4

Writes figures/ (particle figures + captions + true keypoints), photos/ (real
photographs in awkward modes), problems/ (files ingest must refuse) and
rejected/ (figures with a visible defect, as a curator's rejects; with
--bad-examples also one corrupt file there, quarantined rather than a reject).
--words FILE adds the `expand` stage's demo words (ideas to turn into prompts) to a words file
that holds none yet; one with words is the user's and is left alone.
Deterministic: the same arguments give the same bytes.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tasks.sample.particles import write_particle_dataset
from tasks.sample.photos import write_photos, write_problems
from tasks.sample.rejects import write_corrupt_reject, write_rejects


def make_sample(out: Path, figures: int, seed: int = 0, photos: bool = True,
                bad_examples: bool = True, start: int = 0, rejects: int = 0) -> dict[str, str]:
    """Returns the problem files with the quarantine reason each must get."""
    paths = write_particle_dataset(out / "figures", figures, seed=seed, start=start)
    if photos:
        write_photos(out / "photos")
    expected: dict[str, str] = {}
    if bad_examples:
        good = paths[0] if paths else write_photos(out / "photos")[0]
        expected = write_problems(out / "problems", good)
    if rejects:
        write_rejects(out / "rejected", rejects, seed=seed)
        if bad_examples:
            expected[write_corrupt_reject(out / "rejected", seed).as_posix()] = "corrupt"
    return expected


# The particleArt seeds' kind of ideas: a word becomes a scene, the scene a particle figure.
WORDS = ("love", "joy", "juggling three balls", "waiting for someone")


def write_words(path: Path) -> bool:
    """The demo's words, appended to a words file that holds none yet (the shipped one holds only
    comments); one with words is the user's and stays as it is. Returns whether it wrote."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if any(line.strip() and not line.strip().startswith("#") for line in text.splitlines()):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    head = text if text.endswith("\n") or not text else text + "\n"
    path.write_text(head + "".join(f"{w}\n" for w in WORDS), encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("data/raw"))
    ap.add_argument("--figures", type=int, default=60, help="number of particle figures")
    ap.add_argument("--start", type=int, default=0, help="index of the first figure (to add more)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--photos", action="store_true", help="add scikit-image's photographs")
    ap.add_argument("--bad-examples", action="store_true", help="add files ingest must refuse")
    ap.add_argument("--rejects", type=int, default=0,
                    help="number of rejected images (figures with a defect) under <out>/rejected/")
    ap.add_argument("--words", type=Path, help="also write this words file for `expand` (kept if it exists)")
    args = ap.parse_args(argv)
    if args.rejects < 0:
        ap.error(f"--rejects: expected >= 0, got {args.rejects}")
    expected = make_sample(args.out, args.figures, args.seed, args.photos, args.bad_examples, args.start,
                           args.rejects)
    n = sum(1 for p in args.out.rglob("*") if p.is_file() or p.is_symlink())
    print(f"sample data: {n} files under {args.out}/ "
          f"({args.figures} figures{', photos' if args.photos else ''}"
          f"{f', {args.rejects} rejects' if args.rejects else ''}"
          f"{f', {len(expected)} problem files' if expected else ''})")
    if args.words and write_words(args.words):
        print(f"words for expand: {args.words} ({len(WORDS)} ideas)")


if __name__ == "__main__":
    main()

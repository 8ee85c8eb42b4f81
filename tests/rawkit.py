"""Entries a raw folder can hold that are not readable regular files, made for real
(test_ingest, test_rawfs, test_ingest_dvc): each with the quarantine reason ingest must give it."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
from pathlib import Path

from PIL import Image


@contextlib.contextmanager
def no_hang(seconds: int = 20):
    """Fail instead of hanging (a FIFO opened by mistake blocks for ever). Main thread only."""
    def fail(*_):
        raise TimeoutError(f"still blocked after {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def png(color: tuple[int, int, int] = (40, 90, 160), size: tuple[int, int] = (640, 576)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def make_odd_entries(folder: Path) -> dict[str, str]:
    """Fill `folder` with odd entries; returns {path as ingest lists it: reason}.

    Paths are `folder`'s as given (pass it relative to the repo root to get the
    manifest's paths). A device file needs CAP_MKNOD (root): without it, there is none.
    """
    folder.mkdir(parents=True, exist_ok=True)
    f = folder.as_posix()
    expected = {}

    def link(name: str, target: str, reason: str | None) -> None:
        os.symlink(target, folder / name)
        if reason:
            expected[f"{f}/{name}"] = reason

    link("loop.png", "loop.png", "symlink_loop")          # ELOOP on stat and open
    link("ping.png", "pong.png", "symlink_loop")          # two links pointing at each other
    link("pong.png", "ping.png", "symlink_loop")
    link("dangling.png", "missing.png", "broken_symlink")
    link("here", ".", None)                                # a link to its own folder: fine, not listed
    os.mkfifo(folder / "pipe.png")                         # open() would block for ever
    expected[f"{f}/pipe.png"] = "not_a_file"
    link("via_pipe.png", "pipe.png", "not_a_file")         # a link to a FIFO
    # A caption that is a FIFO, beside a good image: the image is kept, without a caption.
    (folder / "with_pipe_caption.png").write_bytes(png((10, 200, 10)))
    os.mkfifo(folder / "with_pipe_caption.txt")
    expected[f"{f}/with_pipe_caption.txt"] = "not_a_file"
    # A unix socket (ENXIO on open); bound by a relative name: AF_UNIX paths are short.
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind("sock.png")
    finally:
        os.chdir(cwd)
    expected[f"{f}/sock.png"] = "not_a_file"
    try:  # like /dev/zero: reading it never ends
        os.mknod(folder / "zero.png", 0o644 | 0o020000, os.makedev(1, 5))
        expected[f"{f}/zero.png"] = "not_a_file"
    except PermissionError:
        pass
    # Names that are not UTF-8: a file (a fine PNG) and a folder holding one.
    bfolder = os.fsencode(folder)
    with open(bfolder + b"/bad\xff.png", "wb") as out:
        out.write(png((200, 30, 30)))
    expected[f"{f}/bad\\xff.png"] = "name_not_utf8"
    os.mkdir(bfolder + b"/dir\xfe")
    with open(bfolder + b"/dir\xfe/inside.png", "wb") as out:
        out.write(png((30, 30, 200)))
    expected[f"{f}/dir\\xfe"] = "name_not_utf8"
    return expected

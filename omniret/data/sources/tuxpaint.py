"""Tux Paint's stamps (Debian's `tuxpaint-stamps-default`): drawings (PNG or SVG), each with an English caption,
some with a sound effect and some with a recorded spoken description.

A stamp `<dir>/<name>` is `<name>.txt` (first line: the English caption, then `<locale>.utf8=...` lines),
`<name>.png` or `<name>.svg` (the drawing; PNG preferred, it is what Tux Paint draws), `<name>.ogg|.wav` (a sound
effect) and `<name>_desc.ogg|.wav` (the caption read aloud by a person, in English).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from omniret.data.sources.common import require_paths

ROOT = "/usr/share/tuxpaint/stamps"
INSTALL_HINT = "apt-get install tuxpaint-stamps-default"
SOUND_SUFFIXES = (".ogg", ".wav")


@dataclass(frozen=True)
class Stamp:
    key: str  # path under the stamps root, without suffix
    image: str  # the PNG or SVG
    caption: str
    category: str
    sound: str | None  # sound effect
    spoken: str | None  # a person reading the caption


def read_caption(path: str) -> str:
    """The English caption: the first line that is not a `<locale>.utf8=` translation."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and ".utf8=" not in line.split(" ", 1)[0]:
                return line
    return ""


def _first_existing(stem: str, suffixes) -> str | None:
    return next((stem + s for s in suffixes if os.path.exists(stem + s)), None)


def stamps(root: str = ROOT) -> list:
    """Every stamp with a caption and a drawing, sorted by key."""
    require_paths("tuxpaint", {"tuxpaint-stamps-default": root}, INSTALL_HINT)
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".txt"):
                continue
            stem = os.path.join(folder, name[: -len(".txt")])
            image = _first_existing(stem, (".png", ".svg"))
            caption = read_caption(stem + ".txt")
            if image is None or not caption:
                continue
            key = os.path.relpath(stem, root)
            out.append(Stamp(key, image, caption, key.split(os.sep)[0],
                             _first_existing(stem, SOUND_SUFFIXES), _first_existing(stem + "_desc", SOUND_SUFFIXES)))
    return sorted(out, key=lambda s: s.key)

"""Open Clip Art drawings (Debian's `openclipart-svg`): SVG files whose metadata holds a title and keywords.

Many titles name a collection rather than the drawing ("Lemon SVG theme", "gramastar", "card"); a drawing is
kept only when its cleaned title is shared by at most `max_title_share` files, so every caption says what one
drawing shows. Symbolic links (the package files some drawings under two categories) are skipped.
"""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass

from omniret.data.sources.common import normalize_text, require_paths

ROOT = "/usr/share/openclipart/svg"
INSTALL_HINT = "apt-get install openclipart-svg librsvg2-bin"
GENERIC_WORDS = {"clipart", "collection", "theme", "icons", "iconset", "submission", "untitled", "various",
                 "cliparts", "gradient", "openclipart"}


@dataclass(frozen=True)
class Drawing:
    path: str  # the SVG file
    key: str  # its path under the package root, without .svg
    title: str  # the cleaned title: the caption
    keywords: tuple
    category: str  # the package's top folder ("animals", "food", ...)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def read_metadata(path: str) -> tuple:
    """(title, keywords) from an SVG's RDF metadata (the cc:Work element); ("", ()) when it has none."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError):
        return "", ()
    work = next((e for e in root.iter() if _local(e.tag) == "Work"), None)
    if work is None:
        return "", ()
    title, keywords = "", []
    for child in work:
        name = _local(child.tag)
        if name == "title":
            title = (child.text or "").strip()
        elif name == "subject":
            keywords = [(li.text or "").strip() for li in child.iter() if _local(li.tag) == "li"]
    return title, tuple(k for k in keywords if k)


def clean_title(title: str) -> str:
    """'Clipart by Nicu Buculei - piggybank' -> 'piggybank'; underscores and runs of spaces -> one space."""
    title = re.sub(r"^\s*clip\s*art\s+by\s+[^-]+-\s*", "", title, flags=re.I)
    title = re.sub(r"[_\s]+", " ", title).strip(" -.")
    return title


def is_descriptive(title: str) -> bool:
    words = normalize_text(title).split()
    letters = [w for w in words if re.search(r"[a-z]{3,}", w)]
    return bool(letters) and not (set(words) & GENERIC_WORDS) and len(title) <= 80


def drawings(root: str = ROOT, max_title_share: int = 2) -> list:
    """Every drawing with a descriptive title, sorted by key."""
    require_paths("openclipart", {"openclipart-svg": root}, INSTALL_HINT)
    found = []
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not name.endswith(".svg") or os.path.islink(path):
                continue
            title, keywords = read_metadata(path)
            title = clean_title(title)
            if title and is_descriptive(title):
                key = os.path.relpath(path, root)[: -len(".svg")]
                found.append(Drawing(path, key, title, keywords, key.split(os.sep)[0]))
    share = Counter(normalize_text(d.title) for d in found)
    return sorted((d for d in found if share[normalize_text(d.title)] <= max_title_share), key=lambda d: d.key)

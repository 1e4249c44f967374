"""Google's Noto emoji images with names (npm `emoji-datasource-google`), and their real variants: the five
skin tones (Fitzpatrick modifiers) and the woman / man forms of gender-neutral emoji. A variant and its base
make a composed pair: the base image plus "with dark skin tone" or "as a woman" is the variant's image.

The package is found under $OMNIRET_EMOJI_DIR, `scripts/setup.sh`'s npm cache ($OMNIRET_CACHE or
~/.cache/omniret, then npm/node_modules/...) or a global npm folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from omniret.data.sources.common import SourceMissing

PACKAGE = "emoji-datasource-google"
INSTALL_HINT = f"npm install --prefix ~/.cache/omniret/npm {PACKAGE}@16.0.0 (or bash scripts/setup.sh)"
TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}
GENDERS = {"-200D-2640-FE0F": "woman", "-200D-2642-FE0F": "man"}


@dataclass(frozen=True)
class Emoji:
    unified: str  # code points, e.g. "1F3C3-1F3FF"
    name: str  # lower case, e.g. "person running" (variants carry their base's name)
    image: str
    group: str  # the code points without tone and gender: a base and all its variants share it (and the split)


@dataclass(frozen=True)
class Variant:
    base: Emoji
    target: Emoji
    kind: str  # "tone" or "gender"
    value: str  # "dark", "medium-light", ..., "woman", "man"


def concept_of(unified: str) -> str:
    """The emoji's code points without skin-tone modifiers, a trailing gender sign and variation selectors."""
    for suffix in GENDERS:
        if unified.endswith(suffix):
            unified = unified[: -len(suffix)]
    return "-".join(c for c in unified.split("-") if c not in TONES and c != "FE0F")


def attributes_of(unified: str) -> dict:
    """{"tone": the skin tone ("light" ... "dark") or "none", "gender": "woman", "man" or "neutral"}."""
    return {"tone": next((TONES[c] for c in unified.split("-") if c in TONES), "none"),
            "gender": next((g for suffix, g in GENDERS.items() if unified.endswith(suffix)), "neutral")}


def unified_of(path: str) -> str:
    """The code points an emoji image file is named by ("media/emoji/1F3C3-1F3FF.png" -> "1F3C3-1F3FF")."""
    return os.path.splitext(os.path.basename(str(path)))[0]


def package_dir() -> str:
    """The installed package's folder, or SourceMissing."""
    cache = os.environ.get("OMNIRET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omniret")
    candidates = [os.environ.get("OMNIRET_EMOJI_DIR", ""),
                  os.path.join(cache, "npm", "node_modules", PACKAGE),
                  os.path.join("/usr/local/lib/node_modules", PACKAGE), os.path.join("/usr/lib/node_modules", PACKAGE)]
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "emoji.json")):
            return path
    raise SourceMissing(f"emoji: {PACKAGE} not found (looked in {', '.join(p for p in candidates if p)}); "
                        f"install it with: {INSTALL_HINT}")


def read_emoji(root: str | None = None) -> tuple:
    """(every emoji with an image, every single-change variant pair), both sorted."""
    root = root or package_dir()
    with open(os.path.join(root, "emoji.json"), encoding="utf-8") as f:
        table = json.load(f)
    image_dir = os.path.join(root, "img", "google", "64")

    def make(entry: dict, name: str):
        path = os.path.join(image_dir, entry.get("image", ""))
        if not entry.get("has_img_google") or not os.path.exists(path):
            return None
        return Emoji(entry["unified"], name, path, concept_of(entry["unified"]))

    by_unified, pairs = {}, []
    for entry in table:
        name = (entry.get("name") or entry.get("short_name") or "").lower().replace("_", " ")
        base = make(entry, name)
        if base is None:
            continue
        by_unified[base.unified] = base
        for tone_key, variation in (entry.get("skin_variations") or {}).items():
            variant = make(variation, name)
            if variant is None:
                continue
            by_unified[variant.unified] = variant
            if tone_key in TONES:  # one tone; couples with two tones ("1F3FB-1F3FF") are not single changes
                pairs.append(Variant(base, variant, "tone", TONES[tone_key]))
    for unified, emoji in by_unified.items():
        for suffix, gender in GENDERS.items():
            if unified.endswith(suffix) and unified[: -len(suffix)] in by_unified:
                pairs.append(Variant(by_unified[unified[: -len(suffix)]], emoji, "gender", gender))
    emoji = sorted(by_unified.values(), key=lambda e: e.unified)
    return emoji, sorted(pairs, key=lambda p: (p.base.unified, p.target.unified))

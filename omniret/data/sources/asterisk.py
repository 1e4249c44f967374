"""Asterisk's English prompts (Debian's `asterisk-core-sounds-en-wav`, one speaker, Allison), each a real
recording with its transcript in `asterisk-core-sounds-en`'s doc folder (`core-sounds-en.txt.gz`:
`<path>: <transcript>` lines). Prompts whose transcript describes a sound instead of words ("[ascending tones]",
"(1 second of silence)") are left out.
"""
from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass

from omniret.data.sources.common import require_paths

SOUNDS = "/usr/share/asterisk/sounds/en_US_f_Allison"
TRANSCRIPTS = "/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz"
INSTALL_HINT = "apt-get install asterisk-core-sounds-en-wav asterisk-core-sounds-en"


@dataclass(frozen=True)
class Prompt:
    key: str  # e.g. "digits/7"
    audio: str
    transcript: str


def read_transcripts(path: str = TRANSCRIPTS) -> dict:
    """key -> transcript, from the package's `<key>: <text>` listing (comment lines start with ';')."""
    opener = gzip.open if path.endswith(".gz") else open
    out = {}
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(";") or ":" not in line:
                continue
            key, text = line.split(":", 1)
            out[key.strip()] = " ".join(text.split())
    return out


def prompts(sounds: str = SOUNDS, transcripts: str = TRANSCRIPTS) -> list:
    """Every prompt with a recording and a spoken transcript, sorted by key."""
    require_paths("asterisk", {"asterisk-core-sounds-en-wav": sounds, "asterisk-core-sounds-en": transcripts},
                  INSTALL_HINT)
    out = []
    for key, text in read_transcripts(transcripts).items():
        audio = os.path.join(sounds, key + ".wav")
        # notes, not words: "[ascending tones]", "(1 second of silence)", "(simple tone sound plays)"
        words = re.sub(r"\[[^\]]*\]|\([^)]*\)", " ", text)
        if os.path.exists(audio) and re.search(r"[A-Za-z0-9]", words):
            out.append(Prompt(key, audio, " ".join(words.split())))
    return sorted(out, key=lambda p: p.key)

"""What the real-media sources share: the seeded split, text normalisation, and writing media files.

Every media file of the benchmark is written into its own root (images as 224x224 RGB PNG on white, audio as
16 kHz mono 16-bit WAV), so the M-BEIR files name paths inside the root and the frozen encoders read one
format per modality.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from omniret.files import atomic_path

IMAGE_SIZE = 224
SAMPLE_RATE = 16000


class SourceMissing(RuntimeError):
    """A source's package is not installed; the message says how to install it."""


def normalize_text(text: str) -> str:
    """Lower case, words only: the key that decides whether two wordings are the same."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def is_test(group: str, seed: int, test_fraction: float) -> bool:
    """Whether a group (a stamp's caption, a base emoji, a transcript) goes to the test split.

    A hash of (seed, group), so the answer depends on nothing else: not on file order, not on which other
    items were found, not on a subset being built."""
    digest = hashlib.sha256(f"{seed}\0{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < test_fraction


def write_atomic(path: str, data: bytes) -> None:
    """Write `data` to `path` through omniret.files (a temporary file beside it, then a rename), so a reader never
    sees half a file and a crash leaves the old one (or none); no fsync: the benchmark's thousands of media files
    can be built again."""
    with atomic_path(path, durable=False) as tmp:
        tmp.write_bytes(data)


def square_rgb_png(img, size: int = IMAGE_SIZE) -> bytes:
    """A PIL image -> PNG bytes: transparency flattened onto white, the whole picture fitted into a
    size x size white square (aspect kept, centred)."""
    import io

    from PIL import Image

    img = img.convert("RGBA")
    white = Image.new("RGBA", img.size, (255, 255, 255, 255))
    flat = Image.alpha_composite(white, img).convert("RGB")
    w, h = flat.size
    scale = size / max(w, h)
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    flat = flat.resize(new, Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat, ((size - new[0]) // 2, (size - new[1]) // 2))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def write_image(src: str, dst: str, size: int = IMAGE_SIZE) -> None:
    """A raster image file -> `dst` (square RGB PNG on white). Skipped when `dst` exists."""
    if os.path.exists(dst):
        return
    from PIL import Image

    with Image.open(src) as img:
        write_atomic(dst, square_rgb_png(img, size))


def render_svg(src: str, dst: str, size: int = IMAGE_SIZE) -> None:
    """An SVG drawing -> `dst` with librsvg's rsvg-convert (Debian's librsvg2-bin). Raises RuntimeError when
    it cannot render the file. Skipped when `dst` exists."""
    if os.path.exists(dst):
        return
    import io
    import subprocess

    from PIL import Image

    proc = subprocess.run(["rsvg-convert", "-w", str(size), "-h", str(size), "-a", src],
                          capture_output=True, timeout=60, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"rsvg-convert failed on {src}: {proc.stderr.decode(errors='replace')[:200]}")
    with Image.open(io.BytesIO(proc.stdout)) as img:
        write_atomic(dst, square_rgb_png(img, size))


def wav_bytes(wave: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(wave, -1.0, 1.0), rate, subtype="PCM_16", format="WAV")
    return buf.getvalue()


def write_audio(src: str, dst: str, max_seconds: float = 12.0) -> None:
    """Any sound file libsndfile reads (WAV, Ogg Vorbis) -> `dst`: 16 kHz mono 16-bit WAV, cut to
    `max_seconds`. Skipped when `dst` exists."""
    if os.path.exists(dst):
        return
    from omniret.model.media import load_audio

    wave = load_audio(src, SAMPLE_RATE, max_seconds).numpy()
    write_atomic(dst, wav_bytes(wave))


def require_paths(source: str, paths: dict, hint: str) -> None:
    """Raise SourceMissing naming the package when one of `paths` (what -> path) does not exist."""
    missing = [f"{what} ({path})" for what, path in paths.items() if not os.path.exists(path)]
    if missing:
        raise SourceMissing(f"{source}: missing {', '.join(missing)}; install it with: {hint}")

"""Offline speech synthesis with Debian's `espeak-ng` and `flite`, for the spoken-digit part of the demo.

A *voice* is one speaker identity: an espeak-ng variant (its timbre: formants, pitch range, breathiness) or
one flite speaker. Accents, speeds and pitches are renderings of a voice, so splitting by voice keeps every
test speaker unheard in training. Nothing here installs anything: `missing_tools()` says what is absent.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16000
INSTALL_HINT = "apt-get install espeak-ng flite"

# espeak-ng English accents a variant can be rendered with (all ship with espeak-ng's data).
ESPEAK_ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc", "en-gb-x-gbclan")
# flite's built-in speakers; kal and kal16 are one speaker at two rates, awb_time is a limited-domain
# (clock times only) voice, so neither adds a speaker.
FLITE_SPEAKERS = {"awb": ("awb",), "kal": ("kal16", "kal"), "rms": ("rms",), "slt": ("slt",)}
# How each flite speaker is synthesised: kal is a diphone voice, the others are clustergen (statistical
# parametric) voices. A held-out speaker must come from a family that keeps a speaker in training, or the test
# measures an unseen synthesis method rather than an unseen voice.
FLITE_FAMILIES = {"awb": "clustergen", "kal": "diphone", "rms": "clustergen", "slt": "clustergen"}


@dataclass(frozen=True)
class Voice:
    engine: str  # "espeak-ng" or "flite"
    name: str  # espeak-ng variant file name, or flite speaker

    @property
    def key(self) -> str:
        return f"{self.engine}:{self.name}"

    @property
    def family(self) -> str:
        """The synthesis method: every espeak-ng variant is formant synthesis; flite per FLITE_FAMILIES."""
        return "formant" if self.engine == "espeak-ng" else FLITE_FAMILIES.get(self.name, self.name)


@dataclass(frozen=True)
class Rendering:
    """One way of speaking a word with a voice."""

    voice: Voice
    accent: str = "en-us"  # espeak-ng only; flite: which of the speaker's voice files
    speed: float = 1.0  # relative speaking rate (1 = the engine's default)
    pitch: float = 1.0  # relative pitch (1 = the voice's default)


def missing_tools() -> list[str]:
    """The synthesis programs that are not on PATH."""
    return [tool for tool in ("espeak-ng", "flite") if shutil.which(tool) is None]


def require_tools() -> None:
    missing = missing_tools()
    if missing:
        raise RuntimeError(
            f"the offline demo speaks its digits with Debian's espeak-ng and flite; missing: {', '.join(missing)}. "
            f"Install them with: {INSTALL_HINT}"
        )


def tool_versions() -> dict[str, str]:
    """Engine versions, part of the data cache key (another version speaks differently)."""
    out = {}
    for tool, flag in (("espeak-ng", "--version"), ("flite", "--version")):
        text = subprocess.run([tool, flag], capture_output=True, text=True, check=False).stdout
        out[tool] = " ".join(text.split())[:120]
    return out


def _espeak_data_dir() -> str:
    text = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Data at:\s*(\S+)", text)
    if not match:
        raise RuntimeError(f"cannot find espeak-ng's data directory in {text!r}")
    return match.group(1)


def list_voices() -> list[Voice]:
    """Every usable voice, sorted: espeak-ng's variants (file names without spaces) and flite's speakers."""
    variant_dir = os.path.join(_espeak_data_dir(), "voices", "!v")
    variants = sorted(n for n in os.listdir(variant_dir) if re.fullmatch(r"[A-Za-z0-9_]+", n))
    flite_listed = subprocess.run(["flite", "-lv"], capture_output=True, text=True, check=False).stdout.split()
    speakers = [s for s, files in FLITE_SPEAKERS.items() if any(f in flite_listed for f in files)]
    return [Voice("espeak-ng", v) for v in variants] + [Voice("flite", s) for s in sorted(speakers)]


def _read_wav(data: bytes) -> tuple[np.ndarray, int]:
    import soundfile as sf

    wave, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=False)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return wave, rate


def resample(wave: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return wave.astype(np.float32)
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(rate, target)
    return resample_poly(wave, target // g, rate // g).astype(np.float32)


def trim_silence(wave: np.ndarray, threshold_db: float = -40.0, frame: int = 160, pad: int = 800) -> np.ndarray:
    """Cut leading and trailing frames quieter than `threshold_db` below the loudest frame, keeping `pad`
    samples either side."""
    n = len(wave) // frame
    if n == 0:
        return wave
    energy = np.sqrt(np.mean(wave[: n * frame].reshape(n, frame) ** 2, axis=1) + 1e-12)
    loud = np.nonzero(20 * np.log10(energy / energy.max()) > threshold_db)[0]
    if len(loud) == 0:
        return wave
    start = max(0, loud[0] * frame - pad)
    stop = min(len(wave), (loud[-1] + 1) * frame + pad)
    return wave[start:stop]


def synthesize(word: str, rendering: Rendering) -> np.ndarray:
    """Speak `word`; returns a float32 waveform at 16 kHz, silence trimmed, peak-normalised to 0.9."""
    voice = rendering.voice
    if voice.engine == "espeak-ng":
        cmd = [
            "espeak-ng", "-v", f"{rendering.accent}+{voice.name}",
            "-s", str(int(round(165 * rendering.speed))), "-p", str(int(round(50 * rendering.pitch))),
            "--stdout", word,
        ]
        data = subprocess.run(cmd, capture_output=True, check=True).stdout
    elif voice.engine == "flite":
        with tempfile.NamedTemporaryFile(suffix=".wav") as tmp:
            cmd = [
                "flite", "-voice", rendering.accent,
                "--setf", f"duration_stretch={1.0 / rendering.speed:.3f}",
                "--setf", f"int_f0_target_mean={100.0 * rendering.pitch:.1f}",
                "-t", word, "-o", tmp.name,
            ]
            subprocess.run(cmd, capture_output=True, check=True)
            with open(tmp.name, "rb") as f:
                data = f.read()
    else:
        raise ValueError(f"rendering.voice.engine: unknown engine {voice.engine!r}")
    wave, rate = _read_wav(data)
    wave = trim_silence(resample(wave, rate))
    peak = float(np.abs(wave).max()) if len(wave) else 0.0
    if peak <= 0.0:
        raise RuntimeError(f"{voice.key} produced silence for {word!r} ({rendering})")
    return (wave * (0.9 / peak)).astype(np.float32)


def renderings_for(voice: Voice, count: int, rng: np.random.Generator) -> list[Rendering]:
    """`count` seeded renderings of one voice: accent (espeak-ng) or voice file (flite), speed and pitch."""
    out = []
    for _ in range(count):
        if voice.engine == "espeak-ng":
            accent = ESPEAK_ACCENTS[int(rng.integers(len(ESPEAK_ACCENTS)))]
        else:
            files = FLITE_SPEAKERS[voice.name]
            accent = files[int(rng.integers(len(files)))]
        speed = float(np.round(rng.uniform(0.75, 1.3), 2))
        pitch = float(np.round(rng.uniform(0.7, 1.4), 2))
        out.append(Rendering(voice, accent, speed, pitch))
    return out

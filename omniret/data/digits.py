"""The offline tri-modal digits benchmark, built deterministically on this machine.

- images: scikit-learn's `load_digits` (1797 real handwritten 8x8 digits), a seeded, class-stratified 60/40 split;
- audio: "zero".."nine" spoken by Debian's espeak-ng (every voice variant, several accents, speeds, pitches)
  and flite (its four speakers), split by voice so that no test voice is heard in training (but every test
  voice's kind of synthesis is); 16 kHz waveforms, turned into log-mel features by the model's audio tower;
- text: digit names in templates, with templates held out for test;
- tasks: text->image, text->audio, audio->image, image->audio, and the composed image+text->audio and
  audio+text->image, whose text is an arithmetic change ("plus two", "minus one"); test queries use held-out
  wordings ("two more", "one less").

The synthesised audio is cached on disk (keyed by the configuration, the voice list and the engine versions);
the images come from scikit-learn each time (bundled with it, no download).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from omniret.data import tts
from omniret.files import publish_directory_once

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}

TASKS = ("text->image", "text->audio", "audio->image", "image->audio", "image+text->audio", "audio+text->image")
COMPOSED_TASKS = ("image+text->audio", "audio+text->image")

# Eq. 1's task definitions; candidates carry none.
TASK_INSTRUCTIONS = {  # short: every token of an instruction is paid for on every query of training
    "text->image": "Find an image of the digit.",
    "text->audio": "Find a recording of the digit.",
    "audio->image": "Find an image of the spoken digit.",
    "image->audio": "Find a recording of the written digit.",
    "image+text->audio": "Change the written digit, then find it spoken.",
    "audio+text->image": "Change the spoken digit, then find it written.",
}

TEXT_TEMPLATES = {
    "train": ("{name}", "the digit {name}", "the number {name}", "a {name}", "digit {name}", "number {name}",
              "it is a {name}", "this is {name}"),
    "test": ("the numeral {name}", "a single {name}", "the figure {name}", "that is a {name}",
             "{name}, the digit", "number {name} please"),
}

# Arithmetic changes for the composed tasks; the test wordings never occur in training.
CHANGE_WORDINGS = {
    "train": {+1: ("plus {k}", "add {k}", "increase by {k}", "{k} higher", "{k} up"),
              -1: ("minus {k}", "subtract {k}", "decrease by {k}", "{k} lower", "{k} down")},
    "test": {+1: ("{k} more", "raised by {k}"),
             -1: ("{k} less", "reduced by {k}")},
}

CACHE_VERSION = 2


@dataclass(frozen=True)
class DigitsConfig:
    seed: int = 0
    image_test_fraction: float = 0.4
    test_voice_fraction: float = 0.25  # of espeak-ng's variants; one flite clustergen speaker is always test
    espeak_renderings: dict = field(default_factory=lambda: {"train": 3, "test": 2})  # per (voice, digit)
    flite_renderings: int = 8  # per (speaker, digit): flite has few speakers, so more renderings each
    max_voices: int | None = None  # a small subset for tests (split first, then cut each side)
    max_images_per_class: int | None = None

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class DigitsSplit:
    name: str
    images: torch.Tensor  # (N, 8, 8) float32 in [0, 1]
    image_labels: torch.Tensor  # (N,) int64
    waves: list  # of 1-D float32 numpy arrays at 16 kHz
    audio_labels: torch.Tensor  # (M,) int64
    audio_voices: list  # voice key per clip
    templates: tuple
    wordings: dict

    def image_item(self, i: int) -> dict:
        return {"image": self.images[i].unsqueeze(0).expand(3, -1, -1).contiguous()}

    def audio_item(self, j: int) -> dict:
        return {"audio": torch.from_numpy(self.waves[j])}


def split_images(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, class-stratified split: indices (train, test)."""
    rng = np.random.default_rng([seed, 1])
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.nonzero(labels == c)[0])
        n_test = int(round(len(idx) * test_fraction))
        test.extend(idx[:n_test])
        train.extend(idx[n_test:])
    return np.sort(np.array(train)), np.sort(np.array(test))


def split_voices(voices: list, cfg: DigitsConfig) -> dict:
    """Voices -> {"train": [...], "test": [...]}, disjoint, seeded. Within each synthesis family (espeak-ng's
    formant variants, flite's clustergen speakers, flite's one diphone speaker) a seeded share of the voices is
    held out: `test_voice_fraction` of the espeak-ng variants and one speaker of each flite family that has
    at least two, so every test voice is unheard but its kind of synthesis is not."""
    rng = np.random.default_rng([cfg.seed, 2])
    out = {"train": [], "test": []}
    families = sorted({v.family for v in voices})
    for family in families:
        group = [v for v in voices if v.family == family]
        group = [group[i] for i in rng.permutation(len(group))]
        if len(group) < 2:
            n_test = 0
        elif group[0].engine == "espeak-ng":
            n_test = max(1, int(round(len(group) * cfg.test_voice_fraction)))
        else:
            n_test = 1
        out["test"].extend(group[:n_test])
        out["train"].extend(group[n_test:])
    if cfg.max_voices is not None:
        for split in out:  # keep both engines when cutting down: the first espeak-ng and flite voices
            espeak = [v for v in out[split] if v.engine == "espeak-ng"]
            flite = [v for v in out[split] if v.engine == "flite"]
            n_flite = min(len(flite), max(1, cfg.max_voices // 4))
            out[split] = espeak[: max(1, cfg.max_voices - n_flite)] + flite[:n_flite]
    return out


def _audio_plan(voices_by_split: dict, cfg: DigitsConfig) -> dict:
    """Every clip to synthesise: split -> list of (digit, Rendering)."""
    plan = {}
    for split, voices in voices_by_split.items():
        rng = np.random.default_rng([cfg.seed, 3, 0 if split == "train" else 1])
        clips = []
        for voice in voices:
            count = cfg.espeak_renderings[split] if voice.engine == "espeak-ng" else cfg.flite_renderings
            for digit in range(10):
                clips.extend((digit, r) for r in tts.renderings_for(voice, count, rng))
        plan[split] = clips
    return plan


def default_cache_dir() -> str:
    base = os.environ.get("OMNIRET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "omniret")
    return os.path.join(base, "digits")


def _synthesize_all(clips: list, workers: int, progress=None) -> list:
    def one(clip):
        digit, rendering = clip
        return tts.synthesize(DIGIT_NAMES[digit], rendering)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        out = []
        for wave in pool.map(one, clips):
            out.append(wave)
            if progress is not None:
                progress(1)
    return out


def build_audio(cfg: DigitsConfig, cache_dir: str | None = None, workers: int = 2, log=print) -> dict:
    """Synthesise (or load from the cache) every clip. Returns split -> dict(waves, labels, voices)."""
    tts.require_tools()
    voices = tts.list_voices()
    split = split_voices(voices, cfg)
    identity = {
        "version": CACHE_VERSION, "config": asdict(cfg), "tools": tts.tool_versions(),
        "voices": {s: [v.key for v in vs] for s, vs in split.items()},
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    root = os.path.join(cache_dir or default_cache_dir(), f"audio-{key}")
    if os.path.exists(os.path.join(root, "meta.json")):
        try:
            return _load_audio(root)
        except (OSError, ValueError, EOFError, KeyError) as exc:  # a damaged entry (0 bytes, torn): make it again
            log(f"audio cache {root} is damaged ({type(exc).__name__}: {exc}); synthesising it again")
            shutil.rmtree(root, ignore_errors=True)
    plan = _audio_plan(split, cfg)
    total = sum(len(v) for v in plan.values())
    log(f"synthesising {total} spoken digits with espeak-ng and flite (cached in {root}) ...")
    from tqdm.auto import tqdm

    out = {}
    with tqdm(total=total, desc="speech", unit="clip", leave=False) as bar:
        for name, clips in plan.items():
            waves = _synthesize_all(clips, workers, bar.update)
            out[name] = {
                "waves": waves,
                "labels": [d for d, _ in clips],
                "voices": [r.voice.key for _, r in clips],
                "renderings": [[r.accent, r.speed, r.pitch] for _, r in clips],
            }
    _save_audio(root, out, identity)
    return out


def _save_audio(root: str, audio: dict, identity: dict) -> None:
    """Write into a temporary directory, then rename: an interrupted run leaves no half cache."""

    def fill(tmp: str) -> None:
        meta = {"identity": identity, "splits": {}}
        for name, part in audio.items():
            lengths = np.array([len(w) for w in part["waves"]], dtype=np.int64)
            np.save(os.path.join(tmp, f"{name}_waves.npy"), np.concatenate(part["waves"]).astype(np.float32))
            np.save(os.path.join(tmp, f"{name}_lengths.npy"), lengths)
            meta["splits"][name] = {k: part[k] for k in ("labels", "voices", "renderings")}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)

    publish_directory_once(root, fill)


def _load_audio(root: str) -> dict:
    with open(os.path.join(root, "meta.json")) as f:
        meta = json.load(f)
    out = {}
    for name, part in meta["splits"].items():
        flat = np.load(os.path.join(root, f"{name}_waves.npy"))
        lengths = np.load(os.path.join(root, f"{name}_lengths.npy"))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        out[name] = {"waves": [flat[bounds[i]:bounds[i + 1]] for i in range(len(lengths))], **part}
    return out


def load_images(cfg: DigitsConfig) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    train, test = split_images(labels, cfg.image_test_fraction, cfg.seed)
    out = {}
    for name, idx in (("train", train), ("test", test)):
        if cfg.max_images_per_class is not None:
            idx = np.concatenate([idx[labels[idx] == c][: cfg.max_images_per_class] for c in range(10)])
            idx = np.sort(idx)
        out[name] = (torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]))
    return out


def build(cfg: DigitsConfig | None = None, cache_dir: str | None = None, log=print) -> dict:
    """The benchmark: {"train": DigitsSplit, "test": DigitsSplit}."""
    cfg = cfg or DigitsConfig()
    images = load_images(cfg)
    audio = build_audio(cfg, cache_dir, log=log)
    out = {}
    for name in ("train", "test"):
        imgs, img_labels = images[name]
        out[name] = DigitsSplit(
            name=name, images=imgs, image_labels=img_labels, waves=audio[name]["waves"],
            audio_labels=torch.tensor(audio[name]["labels"], dtype=torch.int64),
            audio_voices=list(audio[name]["voices"]), templates=TEXT_TEMPLATES[name],
            wordings=CHANGE_WORDINGS[name],
        )
    return out


# ---------------------------------------------------------------------------------------------- the tasks

def valid_changes(digit: int) -> list[tuple[int, int]]:
    """(sign, k) changes that keep the digit in 0..9."""
    return [(s, k) for s in (+1, -1) for k in NUMBER_WORDS if 0 <= digit + s * k <= 9]


def change_text(sign: int, k: int, wordings: dict, rng: np.random.Generator) -> str:
    options = wordings[sign]
    return options[int(rng.integers(len(options)))].format(k=NUMBER_WORDS[k])


def task_modalities(task: str) -> tuple[tuple[str, ...], str]:
    query, cand = task.split("->")
    return tuple(query.split("+")), cand


@dataclass
class TaskQueries:
    """Queries of one task: items (with their instruction), target digit, and which gallery they search."""
    task: str
    items: list
    targets: torch.Tensor  # (Q,) digit the query asks for
    gallery: str  # "image" or "audio"


def _query(task: str, split: DigitsSplit, source: int | None, digit: int, rng: np.random.Generator):
    """One query of `task` about `digit` (the query's own digit); returns (item, target digit)."""
    mods, _ = task_modalities(task)
    item: dict = {}
    target = digit
    if mods == ("text",):
        template = split.templates[int(rng.integers(len(split.templates)))]
        item["text"] = template.format(name=DIGIT_NAMES[digit])
    else:
        item.update(split.image_item(source) if mods[0] == "image" else split.audio_item(source))
        if "text" in mods:
            sign, k = valid_changes(digit)[int(rng.integers(len(valid_changes(digit))))]
            item["text"] = change_text(sign, k, split.wordings, rng)
            target = digit + sign * k
    item["instruction"] = TASK_INSTRUCTIONS[task]
    return item, target


def eval_queries(split: DigitsSplit, task: str, seed: int = 0, max_queries: int | None = None) -> TaskQueries:
    """Deterministic test queries: every template x digit for text queries, every image / clip otherwise."""
    rng = np.random.default_rng([seed, 4, TASKS.index(task)])
    mods, gallery = task_modalities(task)
    items, targets = [], []
    if mods == ("text",):
        for template in split.templates:
            for digit in range(10):
                items.append({"text": template.format(name=DIGIT_NAMES[digit]),
                              "instruction": TASK_INSTRUCTIONS[task]})
                targets.append(digit)
    else:
        labels = split.image_labels if mods[0] == "image" else split.audio_labels
        order = np.arange(len(labels))
        if max_queries is not None and max_queries < len(order):
            order = np.sort(rng.permutation(len(order))[:max_queries])
        for i in order:
            item, target = _query(task, split, int(i), int(labels[i]), rng)
            items.append(item)
            targets.append(target)
    return TaskQueries(task, items, torch.tensor(targets, dtype=torch.int64), gallery)


def gallery(split: DigitsSplit, modality: str) -> tuple[list, torch.Tensor]:
    """Candidate items and their digits: every image or every clip of the split."""
    if modality == "image":
        return [split.image_item(i) for i in range(len(split.image_labels))], split.image_labels
    if modality == "audio":
        return [split.audio_item(j) for j in range(len(split.audio_labels))], split.audio_labels
    raise ValueError(f"modality must be 'image' or 'audio', got {modality!r}")

"""The `real` benchmark: seven retrieval tasks over real media installed from Debian and npm packages, written
as M-BEIR-format files (the layout `omniret.data.mbeir` reads and `omniret eval` scores).

| task | query -> candidate | source |
| --- | --- | --- |
| openclipart_text2image | a drawing's title -> the drawing | openclipart-svg |
| tuxpaint_image2text | a stamp -> its caption | tuxpaint-stamps-default |
| tuxpaint_audio2image | the caption spoken (espeak-ng / flite voices; in test also people's recordings) -> the stamp | tuxpaint-stamps-default |
| asterisk_text2audio | a transcript -> the recorded prompt | asterisk-core-sounds-en(-wav) |
| asterisk_audio2text | a recorded prompt -> its transcript | asterisk-core-sounds-en(-wav) |
| emoji_imagetext2image | an emoji + "with dark skin tone" / "as a woman" -> that variant | npm emoji-datasource-google |
| emoji_audiotext2image | the emoji's name spoken + the same change -> that variant | emoji + espeak-ng / flite |

The split is seeded and deterministic (`sources.common.is_test` on a group key): items that share a caption,
a transcript or an emoji (with all its variants) share a split, and so do groups whose media files are the same
bytes (found after a first pass makes the media), so no test image, recording or wording is in training;
stamps with a person's recording go to test. Spoken queries use the digits benchmark's voice split
(`digits.split_voices`): no test voice speaks in training. Change wordings are held out too.

Layout under the root: M-BEIR's (`mbeir` module docstring); the local pool of a task is its test gallery and
`cand_pool/global/mbeir_union_train_cand_pool.jsonl` holds every training candidate (as in M-BEIR); media
under `media/`; `real_benchmark.json` records the configuration, the counts and the build time.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from omniret.data.sources import asterisk, common, emoji, openclipart, tuxpaint
from omniret.data.sources.common import SourceMissing, is_test, normalize_text, write_atomic

SPLITS = ("train", "test")

# name -> (dataset id, dataset name, query modality, candidate modality, instructions (Eq. 1 task definitions))
TASKS = {
    "openclipart_text2image": ("1", "OpenClipart", "text", "image",
                               ("Find the drawing this title names.", "Retrieve the clip art with this title.")),
    "tuxpaint_image2text": ("2", "TuxPaintStamps", "image", "text",
                            ("Find the caption of this drawing.", "Retrieve the text that describes this picture.")),
    "tuxpaint_audio2image": ("3", "TuxPaintSpoken", "audio", "image",
                             ("Find the drawing this spoken caption describes.",
                              "Retrieve the picture that the speaker describes.")),
    "asterisk_text2audio": ("4", "AsteriskPrompts", "text", "audio",
                            ("Find the recording of someone saying this.", "Retrieve the spoken prompt with these words.")),
    "asterisk_audio2text": ("5", "AsteriskTranscripts", "audio", "text",
                            ("Find the transcript of this recording.", "Retrieve the words spoken here.")),
    "emoji_imagetext2image": ("6", "EmojiVariants", "image,text", "image",
                              ("Change the emoji as described and find the result.",
                               "Find this emoji with the requested change.")),
    "emoji_audiotext2image": ("7", "EmojiSpokenVariants", "audio,text", "image",
                              ("Change the spoken emoji as described and find its image.",
                               "Find the named emoji with the requested change.")),
}
COMPOSED_TASKS = ("emoji_imagetext2image", "emoji_audiotext2image")

# Held-out wordings of the emoji changes: no test wording occurs in training.
CHANGE_WORDINGS = {
    "train": {"tone": ("with {v} skin tone", "{v} skin tone", "make the skin {v}", "in a {v} skin tone"),
              "gender": ("as a {v}", "make it a {v}", "the {v} version")},
    "test": {"tone": ("change the skin tone to {v}", "same but {v} skinned"),
             "gender": ("turn it into a {v}", "now shown as a {v}")},
}

MANIFEST = "real_benchmark.json"
BUILD_VERSION = 2


@dataclass(frozen=True)
class RealConfig:
    seed: int = 0
    test_fraction: float = 0.4
    max_items: int | None = None  # per source, for small subsets (tests, development): a seeded choice
    spoken_train: int = 2  # TTS renderings per training caption (different voices)
    spoken_test: int = 1
    workers: int = 2  # rendering and speech synthesis processes
    # each emoji training query lists the unchanged emoji (the image query's own image; for a spoken query, the emoji
    # its name names) as its one hard negative in neg_cand_list: the test gallery holds it as a rival. Test queries
    # carry none. Off by default: both models gain with it, the dual encoder more (docs/real_benchmark.md)
    reference_negatives: bool = False
    # each emoji training query lists its siblings as hard negatives: the other variants the same emoji takes under
    # the same kind of change (the other skin tones; the other gender). Only the change text tells them apart from
    # the target, so they ask a model to read it. With reference_negatives too, the unchanged emoji comes first.
    sibling_negatives: bool = False

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def identity(self) -> dict:
        """The fields that name a build: every field, but those added later only when they differ from their
        default, so a benchmark built before a field existed keeps its folder and is not rebuilt; and `workers` at
        its default whatever it is (how many processes render changes no file; it stays in for the keys of the
        builds named before)."""
        ident = asdict(self)
        ident["workers"] = RealConfig.workers
        for name, default in LATER_FIELDS.items():
            if ident.get(name) == default:
                del ident[name]
        return ident

    @classmethod
    def from_manifest(cls, config) -> "RealConfig | None":
        """The configuration a manifest's "config" records (fields added since take their defaults); None when it
        is not one."""
        if not isinstance(config, dict):
            return None
        try:
            return cls(**{**LATER_FIELDS, **config})
        except TypeError:
            return None


# RealConfig fields added after benchmarks were built, at their defaults
LATER_FIELDS = {"reference_negatives": False, "sibling_negatives": False}


@dataclass
class TaskData:
    """One task's queries and gallery in one split, as M-BEIR records."""
    queries: list = field(default_factory=list)
    pool: list = field(default_factory=list)


def _subset(items: list, key, cfg: RealConfig) -> list:
    """The first `max_items` by a seeded hash of each item's key (all when max_items is None). A group's split
    does not depend on this choice, so a subset agrees with the full benchmark, except for groups that the full
    benchmark merges through media or wordings the subset does not hold."""
    if cfg.max_items is None or len(items) <= cfg.max_items:
        return items
    rank = sorted(items, key=lambda it: hashlib.sha256(f"{cfg.seed}\0subset\0{key(it)}".encode()).digest())
    return sorted(rank[: cfg.max_items], key=key)


class Builder:
    """Collects records and media for every task, then writes the M-BEIR files."""

    def __init__(self, root: str, cfg: RealConfig, log=print, alias: dict | None = None, forced: set | None = None):
        self.root, self.cfg, self.log = root, cfg, log
        self.alias = alias or {}  # group -> the group it is merged with (same media content): one split
        self.forced_test = set(forced or ())  # representative groups that must be test
        self.forced: set = set()  # groups this builder was asked to put in test
        self.links: dict = {}  # ("file", relative path) or ("text", wording) -> the groups that use it
        self._group = None
        self.tasks = {name: {s: TaskData() for s in SPLITS} for name in TASKS}
        self.counters = {name: 0 for name in TASKS}
        self.media_jobs: dict = {}  # destination (relative) -> (function, source)
        self.speech_jobs: dict = {}  # destination (relative) -> (text, rendering)
        self.voices = None

    # ------------------------------------------------------------------ ids and media
    def _id(self, task: str) -> str:
        self.counters[task] += 1
        return f"{TASKS[task][0]}:{self.counters[task]}"

    def _media(self, rel: str, fn, src: str) -> str:
        self.media_jobs.setdefault(rel, (fn, src))
        self.links.setdefault(("file", rel), set()).add(self._group)
        return rel

    def image(self, kind: str, key: str, src: str) -> str:
        fn = common.render_svg if src.endswith(".svg") else common.write_image
        return self._media(f"media/{kind}/{key}.png", fn, src)

    def audio(self, kind: str, key: str, src: str) -> str:
        return self._media(f"media/{kind}/{key}.wav", common.write_audio, src)

    def speech(self, text: str, split: str, rng: np.random.Generator) -> tuple:
        """A seeded voice of `split` speaks `text`; returns (the WAV's path, synthesised later once, the voice)."""
        from omniret.data import tts

        voice = self.voices[split][int(rng.integers(len(self.voices[split])))]
        rendering = tts.renderings_for(voice, 1, rng)[0]
        digest = hashlib.sha256(json.dumps([text, asdict(rendering)], sort_keys=True).encode()).hexdigest()[:20]
        rel = f"media/tts/{digest}.wav"
        self.speech_jobs.setdefault(rel, (text, rendering))
        return rel, voice.key

    def add_candidate(self, task: str, split: str, modality: str, txt=None, img=None, audio=None) -> str:
        did = self._id(task)
        rec = {"did": did, "modality": modality, "txt": txt, "img_path": img}
        if audio is not None:
            rec["audio_path"] = audio
        self.tasks[task][split].pool.append(rec)
        return did

    def add_query(self, task: str, split: str, positives: list, txt=None, img=None, audio=None,
                  negatives: list | None = None, **extra) -> None:
        rec = {"qid": self._id(task), "query_modality": TASKS[task][2], "query_txt": txt, "query_img_path": img,
               "pos_cand_list": sorted(positives), "neg_cand_list": list(negatives or []),
               "task_id": int(TASKS[task][0])}
        if audio is not None:
            rec["query_audio_path"] = audio
        rec.update(extra)
        self.tasks[task][split].queries.append(rec)

    def split_of(self, group: str, force_test: bool = False) -> str:
        """The group's split; the media added next belong to this group. Merged groups share their
        representative's split, and a component with a group forced to test is test."""
        self._group = group
        if force_test:
            self.forced.add(group)
        rep = self.alias.get(group, group)
        if force_test or rep in self.forced_test:
            return "test"
        return "test" if is_test(rep, self.cfg.seed, self.cfg.test_fraction) else "train"

    def wording(self, text: str) -> None:
        """The current group uses this wording (a caption, title, transcript or spoken name)."""
        self.links.setdefault(("text", normalize_text(text)), set()).add(self._group)

    def content_aliases(self) -> dict:
        """Groups that share media bytes (a flag drawn twice, two emoji that Google draws alike) or a wording
        (a stamp captioned "Four." and the prompt "four"), merged: group -> the smallest group of its
        component."""
        from omniret.data.frozen_features import file_sha256

        parent: dict = {}

        def find(g):
            while parent.setdefault(g, g) != g:
                parent[g] = parent[parent[g]]
                g = parent[g]
            return g

        by_content: dict = {}
        for (kind, name), groups in sorted(self.links.items()):
            if kind == "file":
                path = os.path.join(self.root, name)
                if not os.path.exists(path):
                    continue
                name = file_sha256(path)
            by_content.setdefault((kind, name), set()).update(groups)
        for groups in by_content.values():
            first, *rest = sorted(groups)
            for g in rest:
                a, b = find(first), find(g)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        return {g: find(g) for g in parent if find(g) != g}

    def rng(self, *key) -> np.random.Generator:
        words = [int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:4], "big") for k in key]
        return np.random.default_rng([self.cfg.seed, *words])

    # ------------------------------------------------------------------ sources
    def add_openclipart(self) -> None:
        drawings = _subset(openclipart.drawings(), lambda d: d.key, self.cfg)
        by_title: dict = {}
        for d in drawings:
            by_title.setdefault(normalize_text(d.title), []).append(d)
        task = "openclipart_text2image"
        for title_key, group in sorted(by_title.items()):
            split = self.split_of(f"openclipart\0{title_key}")
            self.wording(group[0].title)
            dids = [self.add_candidate(task, split, "image", img=self.image("openclipart", d.key, d.path))
                    for d in group]
            self.add_query(task, split, dids, txt=group[0].title)

    def add_tuxpaint(self) -> None:
        stamps = _subset(tuxpaint.stamps(), lambda s: s.key, self.cfg)
        by_caption: dict = {}
        for s in stamps:
            by_caption.setdefault(normalize_text(s.caption), []).append(s)
        for caption_key, group in sorted(by_caption.items()):
            # a person's recording of a caption is a test query: its whole caption group goes to test
            recorded = any(s.spoken for s in group)
            split = self.split_of(f"tuxpaint\0{caption_key}", force_test=recorded)
            caption = group[0].caption
            self.wording(caption)
            text_did = self.add_candidate("tuxpaint_image2text", split, "text", txt=caption)
            images = [self.image("tuxpaint", s.key, s.image) for s in group]
            for img in images:
                self.add_query("tuxpaint_image2text", split, [text_did], img=img)
            dids = [self.add_candidate("tuxpaint_audio2image", split, "image", img=img) for img in images]
            rng = self.rng("tuxpaint-speech", caption_key)
            count = self.cfg.spoken_test if split == "test" else self.cfg.spoken_train
            for _ in range(count):
                wav, voice = self.speech(caption, split, rng)
                self.add_query("tuxpaint_audio2image", split, dids, audio=wav, speaker=voice)
            for s in group:
                if s.spoken:
                    self.add_query("tuxpaint_audio2image", split, dids,
                                   audio=self.audio("tuxpaint_spoken", s.key, s.spoken), speaker="human")

    def add_asterisk(self) -> None:
        prompts = _subset(asterisk.prompts(), lambda p: p.key, self.cfg)
        by_text: dict = {}
        for p in prompts:
            by_text.setdefault(normalize_text(p.transcript), []).append(p)
        for text_key, group in sorted(by_text.items()):
            split = self.split_of(f"asterisk\0{text_key}")
            self.wording(group[0].transcript)
            clips = [self.audio("asterisk", p.key, p.audio) for p in group]
            dids = [self.add_candidate("asterisk_text2audio", split, "audio", audio=a) for a in clips]
            self.add_query("asterisk_text2audio", split, dids, txt=group[0].transcript)
            text_did = self.add_candidate("asterisk_audio2text", split, "text", txt=group[0].transcript)
            for a in clips:
                self.add_query("asterisk_audio2text", split, [text_did], audio=a)

    def add_emoji(self) -> None:
        all_emoji, pairs = emoji.read_emoji()
        groups = sorted({e.group for e in all_emoji})
        keep = set(groups)
        if self.cfg.max_items:  # a subset must still hold composed pairs: groups with variants, some without
            paired = sorted({p.base.group for p in pairs})
            few = RealConfig(**{**asdict(self.cfg), "max_items": max(1, self.cfg.max_items // 4)})
            keep = set(_subset(paired, lambda g: g, self.cfg)) | set(_subset(groups, lambda g: g, few))
        dids = {name: {} for name in COMPOSED_TASKS}
        images = {}
        for e in all_emoji:
            if e.group not in keep:
                continue
            split = self.split_of(f"emoji\0{e.group}")
            images[e.unified] = self.image("emoji", e.unified, e.image)
            for task in COMPOSED_TASKS:
                dids[task][e.unified] = self.add_candidate(task, split, "image", img=images[e.unified])
        pairs = [p for p in pairs if p.base.group in keep and p.target.group == p.base.group]
        targets: dict = {}  # (base, kind of change) -> the variants it takes
        for p in pairs:
            targets.setdefault((p.base.unified, p.kind), []).append(p.target.unified)
        spoken = {}
        for p in pairs:
            split = self.split_of(f"emoji\0{p.base.group}")
            rng = self.rng("emoji-change", p.base.unified, p.target.unified)
            options = CHANGE_WORDINGS[split][p.kind]
            change = options[int(rng.integers(len(options)))].format(v=p.value)
            rivals = []  # the training query's hard negatives; test queries carry none
            if split == "train" and self.cfg.reference_negatives:
                rivals.append(p.base.unified)
            if split == "train" and self.cfg.sibling_negatives:
                rivals += [u for u in targets[p.base.unified, p.kind] if u != p.target.unified]
            negatives = {task: [dids[task][u] for u in rivals] for task in COMPOSED_TASKS}
            self.add_query("emoji_imagetext2image", split, [dids["emoji_imagetext2image"][p.target.unified]],
                           txt=change, img=images[p.base.unified], negatives=negatives["emoji_imagetext2image"])
            if p.base.unified not in spoken:  # one spoken name per base emoji, shared by its changes
                self.wording(p.base.name)
                spoken[p.base.unified] = self.speech(p.base.name, split, self.rng("emoji-speech", p.base.unified))
            wav, voice = spoken[p.base.unified]
            self.add_query("emoji_audiotext2image", split, [dids["emoji_audiotext2image"][p.target.unified]],
                           txt=change, audio=wav, negatives=negatives["emoji_audiotext2image"], speaker=voice)

    # ------------------------------------------------------------------ media and files
    def make_media(self, speech: bool = True) -> dict:
        """Render, convert and synthesise every media file not already in the root; returns failures
        (relative path -> message). Failed items are dropped from the records by `drop_failed`."""
        from tqdm.auto import tqdm

        from omniret.data import tts

        todo = [(rel, job) for rel, job in sorted(self.media_jobs.items())
                if not os.path.exists(os.path.join(self.root, rel))]
        spoken = [(rel, job) for rel, job in sorted(self.speech_jobs.items())
                  if speech and not os.path.exists(os.path.join(self.root, rel))]
        failed = {}

        def run(item):
            rel, job = item
            dst = os.path.join(self.root, rel)
            try:
                if rel.startswith("media/tts/"):
                    text, rendering = job
                    write_atomic(dst, common.wav_bytes(tts.synthesize(text, rendering)))
                else:
                    fn, src = job
                    fn(src, dst)
            except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as exc:  # one bad file, not the build
                return rel, str(exc)
            return rel, None

        with ThreadPoolExecutor(max_workers=max(1, self.cfg.workers)) as pool, \
                tqdm(total=len(todo) + len(spoken), desc="media", unit="file", leave=False) as bar:
            for rel, err in pool.map(run, todo + spoken):
                bar.update(1)
                if err:
                    failed[rel] = err
        return failed

    def drop_failed(self, failed: dict) -> None:
        """Remove candidates whose media failed, then queries left without a positive or whose own media failed."""
        if not failed:
            return
        for name, splits in self.tasks.items():
            for data in splits.values():
                bad = {c["did"] for c in data.pool if c.get("img_path") in failed or c.get("audio_path") in failed}
                data.pool = [c for c in data.pool if c["did"] not in bad]
                kept = []
                for q in data.queries:
                    if q.get("query_img_path") in failed or q.get("query_audio_path") in failed:
                        continue
                    q["pos_cand_list"] = [d for d in q["pos_cand_list"] if d not in bad]
                    if q["pos_cand_list"]:
                        kept.append(q)
                data.queries = kept

    def write(self) -> dict:
        """Write every M-BEIR file; returns the counts per task and split."""
        counts = {}
        union = {s: [] for s in SPLITS}
        for name, splits in self.tasks.items():
            counts[name] = {}
            for split, data in splits.items():
                counts[name][split] = {"queries": len(data.queries), "candidates": len(data.pool)}
                union[split].extend(data.pool)
                _write_jsonl(os.path.join(self.root, "query", split, f"mbeir_{name}_{split}.jsonl"), data.queries)
                qrels = "".join(f"{q['qid']} 0 {d} 1 {q['task_id']}\n" for q in data.queries for d in q["pos_cand_list"])
                write_atomic(os.path.join(self.root, "qrels", split, f"mbeir_{name}_{split}_qrels.txt"), qrels.encode())
            _write_jsonl(os.path.join(self.root, "cand_pool", "local", f"mbeir_{name}_cand_pool.jsonl"),
                         splits["test"].pool)
        for split in SPLITS:
            _write_jsonl(os.path.join(self.root, "cand_pool", "global", f"mbeir_union_{split}_cand_pool.jsonl"),
                         union[split])
        rows = ["query_modality\tcand_modality\tdataset_name\tdataset_id\t" +
                "\t".join(f"prompt_{i + 1}" for i in range(max(len(t[4]) for t in TASKS.values())))]
        for ds, ds_name, qmod, cmod, prompts in TASKS.values():
            rows.append("\t".join([qmod, cmod, ds_name, ds, *prompts]))
        write_atomic(os.path.join(self.root, "instructions", "query_instructions.tsv"), ("\n".join(rows) + "\n").encode())
        return counts


def _write_jsonl(path: str, records: list) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8"))


SOURCES = (("openclipart", "add_openclipart"), ("tuxpaint", "add_tuxpaint"), ("asterisk", "add_asterisk"),
           ("emoji", "add_emoji"))


def source_status() -> dict:
    """source -> None when installed, else the message saying what to install."""
    out = {}
    for name, probe in (("openclipart", lambda: common.require_paths("openclipart", {"openclipart-svg": openclipart.ROOT},
                                                                       openclipart.INSTALL_HINT)),
                        ("tuxpaint", lambda: common.require_paths("tuxpaint", {"tuxpaint-stamps-default": tuxpaint.ROOT},
                                                                    tuxpaint.INSTALL_HINT)),
                        ("asterisk", lambda: common.require_paths(
                            "asterisk", {"asterisk-core-sounds-en-wav": asterisk.SOUNDS,
                                         "asterisk-core-sounds-en": asterisk.TRANSCRIPTS}, asterisk.INSTALL_HINT)),
                        ("emoji", emoji.package_dir)):
        try:
            probe()
            out[name] = None
        except SourceMissing as exc:
            out[name] = str(exc)
    import shutil

    from omniret.data import tts

    if tts.missing_tools():
        out["speech"] = f"missing {', '.join(tts.missing_tools())}: {tts.INSTALL_HINT}"
    if shutil.which("rsvg-convert") is None:
        out["rsvg"] = "missing rsvg-convert: apt-get install librsvg2-bin"
    return out


def build(root: str, cfg: RealConfig | None = None, log=print) -> dict:
    """Build (or refresh) the benchmark under `root`; media already there are reused. Every source must be
    installed: a missing one raises SourceMissing naming its package. Returns the manifest."""
    from omniret.data import digits, tts

    cfg = cfg or RealConfig()
    missing = {k: v for k, v in source_status().items() if v}
    if missing:
        raise SourceMissing("the real benchmark needs every source; missing:\n  " + "\n  ".join(missing.values()))
    start = time.perf_counter()
    voices = digits.split_voices(tts.list_voices(), digits.DigitsConfig(seed=cfg.seed))
    # Two passes: the first makes the images and recordings and finds groups whose media are the same bytes;
    # the second puts each such component in one split, then speaks the queries.
    first = Builder(root, cfg, log)
    first.voices = voices
    for _, method in SOURCES:
        getattr(first, method)()
    log(f"real benchmark: {len(first.media_jobs)} media files under {root}")
    first.make_media(speech=False)
    alias = first.content_aliases()
    builder = Builder(root, cfg, log, alias=alias, forced={alias.get(g, g) for g in first.forced})
    builder.voices = voices
    for _, method in SOURCES:
        getattr(builder, method)()
    log(f"real benchmark: {len(alias)} groups merged with another of the same media; "
        f"{len(builder.speech_jobs)} spoken queries")
    failed = builder.make_media()
    if failed:
        log(f"real benchmark: {len(failed)} media files could not be made and are left out, e.g. "
            f"{next(iter(failed.items()))}")
    builder.drop_failed(failed)
    counts = builder.write()
    manifest = {
        "version": BUILD_VERSION, "config": asdict(cfg), "counts": counts, "failed_media": sorted(failed),
        "merged_groups": len(alias),
        "voices": {s: [v.key for v in vs] for s, vs in voices.items()}, "tools": tts.tool_versions(),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    write_atomic(os.path.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build the real-media benchmark (M-BEIR format).")
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-items", type=int, default=None, help="per source (a small subset)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reference-negatives", action="store_true",
                        help="list the unchanged emoji as each emoji training query's hard negative")
    parser.add_argument("--sibling-negatives", action="store_true",
                        help="list the other variants of the same change (other skin tones, the other gender) as "
                             "each emoji training query's hard negatives")
    args = parser.parse_args(argv)
    manifest = build(args.output, RealConfig(seed=args.seed, max_items=args.max_items, workers=args.workers,
                                             reference_negatives=args.reference_negatives,
                                             sibling_negatives=args.sibling_negatives))
    print(json.dumps(manifest["counts"], indent=1))
    print(f"built in {manifest['build_seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

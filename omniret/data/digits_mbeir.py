"""The digits benchmark (omniret/data/digits.py) written as M-BEIR-format files, so that the demo trains through
`omniret train`'s path (omniret.data.mbeir_train + Trainer) and `omniret eval` scores it.

    root = write_mbeir(digits.build(cfg), cache_root, seed=0)   # written once, then reused

Layout (omniret/data/mbeir.py), one root per split (train/, test/): one task file per demo task, named by its modalities (`text_image`, ...,
`image_text_audio`); images as 8-bit PNG, clips as 16-bit WAV under media/<split>/; an instruction table
holding digits.TASK_INSTRUCTIONS; labels/train.jsonl with every training image's and clip's digit (the towers'
warm-up). The training split enumerates what the demo's pair sampler drew at random: every template x digit for
the text tasks, every clip / image for the media tasks, and `composed_per_source` seeded changes per source item
for the composed tasks, each with `source_negatives` candidates of its unchanged digit as hard negatives. The
test split holds exactly digits.eval_queries' queries (held-out voices, templates and wordings) with qrels.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

import numpy as np

from omniret.data import digits
from omniret.files import publish_directory_once

__all__ = ["write_mbeir", "TASK_FILES", "TASK_KEYS", "VERSION"]

VERSION = 1
TASK_FILES = {task: task.replace("->", "_").replace("+", "_") for task in digits.TASKS}  # file-name stems
# the trainer's task names (omniret.data.mbeir_train.task_key: sorted modalities) for each demo task
TASK_KEYS = {task: ",".join(sorted(task.split("->")[0].split("+"))) + "->" + task.split("->")[1]
             for task in digits.TASKS}
_DATASET_IDS = {task: str(11 + i) for i, task in enumerate(digits.TASKS)}  # qid prefixes; candidates: 1 and 2
_CANDIDATE_IDS = {"image": "1", "audio": "2"}


def _write_media(split: digits.DigitsSplit, root: str, name: str) -> dict:
    import soundfile as sf
    from PIL import Image

    paths = {"image": [], "audio": []}
    for modality in paths:
        os.makedirs(os.path.join(root, "media", name, modality), exist_ok=True)
    for i in range(len(split.image_labels)):
        rel = os.path.join("media", name, "image", f"{i:05d}.png")
        Image.fromarray((split.images[i].numpy() * 255).round().astype(np.uint8), mode="L").save(os.path.join(root, rel))
        paths["image"].append(rel)
    for j, wave in enumerate(split.waves):
        rel = os.path.join("media", name, "audio", f"{j:05d}.wav")
        sf.write(os.path.join(root, rel), wave, 16000, subtype="PCM_16")
        paths["audio"].append(rel)
    return paths


def _jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _pool(paths: dict, modality: str) -> list:
    key = "img_path" if modality == "image" else "audio_path"
    return [{"did": f"{_CANDIDATE_IDS[modality]}:{i}", "modality": modality, "txt": None, key: p}
            for i, p in enumerate(paths[modality])]


def _labels(split: digits.DigitsSplit, modality: str) -> np.ndarray:
    return (split.image_labels if modality == "image" else split.audio_labels).numpy()


def _query_row(task: str, n: int, text, source_path, modality_of_source) -> dict:
    mods, _ = digits.task_modalities(task)
    row = {"qid": f"{_DATASET_IDS[task]}:{n}", "query_modality": ",".join(sorted(mods)), "query_txt": text,
           "task_id": digits.TASKS.index(task) + 1}
    if source_path is not None:
        row["query_img_path" if modality_of_source == "image" else "query_audio_path"] = source_path
    return row


def _train_queries(split, paths, task, rng, composed_per_source, source_negatives) -> list:
    mods, cand = digits.task_modalities(task)
    by_digit = {m: [np.nonzero(_labels(split, m) == d)[0] for d in range(10)] for m in ("image", "audio")}
    dids = lambda m, d: [f"{_CANDIDATE_IDS[m]}:{i}" for i in by_digit[m][d]]  # noqa: E731
    rows = []
    if mods == ("text",):
        for template in split.templates:
            for d in range(10):
                row = _query_row(task, len(rows), template.format(name=digits.DIGIT_NAMES[d]), None, None)
                rows.append({**row, "pos_cand_list": dids(cand, d), "neg_cand_list": []})
        return rows
    source = mods[0]
    for i, d in enumerate(_labels(split, source)):
        d = int(d)
        if len(mods) == 1:
            row = _query_row(task, len(rows), None, paths[source][i], source)
            rows.append({**row, "pos_cand_list": dids(cand, d), "neg_cand_list": []})
            continue
        for _ in range(composed_per_source):
            changes = digits.valid_changes(d)
            sign, k = changes[int(rng.integers(len(changes)))]
            text = digits.change_text(sign, k, split.wordings, rng)
            same = dids(cand, d)
            negatives = [same[int(x)] for x in rng.choice(len(same), min(source_negatives, len(same)), replace=False)]
            row = _query_row(task, len(rows), text, paths[source][i], source)
            rows.append({**row, "pos_cand_list": dids(cand, d + sign * k), "neg_cand_list": negatives})
    return rows


def _test_queries(split, paths, task, seed) -> tuple:
    """digits.eval_queries' queries as rows, with their qrels lines."""
    mods, cand = digits.task_modalities(task)
    tq = digits.eval_queries(split, task, seed=seed)
    cand_labels = _labels(split, cand)
    rows, qrels = [], []
    for n, (item, target) in enumerate(zip(tq.items, tq.targets.tolist())):
        source_path = None if mods == ("text",) else paths[mods[0]][n]  # eval_queries: one per source, in order
        row = _query_row(task, n, item.get("text"), source_path, mods[0])
        positives = [f"{_CANDIDATE_IDS[cand]}:{j}" for j in np.nonzero(cand_labels == target)[0]]
        rows.append({**row, "pos_cand_list": positives, "neg_cand_list": []})
        qrels += [f"{row['qid']} 0 {did} 1 {row['task_id']}" for did in positives]
    return rows, qrels


def _instructions(root: str) -> None:
    os.makedirs(os.path.join(root, "instructions"), exist_ok=True)
    lines = ["query_modality\tcand_modality\tdataset_name\tdataset_id\tprompt_1"]
    for task in digits.TASKS:
        mods, cand = digits.task_modalities(task)
        lines.append(f"{','.join(sorted(mods))}\t{cand}\tdigits {task}\t{_DATASET_IDS[task]}\t"
                     f"{digits.TASK_INSTRUCTIONS[task]}")
    with open(os.path.join(root, "instructions", "query_instructions.tsv"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _fill(bench: dict, top: str, seed: int, composed_per_source: int, source_negatives: int) -> None:
    for name, split in bench.items():
        root = os.path.join(top, name)  # M-BEIR's local pools are named per task, not per split: a root per split
        _instructions(root)
        paths = _write_media(split, root, name)
        rng = np.random.default_rng([seed, 7])
        for task in digits.TASKS:
            stem = TASK_FILES[task]
            _, cand = digits.task_modalities(task)
            _jsonl(os.path.join(root, "cand_pool", "local", f"mbeir_{stem}_cand_pool.jsonl"), _pool(paths, cand))
            if name == "train":
                rows = _train_queries(split, paths, task, rng, composed_per_source, source_negatives)
            else:
                rows, qrels = _test_queries(split, paths, task, seed)
                os.makedirs(os.path.join(root, "qrels", name), exist_ok=True)
                with open(os.path.join(root, "qrels", name, f"mbeir_{stem}_{name}_qrels.txt"), "w") as f:
                    f.write("\n".join(qrels) + "\n")
            _jsonl(os.path.join(root, "query", name, f"mbeir_{stem}_{name}.jsonl"), rows)
        if name == "train":
            _jsonl(os.path.join(root, "labels", "train.jsonl"),
                   [{"modality": m, "path": p, "label": int(label)}
                    for m in ("image", "audio") for p, label in zip(paths[m], _labels(split, m))])


def write_mbeir(bench: dict, cache_root: str, seed: int = 0, composed_per_source: int = 3,
                source_negatives: int = 8, identity: dict | None = None, name: str | None = None) -> str:
    """Write `bench` ({"train": DigitsSplit, "test": DigitsSplit}) under `cache_root/mbeir-<key>/<split>` once
    (into a temporary directory, then renamed: an interrupted write leaves nothing); returns
    `cache_root/<name>` (default `mbeir-<key>`), whose `train/` and `test/` are M-BEIR roots of split train and
    test; an existing one is kept as it is. The key
    covers `identity` (the data's configuration), the seed, the sizes and this module's VERSION."""
    ident = {"version": VERSION, "seed": seed, "composed_per_source": composed_per_source,
             "source_negatives": source_negatives, "identity": identity or {},
             "sizes": {n: [len(s.image_labels), len(s.waves)] for n, s in bench.items()}}
    key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = os.path.join(cache_root, name or f"mbeir-{key}")
    if os.path.exists(os.path.join(root, "identity.json")):
        return root

    def fill(tmp: str) -> None:
        _fill(bench, tmp, seed, composed_per_source, source_negatives)
        with open(os.path.join(tmp, "identity.json"), "w") as f:
            json.dump(ident, f, default=str)

    publish_directory_once(root, fill, prefix=".tmp-mbeir-")
    return root


def main(argv=None) -> int:
    """`python -m omniret.data.digits_mbeir --output DIR`: build the digits benchmark and write it to DIR/train and
    DIR/test (the data of configs/demo.yaml)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m omniret.data.digits_mbeir", description=main.__doc__)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-cache", default=None, help="where the synthesised speech is cached")
    args = p.parse_args(argv)
    cfg = digits.DigitsConfig(seed=args.seed)
    bench = digits.build(cfg, cache_dir=args.data_cache)
    parent, name = os.path.split(os.path.abspath(args.output))
    root = write_mbeir(bench, parent, seed=args.seed, identity=asdict(cfg), name=name)
    print(f"wrote {root}/train and {root}/test")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training examples from an M-BEIR-format split (the layout of omniret/data/mbeir.py, which `omniret eval` reads).

    data = MBEIRTrainSet("data/mbeir", split="train", seed=0)
    Trainer(model, config).fit(data)

Every query of every task file under `query/<split>/` is one example. Its task is the modality pair
`"<query modality>-><candidate modality>"` (e.g. "image,text->audio"), its data set the id prefix of its qid, so
the trainer's task-balanced sampler draws tasks and data sets as the paper does (section 5.1). What an example
holds is drawn when the trainer asks for it (`draw(i, step)`), seeded by (seed, qid, step): one positive of its
`pos_cand_list` (or qrels), up to `hard_negatives` of its `neg_cand_list`, and the Eq. 1 instruction, one of the
instruction table's prompts for its data set and modality pair. The same step of a resumed run draws the same.

A tower warm-up stage (omniret.train.trainer.StageConfig kind "tower_warmup") reads class labels of media from
`labels/<split>.jsonl` ({"modality": "image", "path": "<relative path>", "label": 3} per line), an extension of
the layout for encoders that start untrained (the digits demo's).

The whole split is checked before training starts (mbeir.validate: malformed lines, missing media files,
relevant candidates not in the pool, queries without a positive, missing instructions; here also hard negatives
not in the pool): any problem is one ValueError listing them, never a crash an hour in.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from omniret.data import mbeir

__all__ = ["MBEIRTrainSet", "task_key"]


def task_key(query_modality: str, cand_modality: str) -> str:
    """The sampler's task name for a modality pair: "image,text->audio"."""
    return f"{mbeir.canonical_modality(query_modality)}->{mbeir.canonical_modality(cand_modality)}"


@dataclass
class _Example:
    query: mbeir.Query
    task: str
    dataset: str
    pool: str
    positives: List[str]
    negatives: List[str]


class MBEIRTrainSet:
    """A training split as trainer examples: `len()`, `groups` ((task, data set) per example) and `draw(i, step)`
    -> {"query", "candidate", "candidate_id", "relevant_ids", "negatives", "negative_ids", "task", "dataset"}
    (every relevant candidate is masked out of the query's negatives); `dataset[i]` is `draw(i, 0)`.
    `use_global`: queries search the union pool of the split (cand_pool/global/mbeir_union_<split>_cand_pool.jsonl),
    as M-BEIR's training data do, instead of each task's local pool."""

    def __init__(self, root: str, split: str = "train", tasks: Optional[Sequence[str]] = None, seed: int = 0,
                 hard_negatives: int = 0, check_files: bool = True, use_global: bool = False):
        if hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0, got {hard_negatives}")
        problems, (loaded, pools, table) = mbeir.validate(str(root), split, list(tasks) if tasks else None,
                                                          use_global=use_global, check_files=check_files)
        self.pools: Dict[str, Dict[str, mbeir.Candidate]] = {name: {c.did: c for c in cands}
                                                             for name, cands in pools.items()}
        examples: List[_Example] = []
        for task in loaded:
            pool = self.pools.get(task.pool_name, {})
            for q in task.queries:
                for did in q.negatives:
                    if not isinstance(did, str) or did not in pool:
                        problems.append(mbeir.Problem(task.name, 0, f"query {q.qid}: hard negative {did!r} is not "
                                                                    f"in the {task.pool_name} pool"))
                positives = sorted(task.relevant[q.qid])
                if not positives:
                    continue  # validate() has reported it
                examples.append(_Example(q, task_key(q.modality, task.cand_modality), mbeir.dataset_id_of(q.qid),
                                         task.pool_name, positives,
                                         [d for d in q.negatives if isinstance(d, str) and d in pool]))
        if problems:
            raise ValueError(f"M-BEIR training data in {root} (split {split!r}): {mbeir.format_report(problems)}")
        self.root, self.split, self.seed, self.hard_negatives = str(root), split, int(seed), int(hard_negatives)
        self.instructions = table
        self.examples = examples
        self.groups = [(ex.task, ex.dataset) for ex in examples]

    def __len__(self) -> int:
        return len(self.examples)

    def tasks(self) -> List[str]:
        return sorted({ex.task for ex in self.examples})

    def _candidate(self, ex: _Example, did: str) -> dict:
        return mbeir.candidate_item(self.pools[ex.pool][did])

    def draw(self, i: int, step: int) -> dict:
        """Example i as drawn at optimizer step `step`: its positive, hard negatives and instruction are a seeded
        choice of (seed, qid, step), so they vary over training and a resumed run draws the same."""
        ex = self.examples[i]
        rng = random.Random(f"{self.seed}:{ex.query.qid}:{step}")
        positive = ex.positives[rng.randrange(len(ex.positives))]
        negatives = rng.sample(ex.negatives, min(self.hard_negatives, len(ex.negatives)))
        cand_modality = ex.task.split("->", 1)[1]
        options = self.instructions.prompts(ex.dataset, ex.query.modality, cand_modality)
        instruction = options[rng.randrange(len(options))] if options else None
        return {"query": mbeir.query_item(ex.query, instruction), "candidate": self._candidate(ex, positive),
                "candidate_id": positive, "relevant_ids": list(ex.positives), "negative_ids": list(negatives),
                "negatives": [self._candidate(ex, d) for d in negatives],
                "task": ex.task, "dataset": ex.dataset}

    def __getitem__(self, i: int) -> dict:
        return self.draw(i, 0)

    def labelled_media(self, modalities: Sequence[str]) -> Dict[str, tuple]:
        """{modality: (media paths, integer labels)} from labels/<split>.jsonl, for the named modalities; a
        ValueError naming the file and line for anything missing or malformed."""
        import os

        import torch

        path = os.path.join(self.root, "labels", f"{self.split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"tower warm-up: no labels file {path}")
        problems: list = []
        out: Dict[str, tuple] = {m: ([], []) for m in modalities}
        for n, obj in mbeir.read_jsonl(path, problems):
            modality, rel, label = obj.get("modality"), obj.get("path"), obj.get("label")
            if modality not in out:
                continue
            if not isinstance(rel, str) or not isinstance(label, int) or label < 0:
                problems.append(mbeir.Problem(path, n, "need a path string and a label int >= 0"))
                continue
            full = rel if os.path.isabs(rel) else os.path.join(self.root, rel)
            if not os.path.exists(full):
                problems.append(mbeir.Problem(path, n, f"missing {modality} file {full}"))
            out[modality][0].append(full)
            out[modality][1].append(label)
        for m, (items, _) in out.items():
            if not items:
                problems.append(mbeir.Problem(path, 0, f"no labelled {m} item"))
        if problems:
            raise ValueError(f"tower warm-up labels: {mbeir.format_report(problems)}")
        return {m: (items, torch.tensor(labels)) for m, (items, labels) in out.items()}

"""Task-balanced batches (paper section 5.1): each batch draws k random tasks, one or two data sets per task,
and the same number of examples per task, so that every batch holds many in-task hard negatives.

`TaskBalancedSampler(groups, batch_size, tasks_per_batch=4)` yields lists of example indices forever;
`groups[i] = (task, dataset)` of example i. Within a data set, examples are drawn without replacement from a
seeded permutation, reshuffled when exhausted (epochs per data set). `state_dict()` / `load_state_dict()`
capture everything (generator, permutations, cursors), so a resumed run draws the same batches.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

__all__ = ["TaskBalancedSampler", "groups_of"]


def groups_of(dataset) -> List[Tuple[str, str]]:
    """(task, dataset) of every example: `dataset.groups` when present (cheap), else read from the items."""
    groups = getattr(dataset, "groups", None)
    if groups is not None:
        return [(str(t), str(d)) for t, d in groups]
    out = []
    for i in range(len(dataset)):
        ex = dataset[i]
        out.append((str(ex.get("task", "default")), str(ex.get("dataset", ex.get("task", "default")))))
    return out


def _split(total: int, parts: int) -> List[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class TaskBalancedSampler:
    def __init__(self, groups: Sequence[Tuple[str, str]], batch_size: int, tasks_per_batch: int = 4,
                 datasets_per_task: Tuple[int, int] = (1, 2), tasks: Optional[Sequence[str]] = None,
                 seed: int = 0, task_counts: Optional[Dict[str, int]] = None):
        """task_counts: {task: examples per batch}: every batch holds exactly these (in this order), instead of
        `tasks_per_batch` random tasks sharing `batch_size`; the tasks it names are the allowed ones."""
        if task_counts is not None:
            if not task_counts or min(int(n) for n in task_counts.values()) < 1:
                raise ValueError(f"task_counts must give every task >= 1 example, got {task_counts}")
            tasks = list(task_counts)
            batch_size = sum(int(n) for n in task_counts.values())
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if tasks_per_batch < 1:
            raise ValueError(f"tasks_per_batch must be >= 1, got {tasks_per_batch}")
        lo, hi = datasets_per_task
        if not 1 <= lo <= hi:
            raise ValueError(f"datasets_per_task must be (lo, hi) with 1 <= lo <= hi, got {datasets_per_task}")
        index: Dict[str, Dict[str, List[int]]] = OrderedDict()
        allowed = None if tasks is None else set(tasks)
        for i, (task, ds) in enumerate(groups):
            if allowed is not None and task not in allowed:
                continue
            index.setdefault(task, OrderedDict()).setdefault(ds, []).append(i)
        if not index:
            raise ValueError(f"tasks: no example belongs to the allowed tasks {sorted(allowed or [])}")
        if allowed is not None and allowed - set(index):  # a shared recipe (configs/paper.yaml) names more tasks
            warnings.warn(f"tasks: no example for {sorted(allowed - set(index))}; sampling {sorted(index)}")
        self.index = index
        self.task_names = list(index)
        self.batch_size = batch_size
        self.tasks_per_batch = min(tasks_per_batch, len(self.task_names))
        self.datasets_per_task = (lo, hi)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.perms: Dict[Tuple[str, str], List[int]] = {}
        self.cursors: Dict[Tuple[str, str], int] = {}
        self.batches_drawn = 0
        self.task_counts = None if task_counts is None else {str(t): int(n) for t, n in task_counts.items()}

    def __len__(self):  # an infinite sampler; len() is the number of examples it draws from
        return sum(len(v) for d in self.index.values() for v in d.values())

    def _take(self, task: str, ds: str, n: int) -> List[int]:
        """n distinct examples of (task, ds) (at most its size), continuing its shuffled epoch."""
        pool = self.index[task][ds]
        n = min(n, len(pool))
        key = (task, ds)
        out: List[int] = []
        while len(out) < n:
            if key not in self.perms or self.cursors[key] >= len(pool):
                order = torch.randperm(len(pool), generator=self.generator).tolist()
                taken = set(out)  # a fresh epoch must not repeat what this batch already holds
                order = [j for j in order if pool[j] not in taken] + [j for j in order if pool[j] in taken]
                self.perms[key] = order
                self.cursors[key] = 0
            j = self.perms[key][self.cursors[key]]
            self.cursors[key] += 1
            out.append(pool[j])
        return out

    def next_batch(self) -> List[int]:
        g = self.generator
        if self.task_counts is not None:
            chosen = [self.task_names.index(t) for t in self.task_counts]
            shares = list(self.task_counts.values())
        else:
            chosen = sorted(torch.randperm(len(self.task_names), generator=g)[: self.tasks_per_batch].tolist())
            shares = _split(self.batch_size, len(chosen))
        batch: List[int] = []
        for t_idx, per_task in zip(chosen, shares):
            task = self.task_names[t_idx]
            names = list(self.index[task])
            lo, hi = self.datasets_per_task
            k = int(torch.randint(lo, hi + 1, (1,), generator=g))
            k = min(k, len(names))
            picked = sorted(torch.randperm(len(names), generator=g)[:k].tolist())
            want = _split(per_task, k)
            for d_idx, n in zip(picked, want):
                batch.extend(self._take(task, names[d_idx], n))
        self.batches_drawn += 1
        return batch

    def __iter__(self) -> Iterator[List[int]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "generator": self.generator.get_state(),
            "perms": {f"{t}\x00{d}": p for (t, d), p in self.perms.items()},
            "cursors": {f"{t}\x00{d}": c for (t, d), c in self.cursors.items()},
            "batches_drawn": self.batches_drawn,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perms = {tuple(k.split("\x00")): list(v) for k, v in state["perms"].items()}
        self.cursors = {tuple(k.split("\x00")): int(v) for k, v in state["cursors"].items()}
        self.batches_drawn = int(state["batches_drawn"])

"""Underfit or overfit? Recall on training queries beside recall on test queries, for the two models of one
`omniret demo` run on the real benchmark.

    python -m omniret.demo.real_fit --run out/demo [--queries 300] [--json out/fit.json]

Training recall: per task, a seeded sample of up to `--queries` training queries against a gallery of every
positive of that task's training queries (312 to 1,680 candidates in the default build, about the size of the test
galleries). Test recall is the run's own `results.json`. A model whose training recall sits near its test recall
has not fitted what it was shown; one far above it has memorised. docs/real_benchmark.md ("Underfitting, and a
dimensional collapse in the projectors") reads it.
"""
from __future__ import annotations

import argparse
import json
import os
import random

from omniret.eval.evaluate import EvalTask, Pool
from omniret.files import atomic_write_json

__all__ = ["positives_gallery", "train_tasks", "main"]


def positives_gallery(task: EvalTask, pool: Pool, max_queries: int, seed: int = 0) -> tuple:
    """-> (EvalTask, Pool): `task` cut to a seeded sample of `max_queries` queries (all if fewer), searching a
    gallery of the candidates that are relevant to any of the task's queries (all of them, not only the
    sample's), in pool order. A query without a relevant candidate is refused: its recall would be zero by
    construction."""
    if max_queries < 1:
        raise ValueError(f"max_queries must be >= 1, got {max_queries}")
    empty = [i for i, rel in enumerate(task.relevant) if not len(rel)]
    if empty:
        raise ValueError(f"task {task.name!r}: {len(empty)} queries have no relevant candidate (first: {empty[0]})")
    kept = sorted({int(c) for rel in task.relevant for c in rel})
    position = {c: j for j, c in enumerate(kept)}
    order = list(range(len(task.queries)))
    random.Random(seed).shuffle(order)
    order = sorted(order[:max_queries])
    gallery = Pool(f"{task.name}/train_positives", [pool.items[c] for c in kept],
                   None if pool.ids is None else [pool.ids[c] for c in kept])
    sample = EvalTask(task.name, [task.queries[i] for i in order], gallery.name,
                      [[position[int(c)] for c in task.relevant[i]] for i in order],
                      ks=task.ks, group=task.group, primary_k=task.primary_k)
    return sample, gallery


def train_tasks(root: str, max_queries: int, seed: int = 0) -> tuple:
    """Every task of the benchmark at `root` on its training split, cut by `positives_gallery`."""
    from omniret.demo.real_demo import split_tasks

    tasks, pool_objs = split_tasks(root, "train", seed, use_global=True)
    out_tasks, out_pools = [], {}
    for task in tasks:
        sample, gallery = positives_gallery(task, pool_objs[task.pool], max_queries, seed)
        out_tasks.append(sample)
        out_pools[gallery.name] = gallery
    return out_tasks, out_pools


def main(argv=None) -> dict:
    from omniret.data.real_benchmark import COMPOSED_TASKS
    from omniret.demo import real_demo
    from omniret.eval.evaluate import evaluate
    from omniret.threads import apply_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="an `omniret demo` output folder (model/, baseline_model/, results.json)")
    p.add_argument("--queries", type=int, default=300, help="training queries per task (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    opts = real_demo.run_options(args.run, "real_fit")
    models = real_demo.load_run_models(args.run, "real_fit", opts.feature_cache)
    with open(os.path.join(args.run, "results.json"), encoding="utf-8") as f:
        ran = json.load(f)
    test = {"omniret": ran["tasks"], "dual_encoder": ran.get("baselines", {}).get("dual_encoder", {})}
    root = real_demo.ensure_benchmark(opts)
    real_demo.ensure_features(root, opts)
    tasks, pools = train_tasks(root, args.queries, args.seed)
    report: dict = {}
    for name, model in models.items():
        fit = evaluate(tasks, pools, model.encode_queries, model.encode_corpus, log=lambda *a: None)
        for task in tasks:
            row = {"train": fit.tasks[task.name], "test": test[name].get(task.name),
                   "train_queries": len(task.queries), "train_gallery": len(pools[task.pool].items)}
            report.setdefault(task.name, {})[name] = row
    print(f"{'R@5, train / test':45s} {'omniret':>16s}   {'dual encoder':>16s}")
    for task in sorted(report):
        cells = []
        for name in models:
            row = report[task][name]
            tested = row["test"]["R@5"] if row["test"] else float("nan")
            cells.append(f"{100 * row['train']['R@5']:5.1f} / {100 * tested:5.1f}")
        kind = " (composed)" if task in COMPOSED_TASKS else ""
        print(f"{task + kind:45s} {cells[0]:>16s}   {cells[1]:>16s}")
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()

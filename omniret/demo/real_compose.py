"""How much a composed query's text steers each model: the composed tasks' test queries encoded with and without
their text, for OmniRet and the dual encoder of one `omniret demo` run.

    python -m omniret.demo.real_compose --run out/demo [--json out/compose.json]

Per composed task and model it prints the mean cosine between a query's embedding with its text and without it
(1.0: the text changes nothing), and R@1 / R@5 with and without the text. docs/real_benchmark.md ("Muon for the
resamplers") reads it: on the emoji image+text task both models score the same without the text, and the text adds
far more to the dual encoder's recall than to OmniRet's.
"""
from __future__ import annotations

import argparse

import torch

from omniret.eval.evaluate import encode_pool
from omniret.eval.recall import normalize, recall_at_k
from omniret.files import atomic_write_json

__all__ = ["without_text", "text_effect", "main"]


def without_text(query: dict) -> dict:
    """The query with its text left out (its media and instruction kept); a query without media is refused."""
    rest = {k: v for k, v in query.items() if k != "text"}
    if not any(k in rest for k in ("image", "audio", "video")):
        raise ValueError(f"a composed query needs media besides its text, got keys {sorted(query)}")
    return rest


@torch.no_grad()
def text_effect(encode_queries, queries: list, candidates: torch.Tensor, relevant, ks=(1, 5)) -> dict:
    """{"cosine": mean cos(query, query without its text), "with": {"R@k": ...}, "without": {...}} for queries
    scored against candidate embeddings (C, E) with `relevant` as omniret.eval.recall takes it."""
    full = normalize(torch.as_tensor(encode_queries(queries)))
    bare = normalize(torch.as_tensor(encode_queries([without_text(q) for q in queries])))
    out = {"cosine": float((full * bare).sum(dim=1).mean())}
    for name, q in (("with", full), ("without", bare)):
        out[name] = {f"R@{k}": v for k, v in recall_at_k(q, candidates, relevant, ks).items()}
    return out


def main(argv=None) -> dict:
    from omniret.data.real_benchmark import COMPOSED_TASKS
    from omniret.demo import real_demo
    from omniret.threads import apply_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="an `omniret demo` output folder (model/ and baseline_model/)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers here")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    models = real_demo.load_run_models(args.run, "real_compose")
    opts = real_demo.RealDemoOptions(output=args.run, progress=False)
    root = real_demo.ensure_benchmark(opts)
    real_demo.ensure_features(root, opts)
    tasks, pools = real_demo.eval_tasks(root, opts)
    report: dict = {}
    for name, model in models.items():
        pool_cache: dict = {}
        for task in (t for t in tasks if t.name in COMPOSED_TASKS):
            if task.pool not in pool_cache:  # the two composed tasks search one gallery: encoded once per model
                pool_cache[task.pool] = encode_pool(pools[task.pool], model.encode_corpus, None, name)
            row = text_effect(model.encode_queries, task.queries, pool_cache[task.pool], task.relevant)
            report.setdefault(task.name, {})[name] = row
            print(f"{task.name:24s} {name:13s} cos(with, without text) {row['cosine']:.3f}  "
                  + "  ".join(f"{k} {100 * row['with'][k]:.1f} (without text {100 * row['without'][k]:.1f})"
                              for k in row["with"]))
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()

"""`omniret eval`: Recall@k per task and per task group on M-BEIR-format data (local pools by default)."""
from __future__ import annotations

import os
import sys

from omniret.commands._args import positive_int


def add_arguments(p) -> None:
    p.add_argument("--data", required=True, help="M-BEIR root (query/, cand_pool/, qrels/, instructions/)")
    p.add_argument("--model", default=None, help="a save_pretrained directory")
    p.add_argument("--preset", default=None, help="or an untrained preset (a smoke test of the pipeline)")
    p.add_argument("--split", default="test")
    p.add_argument("--tasks", default=None, help="comma-separated task names (file stems), default all")
    p.add_argument("--global-pool", action="store_true", help="search the union pool instead of local pools")
    p.add_argument("--output", default=None, help="directory for results.json and results.md")
    p.add_argument("--cache", default=None, help="candidate embedding cache (default OUTPUT/embedding_cache)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seed", type=int, default=0, help="seed of the instruction choice")
    p.add_argument("--validate-only", action="store_true", help="check the files and media, then stop")
    p.add_argument("--skip-file-check", action="store_true", help="do not stat every media file")
    p.add_argument("--force", action="store_true", help="evaluate even when the validator reports problems "
                                                        "(queries without relevant candidates score 0)")


def build_tasks(loaded, pools, table, seed: int = 0):
    from omniret.data import mbeir
    from omniret.eval.evaluate import EvalTask, Pool
    from omniret.eval.recall import primary_k, task_group

    pool_objs = {name: Pool(name, [mbeir.candidate_item(c) for c in cands], [c.did for c in cands])
                 for name, cands in pools.items()}
    tasks = []
    for t in loaded:
        if not t.queries or t.pool_name not in pool_objs:
            continue
        position = {did: i for i, did in enumerate(pool_objs[t.pool_name].ids)}
        items, relevant = [], []
        for q in t.queries:
            instruction = table.choose(q.qid, q.modality, t.cand_modality, seed) if table else None
            items.append(mbeir.query_item(q, instruction))
            relevant.append([position[d] for d in sorted(t.relevant[q.qid]) if d in position])
        k = primary_k(t.name)
        # a task has one query modality in M-BEIR; if a file mixes them, the richest one names the group
        qmod = max(sorted({q.modality for q in t.queries}), key=lambda m: len(m.split(",")))
        tasks.append(EvalTask(t.name, items, t.pool_name, relevant, ks=(1, 5, 10) if k == 10 else (1, 5),
                              group=task_group(qmod, t.cand_modality), primary_k=k))
    return tasks, pool_objs


def run(args) -> int:
    from omniret.data import mbeir

    names = [t.strip() for t in args.tasks.split(",")] if args.tasks else None
    problems, (loaded, pools, table) = mbeir.validate(args.data, args.split, names, args.global_pool,
                                                      check_files=not args.skip_file_check)
    print(mbeir.format_report(problems), file=sys.stderr if problems else sys.stdout)
    if args.validate_only:
        return 1 if problems else 0
    if problems and not args.force:
        print("omniret eval: fix the problems above (or pass --force) before a long run", file=sys.stderr)
        return 1
    from omniret.eval.cache import EmbeddingCache
    from omniret.eval.evaluate import evaluate, write_results
    from omniret.eval.io import load_model
    from omniret.fingerprint import fingerprint_model

    model = load_model(args.model, args.preset)
    tasks, pool_objs = build_tasks(loaded, pools, table, args.seed)
    cache_dir = args.cache or (os.path.join(args.output, "embedding_cache") if args.output else None)
    cache = EmbeddingCache(cache_dir) if cache_dir else None
    enc_q = lambda items: model.encode_queries(items, batch_size=args.batch_size, show_progress_bar=True)  # noqa
    enc_c = lambda items: model.encode_corpus(items, batch_size=args.batch_size, show_progress_bar=True)  # noqa
    results = evaluate(tasks, pool_objs, enc_q, enc_c, cache=cache, model_key=fingerprint_model(model))
    title = f"M-BEIR {args.split} ({'global' if args.global_pool else 'local'} pools)"
    print(results.to_markdown(title))
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        write_results(results, os.path.join(args.output, "results.json"), os.path.join(args.output, "results.md"),
                      title=title, model=args.model or args.preset, pool="global" if args.global_pool else "local")
    return 0

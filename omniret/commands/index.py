"""`omniret index`: a FAISS index bundle over a corpus (flat exact by default, IVF or HNSW as options)."""
from __future__ import annotations

import os

from omniret.commands._args import positive_int


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a save_pretrained directory; recorded in the bundle for search")
    p.add_argument("--corpus", required=True, help="jsonl of items or M-BEIR candidates (see `omniret encode`)")
    p.add_argument("--output", required=True, help="bundle directory to write; an existing bundle there is replaced "
                                                   "once the new one is complete, anything else is refused")
    p.add_argument("--kind", default="flat", choices=("flat", "ivf", "hnsw"))
    p.add_argument("--nlist", type=positive_int, default=None, help="IVF cells (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, default=None, help="IVF cells searched (default nlist / 8)")
    p.add_argument("--hnsw-m", type=positive_int, default=32)
    p.add_argument("--ef-search", type=positive_int, default=64)
    p.add_argument("--root", default=None, help="folder relative media paths start from")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--check-queries", default=None,
                   help="jsonl of queries: report the ANN index's recall@10 against exact search on them")


def run(args) -> int:
    from omniret.commands.encode import encode_file
    from omniret.eval.index import SearchIndex, ann_recall
    from omniret.eval.io import load_model
    from omniret.fingerprint import fingerprint_model

    model = load_model(args.model)
    ids, items, meta, emb = encode_file(model, args.corpus, root=args.root, batch_size=args.batch_size)
    ref = {"path": os.path.abspath(args.model), "fingerprint": fingerprint_model(model),
           "preset": model.config.preset, "pooling": model.config.pooling}
    index = SearchIndex.build(emb, ids=ids, items=meta, kind=args.kind, model=ref, nlist=args.nlist,
                              nprobe=args.nprobe, m=args.hnsw_m, ef_search=args.ef_search)
    index.save(args.output)
    print(f"indexed {len(index)} items ({args.kind} {index.params}) -> {args.output}")
    if args.check_queries and args.kind != "flat":
        _, _, _, q = encode_file(model, args.check_queries, queries=True, root=args.root, batch_size=args.batch_size)
        exact = SearchIndex.build(emb, kind="flat")
        print(f"ANN recall@10 against exact search on {len(q)} queries: {ann_recall(exact, index, q, 10):.4f}")
    return 0

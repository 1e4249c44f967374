"""`omniret search`: a query in any modality mix against an index bundle; prints the top k with scores."""
from __future__ import annotations

import json
import os
import sys

from omniret.commands._args import positive_int


def add_arguments(p) -> None:
    p.add_argument("--index", required=True, help="bundle directory written by `omniret index` or `omniret demo`")
    p.add_argument("--text", default=None)
    p.add_argument("--image", default=None, help="image file")
    p.add_argument("--audio", default=None, help="sound file (resampled to 16 kHz)")
    p.add_argument("--video", default=None, help="video file")
    p.add_argument("--instruction", default=None, help="task instruction (Eq. 1); none by default")
    p.add_argument("-k", type=positive_int, default=10)
    p.add_argument("--model", default=None, help="override the model recorded in the bundle (its weights must be "
                                                 "the ones the bundle was built with)")
    p.add_argument("--allow-model-mismatch", action="store_true",
                   help="search even when the model's weight fingerprint differs from the bundle's (scores of "
                        "another model's embeddings are not meaningful)")
    p.add_argument("--nprobe", type=positive_int, default=None)
    p.add_argument("--ef-search", type=positive_int, default=None)
    p.add_argument("--json", action="store_true", help="print the hits as JSON")


def run(args) -> int:
    from omniret.eval.index import SearchIndex
    from omniret.eval.io import load_model, query_from_args
    from omniret.fingerprint import fingerprint_model

    query = query_from_args(args)
    index = SearchIndex.load(args.index)
    model_path = args.model or index.model.get("path")
    if not model_path or not os.path.isdir(model_path):
        raise FileNotFoundError(f"the bundle's model {model_path!r} is not there; pass --model DIR")
    model = load_model(model_path)
    index.check_model(fingerprint_model(model), args.allow_model_mismatch,
                      warn=lambda message: print(f"omniret search: {message}", file=sys.stderr))
    index.set_search_params(nprobe=args.nprobe, ef_search=args.ef_search)
    q = model.encode_queries([query])
    scores, rows = index.search(q, args.k)
    hits = [{"rank": r + 1, "score": float(s), "id": index.ids[i], **index.items[i]}
            for r, (s, i) in enumerate(zip(scores[0], rows[0])) if i >= 0]
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    for h in hits:
        extra = {k: v for k, v in h.items() if k not in ("rank", "score", "id")}
        print(f"{h['rank']:>3}  {h['score']:.4f}  {h['id']}  " + "  ".join(f"{k}={v}" for k, v in extra.items()))
    return 0

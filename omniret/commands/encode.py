"""`omniret encode`: embed queries or a corpus from a jsonl file to an .npz (embeddings + ids)."""
from __future__ import annotations

import numpy as np

from omniret.commands._args import positive_int
from omniret.files import atomic_savez


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a save_pretrained directory (e.g. the demo's OUTPUT/model)")
    p.add_argument("--input", required=True, help="jsonl of items ({id, text, image, audio, video}) or M-BEIR "
                                                  "candidates ({did, txt, img_path, modality})")
    p.add_argument("--output", required=True, help=".npz file with `embeddings` (float32) and `ids`")
    p.add_argument("--queries", action="store_true", help="encode as queries (Eq. 1 template with an instruction)")
    p.add_argument("--instruction", default=None, help="task instruction for queries that carry none")
    p.add_argument("--root", default=None, help="folder that relative media paths start from (default: the "
                                                "input file's folder)")
    p.add_argument("--batch-size", type=positive_int, default=32)


def encode_file(model, path: str, queries: bool = False, instruction: str | None = None, root: str | None = None,
                batch_size: int = 32, progress: bool = True):
    from omniret.eval.io import read_items

    ids, items, meta = read_items(path, root)
    if queries:
        emb = model.encode_queries(items, instruction=instruction, batch_size=batch_size, show_progress_bar=progress)
    else:
        if instruction:
            raise ValueError("--instruction: candidates carry no instruction (add --queries for queries)")
        emb = model.encode_corpus(items, batch_size=batch_size, show_progress_bar=progress)
    return ids, items, meta, emb.numpy().astype(np.float32)


def run(args) -> int:
    from omniret.eval.io import load_model

    model = load_model(args.model)
    ids, _, _, emb = encode_file(model, args.input, args.queries, args.instruction, args.root, args.batch_size)
    # atomic: a kill or a full disk leaves the previous file, never a truncated one
    atomic_savez(args.output, embeddings=emb, ids=np.array(ids))
    print(f"encoded {len(ids)} {'queries' if args.queries else 'candidates'} -> {args.output} {emb.shape}")
    return 0

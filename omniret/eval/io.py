"""What the `encode`, `index`, `search` and `eval` commands share: loading a model and reading item files."""
from __future__ import annotations

import os

from omniret.data import mbeir

ITEM_KEYS = ("text", "image", "audio", "video", "instruction")


def load_model(path: str | None = None, preset: str | None = None, **overrides):
    """A trained model from a `save_pretrained` directory, or a fresh (untrained) preset."""
    from omniret.model.omniret import OmniRet

    if path:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model: {path!r} is not a directory written by save_pretrained "
                                    f"(e.g. the model/ folder that `omniret demo` writes)")
        model = OmniRet.from_pretrained(path, **overrides)
    elif preset:
        from omniret.config import preset as make_preset

        model = OmniRet.from_config(make_preset(preset, **overrides))
    else:
        raise ValueError("give --model DIR (a trained model) or --preset NAME")
    return model.eval()


def read_items(path: str, root: str | None = None) -> tuple[list, list, list]:
    """(ids, items, metadata) from a jsonl file. A line is either an item (`text`, `image`, `audio`, `video`
    paths, optional `id` and any other fields kept as metadata) or an M-BEIR candidate (`did`, `txt`,
    `img_path`, `modality`, ...). Relative media paths are relative to `root` (default: the file's folder)."""
    root = root or os.path.dirname(os.path.abspath(path))
    ids, items, meta = [], [], []
    problems: list = []
    # malformed lines become problems, reported together with the others below
    for n, obj in mbeir.read_jsonl(path, problems):
        if "did" in obj and "modality" in obj:
            cand = mbeir.parse_candidate(obj, root, path, n, problems)
            if cand is None:
                continue
            item = mbeir.candidate_item(cand)
            ids.append(cand.did)
        else:
            item = {}
            for key in ITEM_KEYS:
                value = obj.get(key)
                if value is None:
                    continue
                if key in ("image", "audio", "video") and isinstance(value, str) and not os.path.isabs(value):
                    value = os.path.join(root, value)
                item[key] = value
            if not any(k in item for k in ("text", "image", "audio", "video")):
                raise ValueError(f"{path}:{n}: an item needs text, image, audio or video")
            ids.append(str(obj.get("id", len(ids))))
        items.append(item)
        meta.append({k: v for k, v in obj.items() if not isinstance(v, (dict, list)) or k == "pos_cand_list"})
    if problems:
        raise ValueError(mbeir.format_report(problems))
    if not items:
        raise ValueError(f"{path}: no items")
    return ids, items, meta


def query_from_args(args) -> dict:
    """One query item from --text/--image/--audio/--video/--instruction."""
    item = {k: getattr(args, k) for k in ("image", "audio", "video", "text") if getattr(args, k, None)}
    if not item:
        raise ValueError("give the query as --text, --image, --audio and/or --video (any mix)")
    for key in ("image", "audio", "video"):
        if key in item and not os.path.exists(item[key]):
            raise FileNotFoundError(f"--{key}: no such file {item[key]!r}")
    if getattr(args, "instruction", None):
        item["instruction"] = args.instruction
    return item

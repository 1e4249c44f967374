"""M-BEIR-format retrieval data (SPEC section 6; UniIR's layout), extended with audio and video fields.

Layout under a root directory (the files of one task share the stem `mbeir_<name>`):

    query/<split>/mbeir_<name>_<split>.jsonl          {qid, query_txt, query_img_path, query_modality,
                                                         pos_cand_list, neg_cand_list[, query_audio_path,
                                                         query_video_path, task_id]}
    cand_pool/local/mbeir_<name>_cand_pool.jsonl        {did, txt, img_path, modality[, audio_path, video_path]}
    cand_pool/global/mbeir_union_<split>_cand_pool.jsonl   the union pool (optional)
    qrels/<split>/mbeir_<name>_<split>_qrels.txt        lines `qid 0 did rel task_id`
    instructions/query_instructions.tsv                 query_modality, cand_modality, dataset_name,
                                                         dataset_id, prompt_1 .. prompt_n

ids look like `<dataset_id>:<n>`; modalities are comma-separated ("image,text"). Media paths are relative to
the root and must stay inside it (absolute paths, `..` and symlinks leading out are refused). `validate` reports
every malformed line, missing media file and path outside the root before a long run starts.
"""
from __future__ import annotations

import csv
import glob
import json
import os
import random
from dataclasses import dataclass, field

MODALITIES = ("text", "image", "video", "audio")
QUERY_MEDIA_FIELDS = {"image": "query_img_path", "video": "query_video_path", "audio": "query_audio_path"}
CAND_MEDIA_FIELDS = {"image": "img_path", "video": "video_path", "audio": "audio_path"}


def canonical_modality(value: str) -> str:
    """'text,image' and 'image, text' -> 'image,text' (sorted), the key used everywhere."""
    parts = sorted({p.strip().lower() for p in str(value).replace("+", ",").split(",") if p.strip()})
    return ",".join(parts)


def dataset_id_of(id_: str) -> str:
    return str(id_).split(":", 1)[0]


@dataclass
class Problem:
    path: str
    line: int  # 1-based; 0 for the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


@dataclass
class Query:
    qid: str
    modality: str
    text: str | None
    media: dict  # modality -> absolute path
    positives: list
    negatives: list = field(default_factory=list)
    task_id: int | None = None


@dataclass
class Candidate:
    did: str
    modality: str
    text: str | None
    media: dict


def read_jsonl(path: str, problems: list):
    """Yield (line number, dict) for every well-formed line; malformed lines become Problems."""
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(Problem(path, n, f"not valid JSON ({exc.msg})"))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(path, n, "a line must be a JSON object"))
                continue
            yield n, obj


def _check_media(obj: dict, modality: str, fields: dict, root: str, path: str, n: int, problems: list,
                 check_files: bool) -> dict:
    parts = modality.split(",") if modality else []
    unknown = [p for p in parts if p not in MODALITIES]
    if unknown or not parts:
        problems.append(Problem(path, n, f"unknown modality {modality!r} (expected a mix of {MODALITIES})"))
    media = {}
    for mod, key in fields.items():
        value = obj.get(key)
        if mod in parts:
            if not isinstance(value, str) or not value:
                problems.append(Problem(path, n, f"modality {modality!r} needs a {key}"))
                continue
            escape = outside_root(value, root, resolve_links=check_files)
            if escape:  # refused: never opened, even under --force
                problems.append(Problem(path, n, f"{key} {value!r}: {escape}"))
                continue
            full = os.path.join(root, value)
            if check_files and not os.path.exists(full):
                problems.append(Problem(path, n, f"missing {mod} file {full}"))
            media[mod] = full
    return media


def outside_root(value: str, root: str, resolve_links: bool = True) -> str | None:
    """Why the media path `value` would read outside the data root `root` (None when it stays inside): it is
    absolute, climbs with "..", or (`resolve_links`) goes through a symlink that leads out of the root. A data
    set's files must not make a run read the rest of the machine."""
    if os.path.isabs(value) or value.startswith("~"):
        return "an absolute path; media paths must be relative to the data root"
    if ".." in value.replace("\\", "/").split("/"):
        return "climbs out of the data root with '..'"
    if resolve_links:
        real_root = os.path.realpath(root)
        real = os.path.realpath(os.path.join(root, value))
        if os.path.commonpath([real_root, real]) != real_root:
            return f"a symlink to {real}, outside the data root {real_root}"
    return None


def _text_field(obj: dict, key: str, modality: str, path: str, n: int, problems: list) -> str | None:
    text = obj.get(key)
    if text is not None and not isinstance(text, str):
        problems.append(Problem(path, n, f"{key} must be a string or null"))
        return None
    if "text" in modality.split(",") and not (text and text.strip()):
        problems.append(Problem(path, n, f"modality {modality!r} needs a non-empty {key}"))
    return text if text and text.strip() else None


def load_queries(path: str, root: str, problems: list | None = None, check_files: bool = True) -> list:
    problems = [] if problems is None else problems
    out, seen = [], set()
    for n, obj in read_jsonl(path, problems):
        qid = obj.get("qid")
        if not isinstance(qid, str) or not qid:
            problems.append(Problem(path, n, "qid must be a non-empty string"))
            continue
        if qid in seen:
            problems.append(Problem(path, n, f"duplicate qid {qid}"))
            continue
        seen.add(qid)
        modality = canonical_modality(obj.get("query_modality", ""))
        media = _check_media(obj, modality, QUERY_MEDIA_FIELDS, root, path, n, problems, check_files)
        text = _text_field(obj, "query_txt", modality, path, n, problems)
        pos = obj.get("pos_cand_list", [])
        neg = obj.get("neg_cand_list", []) or []
        if not isinstance(pos, list) or not all(isinstance(d, str) for d in pos):
            problems.append(Problem(path, n, "pos_cand_list must be a list of did strings"))
            pos = []
        if not isinstance(neg, list):
            problems.append(Problem(path, n, "neg_cand_list must be a list"))
            neg = []
        task_id = obj.get("task_id")
        out.append(Query(qid, modality, text, media, list(pos), list(neg),
                         int(task_id) if isinstance(task_id, (int, str)) and str(task_id).isdigit() else None))
    return out


def parse_candidate(obj: dict, root: str, path: str, n: int, problems: list, check_files: bool = True):
    """One candidate line -> Candidate (or None, with a Problem, when it has no usable did)."""
    did = obj.get("did")
    if not isinstance(did, str) or not did:
        problems.append(Problem(path, n, "did must be a non-empty string"))
        return None
    modality = canonical_modality(obj.get("modality", ""))
    media = _check_media(obj, modality, CAND_MEDIA_FIELDS, root, path, n, problems, check_files)
    text = _text_field(obj, "txt", modality, path, n, problems)
    return Candidate(did, modality, text, media)


def load_pool(path: str, root: str, problems: list | None = None, check_files: bool = True) -> list:
    problems = [] if problems is None else problems
    out, seen = [], set()
    for n, obj in read_jsonl(path, problems):
        cand = parse_candidate(obj, root, path, n, problems, check_files)
        if cand is None:
            continue
        if cand.did in seen:
            problems.append(Problem(path, n, f"duplicate did {cand.did}"))
            continue
        seen.add(cand.did)
        out.append(cand)
    return out


def load_qrels(path: str, problems: list | None = None) -> dict:
    """qid -> {did: relevance} (relevance > 0 only)."""
    problems = [] if problems is None else problems
    out: dict = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) not in (4, 5):
                problems.append(Problem(path, n, f"expected `qid 0 did rel task_id`, got {len(parts)} fields"))
                continue
            try:
                rel = int(parts[3])
            except ValueError:
                problems.append(Problem(path, n, f"relevance {parts[3]!r} is not an integer"))
                continue
            if rel > 0:
                out.setdefault(parts[0], {})[parts[2]] = rel
    return out


class InstructionTable:
    """Instructions keyed by (dataset id, query modality, candidate modality); a seeded choice per query."""

    def __init__(self, rows: dict, names: dict | None = None):
        self.rows = rows  # (dataset_id, qmod, cmod) -> [prompt, ...]
        self.names = names or {}  # dataset_id -> dataset name

    @classmethod
    def load(cls, path: str, problems: list | None = None) -> "InstructionTable":
        problems = [] if problems is None else problems
        rows, names = {}, {}
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            header = next(reader, None)
            if not header:
                problems.append(Problem(path, 0, "empty instruction table"))
                return cls(rows, names)
            cols = [h.strip().lower() for h in header]
            need = ("query_modality", "cand_modality", "dataset_id")
            if not all(c in cols for c in need):
                problems.append(Problem(path, 1, f"header must name {need}, got {header}"))
                return cls(rows, names)
            idx = {c: cols.index(c) for c in cols}
            prompt_cols = [i for i, c in enumerate(cols) if c.startswith("prompt")]
            for n, rec in enumerate(reader, 2):
                if not any(x.strip() for x in rec):
                    continue
                if len(rec) <= max(idx[c] for c in need):
                    problems.append(Problem(path, n, "too few columns"))
                    continue
                key = (rec[idx["dataset_id"]].strip(), canonical_modality(rec[idx["query_modality"]]),
                       canonical_modality(rec[idx["cand_modality"]]))
                prompts = [rec[i].strip() for i in prompt_cols if i < len(rec) and rec[i].strip()]
                if not prompts:
                    problems.append(Problem(path, n, "a row without any prompt"))
                    continue
                rows[key] = prompts
                if "dataset_name" in idx and idx["dataset_name"] < len(rec):
                    names[key[0]] = rec[idx["dataset_name"]].strip()
        return cls(rows, names)

    def prompts(self, dataset_id: str, query_modality: str, cand_modality: str) -> list:
        return self.rows.get((str(dataset_id), canonical_modality(query_modality), canonical_modality(cand_modality)), [])

    def choose(self, qid: str, query_modality: str, cand_modality: str, seed: int = 0) -> str | None:
        """The instruction for one query: a choice seeded by (seed, qid), so it does not depend on file order."""
        options = self.prompts(dataset_id_of(qid), query_modality, cand_modality)
        if not options:
            return None
        return options[random.Random(f"{seed}:{qid}").randrange(len(options))]


@dataclass
class TaskFiles:
    name: str  # e.g. "cirr_task7"
    queries: str
    pool: str | None  # local pool
    qrels: str | None


def discover(root: str, split: str = "test") -> list:
    """Every task with a query file under `root/query/<split>/`, with its local pool and qrels when present."""
    out = []
    for qpath in sorted(glob.glob(os.path.join(root, "query", split, "mbeir_*.jsonl"))):
        stem = os.path.basename(qpath)[len("mbeir_"):-len(".jsonl")]
        name = stem[: -len(f"_{split}")] if stem.endswith(f"_{split}") else stem
        pool = os.path.join(root, "cand_pool", "local", f"mbeir_{name}_cand_pool.jsonl")
        qrels = os.path.join(root, "qrels", split, f"mbeir_{name}_{split}_qrels.txt")
        out.append(TaskFiles(name, qpath, pool if os.path.exists(pool) else None,
                             qrels if os.path.exists(qrels) else None))
    return out


def global_pool_path(root: str, split: str = "test") -> str:
    return os.path.join(root, "cand_pool", "global", f"mbeir_union_{split}_cand_pool.jsonl")


def instructions_path(root: str) -> str:
    return os.path.join(root, "instructions", "query_instructions.tsv")


@dataclass
class LoadedTask:
    name: str
    queries: list
    pool_name: str
    relevant: dict  # qid -> set of relevant dids
    cand_modality: str


def relevant_dids(queries: list, qrels: dict | None) -> dict:
    if qrels is not None:
        return {q.qid: set(qrels.get(q.qid, {})) for q in queries}
    return {q.qid: set(q.positives) for q in queries}


def validate(root: str, split: str = "test", tasks: list | None = None, use_global: bool = False,
             check_files: bool = True) -> tuple:
    """Read everything once, checking it: (problems, loaded) where loaded = (tasks, pools, instructions).
    A problem names the file and line; nothing is skipped silently."""
    problems: list = []
    files = discover(root, split)
    if tasks:
        wanted = set(tasks)
        unknown = wanted - {f.name for f in files}
        for name in sorted(unknown):
            problems.append(Problem(os.path.join(root, "query", split), 0, f"no query file for task {name!r}"))
        files = [f for f in files if f.name in wanted]
    if not files:
        problems.append(Problem(os.path.join(root, "query", split), 0, "no M-BEIR query files (mbeir_*.jsonl) found"))
        return problems, ([], {}, None)
    ipath = instructions_path(root)
    table = InstructionTable.load(ipath, problems) if os.path.exists(ipath) else None
    if table is None:
        problems.append(Problem(ipath, 0, "instruction table not found (queries would have no task instruction)"))
    pools: dict = {}
    gpath = global_pool_path(root, split)
    if use_global:
        if not os.path.exists(gpath):
            problems.append(Problem(gpath, 0, "global pool not found"))
        else:
            pools["union"] = load_pool(gpath, root, problems, check_files)
    loaded = []
    for tf in files:
        queries = load_queries(tf.queries, root, problems, check_files)
        if not queries:
            problems.append(Problem(tf.queries, 0, "no queries"))
        if tf.pool is None:
            problems.append(Problem(tf.queries, 0, f"no local pool cand_pool/local/mbeir_{tf.name}_cand_pool.jsonl"))
            if not use_global:
                continue
        else:
            pools[tf.name] = load_pool(tf.pool, root, problems, check_files)
        qrels = load_qrels(tf.qrels, problems) if tf.qrels else None
        rel = relevant_dids(queries, qrels)
        pool_name = "union" if use_global else tf.name
        pool_dids = {c.did: c for c in pools.get(pool_name, [])}
        cand_mods = set()
        for q in queries:
            if not rel[q.qid]:
                problems.append(Problem(tf.qrels or tf.queries, 0, f"query {q.qid} has no relevant candidate"))
            for did in sorted(rel[q.qid]):
                if pool_dids and did not in pool_dids:
                    problems.append(Problem(tf.qrels or tf.queries, 0,
                                            f"query {q.qid}: relevant candidate {did} is not in the {pool_name} pool"))
                elif did in pool_dids:
                    cand_mods.add(pool_dids[did].modality)
        cand_modality = sorted(cand_mods)[0] if len(cand_mods) == 1 else ",".join(sorted(cand_mods))
        if table is not None:
            missing = sorted({(dataset_id_of(q.qid), q.modality) for q in queries
                              if not table.prompts(dataset_id_of(q.qid), q.modality, cand_modality)})
            for ds, qmod in missing:
                problems.append(Problem(ipath, 0, f"no instruction for dataset {ds}, {qmod} -> {cand_modality} "
                                                  f"(task {tf.name})"))
        loaded.append(LoadedTask(tf.name, queries, pool_name, rel, cand_modality))
    return problems, (loaded, pools, table)


def format_report(problems: list, limit: int = 40) -> str:
    if not problems:
        return "no problems found"
    lines = [f"{len(problems)} problem(s):"] + [f"  {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  ... and {len(problems) - limit} more")
    return "\n".join(lines)


def query_item(q: Query, instruction: str | None) -> dict:
    item = dict(q.media)
    if q.text:
        item["text"] = q.text
    if instruction:
        item["instruction"] = instruction
    return item


def candidate_item(c: Candidate) -> dict:
    item = dict(c.media)
    if c.text:
        item["text"] = c.text
    return item

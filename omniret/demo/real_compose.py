"""How much a composed query's text steers each model: the composed tasks' test queries encoded with and without
their text, for OmniRet and the dual encoder of one `omniret demo` run.

    python -m omniret.demo.real_compose --run out/demo [--untrained] [--attributes] [--json out/compose.json]

Per composed task and model it prints the mean cosine between a query's embedding with its text and without it
(1.0: the text changes nothing), that movement as a share of the distance between two queries (`text_share`), and
R@1 / R@5 with and without the text. `--untrained` adds both models as their training starts, so a change that
training made shows. docs/real_benchmark.md ("Muon for the resamplers") reads it: on the emoji image+text task both
models score the same without the text, and the text adds far more to the dual encoder's recall than to OmniRet's.

Then where the hits are won or lost (`family_breakdown`): the share of queries with some candidate of the target's
emoji family (the emoji without skin tone and gender; omniret.data.sources.emoji.concept_of) in the top 5, and the
share whose target ranks first among its family's candidates, and its mean rank there (the change text's work).
For the image+text task, split by the kind of change (`change_breakdown`): how often the family's top 5 has the
target's skin tone and gender, against a random order. And how often the query's own image ranks first, with R@k
when it is left out of that query's candidates (`reference_effect`; CIRR's protocol leaves it out, this benchmark
keeps it in). And whether the held-out wording of the change is what the models miss (`wording_effect`): the
test queries again with each training wording of their change in place of the test one.

`--attributes` instead asks which attributes survive each model's path to its embedding: a linear probe of the skin
tone and the gender on the embeddings of every emoji image, families held out (`attributes_report`).
"""
from __future__ import annotations

import argparse
import re

import torch

from omniret.data.sources import emoji
from omniret.eval.evaluate import encode_pool
from omniret.eval.recall import normalize, recall_at_k
from omniret.files import atomic_write_json

__all__ = ["without_text", "encode_with_and_without_text", "query_spread", "text_effect", "single_targets",
           "emoji_family", "family_breakdown", "emoji_attributes", "attribute_match", "change_breakdown",
           "reference_effect", "change_value", "reworded", "wording_effect", "untrained_models", "attributes_report",
           "main"]


def without_text(query: dict) -> dict:
    """The query with its text left out (its media and instruction kept); a query without media is refused."""
    rest = {k: v for k, v in query.items() if k != "text"}
    if not any(k in rest for k in ("image", "audio", "video")):
        raise ValueError(f"a composed query needs media besides its text, got keys {sorted(query)}")
    return rest


@torch.no_grad()
def encode_with_and_without_text(encode_queries, queries: list) -> tuple:
    """(the queries' normalised embeddings, the same without their text)."""
    return (normalize(torch.as_tensor(encode_queries(queries))),
            normalize(torch.as_tensor(encode_queries([without_text(q) for q in queries]))))


def query_spread(embeddings: torch.Tensor) -> float:
    """Mean cosine between two different rows of normalised (Q, E) embeddings (the diagonal left out); at least
    two rows."""
    n = embeddings.shape[0]
    if n < 2:
        raise ValueError(f"query_spread needs at least 2 embeddings, got {n}")
    total = embeddings.sum(dim=0)
    # sum over all pairs i != j of <e_i, e_j> = |sum e|^2 - sum |e_i|^2, without the (Q, Q) matrix
    off = float(total @ total) - float((embeddings * embeddings).sum())
    return off / (n * (n - 1))


@torch.no_grad()
def text_effect(encode_queries, queries: list, candidates: torch.Tensor, relevant, ks=(1, 5),
                families: list | None = None, encoded: tuple | None = None) -> dict:
    """{"cosine": mean cos(query, query without its text), "spread": `query_spread` of the queries with their
    text, "text_share": (1 - cosine) / (1 - spread), "with": {"R@k": ...}, "without": {...}} for queries scored
    against candidate embeddings (C, E) with `relevant` as omniret.eval.recall takes it. With `families`
    (a label per candidate; each query then has one relevant candidate), also "families": {"with": ..., "without":
    ...} from `family_breakdown`. `encoded`: `encode_with_and_without_text`'s pair when the caller has it already
    (`encode_queries` is then not called)."""
    full, bare = encoded if encoded is not None else encode_with_and_without_text(encode_queries, queries)
    out = {"cosine": float((full * bare).sum(dim=1).mean())}
    out["spread"] = query_spread(full)
    # how far the text moves a query, against how far apart two queries sit: comparable across models whose
    # embeddings fill the sphere differently (a model whose queries all sit close moves them less in absolute terms)
    out["text_share"] = (1.0 - out["cosine"]) / max(1.0 - out["spread"], 1e-12)
    for name, q in (("with", full), ("without", bare)):
        out[name] = {f"R@{k}": v for k, v in recall_at_k(q, candidates, relevant, ks).items()}
    if families is not None:
        targets = single_targets(relevant)
        out["families"] = {name: family_breakdown(q, candidates, targets, families)
                           for name, q in (("with", full), ("without", bare))}
    return out


def single_targets(relevant) -> list:
    """The one relevant candidate of each query, from index lists or a (Q, C) bool matrix; a query with more or
    fewer is refused (the family measures need one target)."""
    targets = []
    for i, rel in enumerate(relevant):
        rel = rel.nonzero().flatten().tolist() if isinstance(rel, torch.Tensor) else list(rel)
        if len(rel) != 1:
            raise ValueError(f"families: query {i} has {len(rel)} relevant candidates; the breakdown needs one")
        targets.append(rel[0])
    return targets


def emoji_family(item: dict) -> str:
    """The emoji family of a gallery item: its image file is named by its code points (e.g. 1F3C3-1F3FF.png)."""
    return emoji.concept_of(emoji.unified_of(item["image"]))


@torch.no_grad()
def family_breakdown(query_emb: torch.Tensor, cand_emb: torch.Tensor, targets, families: list, k: int = 5) -> dict:
    """Queries (Q, E) against candidates (C, E), each query with one target index in `targets`, candidates in
    `families` (C labels). -> {"family@k": share of queries with some candidate of the target's family in the top
    k, "target_first_in_family": share whose target outscores the rest of its family, "target_rank_in_family": its
    mean rank among them (1 is first; a random order gives (family_size + 1) / 2), "family_size": mean candidates
    per target family}."""
    scores, target, same = _in_family(query_emb, cand_emb, targets, families)
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    found = same.gather(1, top).any(dim=1)
    above = ((scores > scores.gather(1, target[:, None])) & same).sum(dim=1)  # family members above the target
    return {f"family@{k}": float(found.double().mean()),
            "target_first_in_family": float((above == 0).double().mean()),
            "target_rank_in_family": float((1 + above).double().mean()),
            "family_size": float(same.sum(1).double().mean())}


def emoji_attributes(item: dict) -> dict:
    """{"tone": ..., "gender": ...} of an emoji image item (omniret.data.sources.emoji.attributes_of)."""
    return emoji.attributes_of(emoji.unified_of(item["image"]))


@torch.no_grad()
def attribute_match(query_emb: torch.Tensor, cand_emb: torch.Tensor, targets, families: list, values: list,
                    k: int = 5) -> dict:
    """Does the query pick the family members with the target's attribute (e.g. its skin tone)? -> {"match": the
    mean share of the k best-scored candidates of the target's family whose value (`values`, one per candidate)
    equals the target's, "chance": the mean share of the whole family with that value (a random order's)}."""
    scores, target, same = _in_family(query_emb, cand_emb, targets, families)
    val = _codes(values)
    agree = (val[None, :] == val[target][:, None]) & same
    order = scores.masked_fill(~same, float("-inf")).argsort(dim=1, descending=True)[:, :k]
    top = same.gather(1, order)  # the family's k best (fewer when the family is smaller)
    match = (agree.gather(1, order) & top).sum(1).double() / top.sum(1)
    chance = agree.sum(1).double() / same.sum(1)
    return {"match": float(match.mean()), "chance": float(chance.mean())}


def _in_family(query_emb: torch.Tensor, cand_emb: torch.Tensor, targets, families: list) -> tuple:
    """(cosine scores (Q, C) in float64, the targets as a tensor, the (Q, C) mask of each target's family)."""
    if len(targets) != query_emb.shape[0] or len(families) != cand_emb.shape[0]:
        raise ValueError(f"family measures: {query_emb.shape[0]} queries with {len(targets)} targets, "
                         f"{cand_emb.shape[0]} candidates with {len(families)} families")
    scores = normalize(query_emb.double()) @ normalize(cand_emb.double()).T
    fam = _codes(families)
    target = torch.as_tensor(list(targets), dtype=torch.long)
    return scores, target, fam[None, :] == fam[target][:, None]


def _codes(labels: list) -> torch.Tensor:
    """Labels -> integer codes (equal labels, equal codes)."""
    index = {x: i for i, x in enumerate(dict.fromkeys(labels))}
    return torch.tensor([index[x] for x in labels])


def change_breakdown(query_emb: torch.Tensor, queries: list, candidates: torch.Tensor, relevant, items: list,
                     families: list) -> dict:
    """The image+text queries (their embeddings `query_emb`) split by what their change does (a tone change when
    the target's skin tone differs from the query image's, else a gender change): per kind, the queries, R@5, the
    family measures and how often the family's top 5 has the target's tone and gender (`attribute_match`) against
    chance. `items`: the gallery, `families` their `emoji_family`."""
    targets = single_targets(relevant)
    attrs = [emoji_attributes(item) for item in items]
    out = {}
    for kind in ("tone", "gender"):
        picked = [i for i, q in enumerate(queries)
                  if (emoji_attributes(q)["tone"] != attrs[targets[i]]["tone"]) == (kind == "tone")]
        if not picked:
            continue
        q, t = query_emb[picked], [targets[i] for i in picked]
        row = {"queries": len(picked), "R@5": recall_at_k(q, candidates, [[x] for x in t], (5,))[5]}
        row.update(family_breakdown(q, candidates, t, families))
        for attr in ("tone", "gender"):
            row[attr] = attribute_match(q, candidates, t, families, [a[attr] for a in attrs])
        out[kind] = row
    return out


@torch.no_grad()
def reference_effect(query_emb: torch.Tensor, cand_emb: torch.Tensor, targets, references, ks=(1, 5, 10)) -> dict:
    """Composed image queries (Q, E) whose own image is candidate `references[i]` of (C, E) and whose one target
    is `targets[i]`. -> {"reference_first": the share of queries that rank their own image first, "with": {"R@k":
    ...} as scored, "without": {"R@k": ...} with each query's own image left out of its candidates}. The reference
    is never the target here: the change always changes the image."""
    if len(targets) != query_emb.shape[0] or len(references) != query_emb.shape[0]:
        raise ValueError(f"reference_effect: {query_emb.shape[0]} queries with {len(targets)} targets and "
                         f"{len(references)} references")
    target = torch.as_tensor(list(targets), dtype=torch.long)
    ref = torch.as_tensor(list(references), dtype=torch.long)
    if bool((target == ref).any()):
        raise ValueError("reference_effect: a query's target is its own image")
    scores = normalize(query_emb.double()) @ normalize(cand_emb.double()).T
    rows = torch.arange(scores.shape[0])
    out = {"reference_first": float((scores.argmax(dim=1) == ref).double().mean())}
    left_out = scores.clone()
    left_out[rows, ref] = float("-inf")
    for name, s in (("with", scores), ("without", left_out)):
        above = (s > s[rows, target][:, None]).sum(dim=1)  # candidates scored above the target
        out[name] = {f"R@{k}": float((above < k).double().mean()) for k in ks}
    return out


def _template_pattern(template: str) -> re.Pattern:
    """A change wording like "turn it into a {v}" -> a regex whose one group is the value."""
    head, tail = template.split("{v}")
    return re.compile(re.escape(head) + "(.+)" + re.escape(tail) + "$")


def change_value(text: str, wordings: dict) -> tuple:
    """(kind, value) of a change text written with one of `wordings` ({kind: (template, ...)}, templates with
    one "{v}"; real_benchmark.CHANGE_WORDINGS[split]). A text no template writes is refused, and so is one that
    two templates read differently ("{v} skin tone" also reads "with dark skin tone")."""
    found = {(kind, m.group(1)) for kind, templates in wordings.items() for template in templates
             if (m := _template_pattern(template).match(text))}
    if len(found) != 1:
        raise ValueError(f"change text {text!r} matches {'none' if not found else sorted(found)} of the wordings "
                         f"{wordings}")
    return found.pop()


def reworded(queries: list, source: dict, target: dict, choice: int) -> list:
    """The queries with their change text (written with a `source` wording) written again with `target`'s
    wording number `choice` of the same kind (modulo how many that kind has)."""
    out = []
    for q in queries:
        kind, value = change_value(q["text"], source)
        templates = target[kind]
        out.append(dict(q, text=templates[choice % len(templates)].format(v=value)))
    return out


@torch.no_grad()
def wording_effect(encode_queries, queries: list, candidates: torch.Tensor, relevant, source: dict, target: dict,
                   ks=(1, 5, 10), encoded: torch.Tensor | None = None) -> dict:
    """R@k of the queries as written (`source` wordings: the test split's) and again with each of `target`'s
    wordings (the training split's) -> {"as_written": {"R@k": ...}, "reworded": [{"R@k": ...}, one per wording
    number up to the most a kind has]}. If a model only missed the held-out wording, the reworded recall would be
    well above the written one. `encoded`: the queries' embeddings as written, when the caller has them."""
    def recall(emb):
        return {f"R@{k}": v for k, v in recall_at_k(normalize(torch.as_tensor(emb)), candidates, relevant, ks).items()}

    choices = max(len(t) for t in target.values())
    return {"as_written": recall(encode_queries(queries) if encoded is None else encoded),
            "reworded": [recall(encode_queries(reworded(queries, source, target, c))) for c in range(choices)]}


def untrained_models(run: str, root: str) -> dict:
    """{"omniret_untrained": ..., "dual_encoder_untrained": ...}: the two models of `omniret demo --output run` as
    they are before its first step (built from the options in the run's results.json, their media standardizers
    fitted on the training set as the Trainer fits them), in eval mode."""
    from omniret.demo import real_demo

    opts = real_demo.run_options(run, "real_compose --untrained")
    data = real_demo.train_set(root, opts)
    models = {"omniret_untrained": real_demo.build_model(opts),
              "dual_encoder_untrained": real_demo.build_baseline(opts)}
    for model in models.values():
        model.before_training(data)
        model.eval()
    return models


def attributes_report(models: dict, root: str, json_path: str | None = None, seeds=(0, 1, 2)) -> dict:
    """{"frozen": ..., model name: ...}: `omniret.data.real_probe.attribute_probes` of the skin tone and the gender
    on the mean-pooled frozen feature of every emoji image of the benchmark at `root` and on each model's candidate
    embedding of it (families held out, one split per seed): which attributes survive each model's path to its
    embedding."""
    from omniret.data.real_probe import attribute_probes, emoji_attribute_probes, emoji_image_paths

    paths = emoji_image_paths(root)
    report = {"frozen": emoji_attribute_probes(root, seeds=seeds)}
    for name, model in models.items():
        emb = torch.as_tensor(model.encode_corpus([{"image": p} for p in paths])).double().numpy()
        report[name] = attribute_probes(emb, paths, seeds)
    for name, row in report.items():
        print(f"{name:22s} " + "  ".join(f"{attr} {100 * r['accuracy']:.1f}% (majority {100 * r['majority']:.1f})"
                                         for attr, r in row.items()))
    if json_path:
        atomic_write_json(json_path, report)
    return report


def main(argv=None) -> dict:
    from omniret.data.real_benchmark import CHANGE_WORDINGS, COMPOSED_TASKS
    from omniret.demo import real_demo
    from omniret.threads import apply_threads

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="an `omniret demo` output folder (model/ and baseline_model/)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers here")
    p.add_argument("--untrained", action="store_true",
                   help="also both models as their training starts (the run's seed and model options, media "
                        "statistics fitted): how much of the text's effect training keeps")
    p.add_argument("--attributes", action="store_true",
                   help="instead: can a linear probe read the skin tone and gender from each model's embedding of "
                        "every emoji image (families held out, three splits), beside the frozen feature?")
    args = p.parse_args(argv)
    apply_threads(args.threads)
    opts = real_demo.run_options(args.run, "real_compose")
    models = real_demo.load_run_models(args.run, "real_compose", opts.feature_cache)
    root = real_demo.ensure_benchmark(opts)
    real_demo.ensure_features(root, opts)
    if args.untrained:
        models.update(untrained_models(args.run, root))
    if args.attributes:
        return attributes_report(models, root, args.json)
    tasks, pools = real_demo.eval_tasks(root, opts)
    families = {task.pool: [emoji_family(item) for item in pools[task.pool].items]
                for task in tasks if task.name in COMPOSED_TASKS}
    report: dict = {}
    for name, model in models.items():
        pool_cache: dict = {}
        for task in (t for t in tasks if t.name in COMPOSED_TASKS):
            if task.pool not in pool_cache:  # the two composed tasks search one gallery: encoded once per model
                pool_cache[task.pool] = encode_pool(pools[task.pool], model.encode_corpus, None, name)
            encoded = encode_with_and_without_text(model.encode_queries, task.queries)
            row = text_effect(model.encode_queries, task.queries, pool_cache[task.pool], task.relevant,
                              families=families[task.pool], encoded=encoded)
            report.setdefault(task.name, {})[name] = row
            print(f"{task.name:24s} {name:22s} cos(with, without text) {row['cosine']:.3f}, between queries "
                  f"{row['spread']:.3f}, the text's share {row['text_share']:.3f}  "
                  + "  ".join(f"{k} {100 * row['with'][k]:.1f} (without text {100 * row['without'][k]:.1f})"
                              for k in row["with"]))
            fam = row["families"]
            print(f"{'':24s} {'':22s} family in top 5 {100 * fam['with']['family@5']:.1f} "
                  f"(without text {100 * fam['without']['family@5']:.1f}), target first in its family "
                  f"{100 * fam['with']['target_first_in_family']:.1f} (without text "
                  f"{100 * fam['without']['target_first_in_family']:.1f}), its mean rank there "
                  f"{fam['with']['target_rank_in_family']:.2f} (without text "
                  f"{fam['without']['target_rank_in_family']:.2f}) of {fam['with']['family_size']:.1f} candidates")
            row["wording"] = wt = wording_effect(model.encode_queries, task.queries, pool_cache[task.pool],
                                                 task.relevant, CHANGE_WORDINGS["test"], CHANGE_WORDINGS["train"],
                                                 encoded=encoded[0])
            print(f"{'':24s} {'':22s} R@5 with the test wordings {100 * wt['as_written']['R@5']:.1f}; with each "
                  "training wording instead: " + ", ".join(f"{100 * r['R@5']:.1f}" for r in wt["reworded"]))
            if all("image" in q for q in task.queries):
                row["by_change"] = change_breakdown(encoded[0], task.queries, pool_cache[task.pool], task.relevant,
                                                    pools[task.pool].items, families[task.pool])
                gallery = {item.get("image"): i for i, item in enumerate(pools[task.pool].items)}
                missing = sum(q["image"] not in gallery for q in task.queries)
                if missing:  # reference_effect needs each query's own image among the candidates
                    print(f"{'':24s} {'':22s} {missing} queries' own images are not in the gallery: no reference "
                          "effect")
                else:
                    row["reference"] = ref = reference_effect(encoded[0], pool_cache[task.pool],
                                                              single_targets(task.relevant),
                                                              [gallery[q["image"]] for q in task.queries])
                    print(f"{'':24s} {'':22s} its own image ranked first {100 * ref['reference_first']:.1f}%; left "
                          "out of its candidates: " + "  ".join(f"{k} {100 * ref['without'][k]:.1f} (kept: "
                                                                f"{100 * ref['with'][k]:.1f})" for k in ref["with"]))
                for kind, part in row["by_change"].items():
                    print(f"{'':24s} {kind} changes ({part['queries']}): R@5 {100 * part['R@5']:.1f}, rank in "
                          f"family {part['target_rank_in_family']:.2f} of {part['family_size']:.1f}; the family's top "
                          f"5 has the target's tone {100 * part['tone']['match']:.1f}% (chance "
                          f"{100 * part['tone']['chance']:.1f}), its gender {100 * part['gender']['match']:.1f}% "
                          f"(chance {100 * part['gender']['chance']:.1f})")
    if args.json:
        atomic_write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()

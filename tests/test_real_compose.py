"""omniret.demo.real_compose: a query's text effect, against a direct computation on a toy encoder."""
import pytest
import torch

from omniret.demo.real_compose import query_spread, text_effect, without_text


def test_without_text_keeps_media_and_instruction_and_refuses_text_only():
    q = {"image": "a.png", "text": "as a woman", "instruction": "Find it."}
    assert without_text(q) == {"image": "a.png", "instruction": "Find it."}
    with pytest.raises(ValueError, match="needs media"):
        without_text({"text": "only words"})


def test_text_effect_against_a_direct_computation():
    """A toy encoder: image vector + w * text vector. w = 0 gives cosine 1 and equal recall with and without the
    text; w > 0 moves the query, and the recalls are what a direct top-k gives."""
    g = torch.Generator().manual_seed(0)
    images = {f"i{k}": torch.randn(9, generator=g, dtype=torch.float64) for k in range(7)}
    texts = {f"t{k}": torch.randn(9, generator=g, dtype=torch.float64) for k in range(3)}
    queries = [{"image": f"i{k % 7}", "text": f"t{k % 3}"} for k in range(11)]
    cands = torch.randn(13, 9, generator=g, dtype=torch.float64)
    relevant = [[k % 13, (5 * k) % 13] for k in range(11)]

    def encoder(w):
        return lambda qs: torch.stack([images[q["image"]] + (w * texts[q["text"]] if "text" in q else 0) for q in qs])

    same = text_effect(encoder(0.0), queries, cands, relevant)
    assert abs(same["cosine"] - 1.0) < 1e-6 and same["with"] == same["without"]
    moved = text_effect(encoder(2.0), queries, cands, relevant, ks=(1, 5))
    full = torch.nn.functional.normalize(encoder(2.0)(queries), dim=1)
    bare = torch.nn.functional.normalize(encoder(0.0)(queries), dim=1)
    want_cos = float((full * bare).sum(1).mean())
    assert abs(moved["cosine"] - want_cos) < 1e-5 and moved["cosine"] < 0.99
    for name, q in (("with", full), ("without", bare)):
        for k in (1, 5):
            top = (q @ torch.nn.functional.normalize(cands, dim=1).T).topk(k, dim=1).indices
            hit = sum(bool(set(top[i].tolist()) & set(relevant[i])) for i in range(len(queries))) / len(queries)
            assert abs(moved[name][f"R@{k}"] - hit) < 1e-6, (name, k)


def test_family_breakdown_against_a_direct_count():
    """Fresh random embeddings and families of uneven sizes: the share of queries with some family member in the
    top k, of targets outscoring the rest of their family, and the target's mean rank in its family equal a
    per-query count; a bool relevance matrix
    gives what index lists give; a query with two targets is refused."""
    from omniret.demo.real_compose import family_breakdown

    g = torch.Generator().manual_seed(3)
    C, Q = 23, 17
    families = [f"f{int(x)}" for x in torch.randint(0, 6, (C,), generator=g)]
    cands = torch.randn(C, 5, generator=g, dtype=torch.float64)
    queries = torch.randn(Q, 5, generator=g, dtype=torch.float64)
    targets = torch.randint(0, C, (Q,), generator=g).tolist()
    got = family_breakdown(queries, cands, targets, families, k=3)
    s = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(cands, dim=1).T
    found = first = size = rank = 0
    for i, t in enumerate(targets):
        members = [j for j in range(C) if families[j] == families[t]]
        top = s[i].argsort(descending=True)[:3].tolist()
        found += any(j in members for j in top)
        first += all(s[i, j] <= s[i, t] for j in members)
        rank += sorted(members, key=lambda j: -float(s[i, j])).index(t) + 1
        size += len(members)
    assert abs(got["family@3"] - found / Q) < 1e-12
    assert abs(got["target_first_in_family"] - first / Q) < 1e-12
    assert abs(got["target_rank_in_family"] - rank / Q) < 1e-12
    assert abs(got["family_size"] - size / Q) < 1e-12
    assert 0 < got["family@3"] and got["target_first_in_family"] < 1  # the toy case is not degenerate

    relevant = [[t] for t in targets]
    matrix = torch.zeros(Q, C, dtype=torch.bool)
    matrix[torch.arange(Q), torch.tensor(targets)] = True
    encode = lambda qs: torch.stack([queries[q["image"]] for q in qs])  # noqa: E731 (the text changes nothing)
    items = [{"image": i, "text": "t"} for i in range(Q)]
    by_list = text_effect(encode, items, cands, relevant, families=families)["families"]
    by_matrix = text_effect(encode, items, cands, matrix, families=families)["families"]
    assert by_list == by_matrix and by_list["with"] == by_list["without"]
    from omniret.demo.real_compose import encode_with_and_without_text

    reused = text_effect(None, items, cands, relevant, families=families,
                         encoded=encode_with_and_without_text(encode, items))
    assert reused["families"] == by_list
    assert abs(by_list["with"]["target_first_in_family"] - got["target_first_in_family"]) < 1e-12
    with pytest.raises(ValueError, match="query 0 has 2 relevant"):
        text_effect(encode, items, cands, [[0, 1]] + relevant[1:], families=families)


def test_emoji_family_drops_tone_and_gender():
    from omniret.demo.real_compose import emoji_family

    assert emoji_family({"image": "media/emoji/1F3C3-1F3FF-200D-2640-FE0F.png"}) == "1F3C3"
    assert emoji_family({"image": "media/emoji/1F3C3.png"}) == emoji_family({"image": "x/1F3C3-1F3FB.png"})
    assert emoji_family({"image": "1F44D.png"}) != emoji_family({"image": "1F3C3.png"})


def test_emoji_attributes_from_the_code_points():
    from omniret.demo.real_compose import emoji_attributes

    assert emoji_attributes({"image": "e/1F3C3-1F3FF-200D-2640-FE0F.png"}) == {"tone": "dark", "gender": "woman"}
    assert emoji_attributes({"image": "e/1F3C3-200D-2642-FE0F.png"}) == {"tone": "none", "gender": "man"}
    assert emoji_attributes({"image": "1F44D-1F3FB.png"}) == {"tone": "light", "gender": "neutral"}


def test_attribute_match_against_a_direct_count_and_its_extremes():
    """The share of the family's top-k members with the target's value equals a per-query count on random
    embeddings; a query equal to a candidate whose family members share its value scores 1; chance is the family's
    share."""
    from omniret.demo.real_compose import attribute_match

    g = torch.Generator().manual_seed(5)
    C, Q = 19, 9
    families = ["a"] * 8 + ["b"] * 6 + ["c"] * 5
    values = [str(int(x)) for x in torch.randint(0, 3, (C,), generator=g)]
    cands = torch.randn(C, 4, generator=g, dtype=torch.float64)
    queries = torch.randn(Q, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, C, (Q,), generator=g).tolist()
    got = attribute_match(queries, cands, targets, families, values, k=3)
    s = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(cands, dim=1).T
    match = chance = 0.0
    for i, t in enumerate(targets):
        members = [j for j in range(C) if families[j] == families[t]]
        top = [j for j in s[i].argsort(descending=True).tolist() if j in members][:3]
        match += sum(values[j] == values[t] for j in top) / 3
        chance += sum(values[j] == values[t] for j in members) / len(members)
    assert abs(got["match"] - match / Q) < 1e-12 and abs(got["chance"] - chance / Q) < 1e-12
    same = attribute_match(cands[:1], cands, [0], families, ["x"] * C, k=3)
    assert same == {"match": 1.0, "chance": 1.0}


def test_change_breakdown_splits_tone_from_gender_changes():
    """Queries are a base emoji's image; a target with another skin tone makes a tone change, one with the base's
    tone a gender change. Each kind's R@5 equals a direct top-5 count over its own queries."""
    from omniret.demo.real_compose import change_breakdown, emoji_family

    names = ["1F3C3", "1F3C3-1F3FB", "1F3C3-1F3FF", "1F3C3-200D-2640-FE0F", "1F3C3-1F3FB-200D-2640-FE0F",
             "1F44D", "1F44D-1F3FD", "1F9D1", "1F9D1-200D-2642-FE0F"]
    items = [{"image": f"media/emoji/{n}.png"} for n in names]
    pairs = [(0, 1), (0, 2), (0, 3), (5, 6), (7, 8), (1, 4)]  # (query image, target)
    queries = [{"image": items[b]["image"], "text": f"change {k}"} for k, (b, _) in enumerate(pairs)]
    g = torch.Generator().manual_seed(7)
    cands = torch.randn(len(items), 6, generator=g, dtype=torch.float64)
    qemb = torch.randn(len(queries), 6, generator=g, dtype=torch.float64)
    by_text = {q["text"]: qemb[k] for k, q in enumerate(queries)}
    encode = lambda qs: torch.stack([by_text[q["text"]] for q in qs])  # noqa: E731
    out = change_breakdown(encode(queries), queries, cands, [[t] for _, t in pairs], items,
                           [emoji_family(item) for item in items])
    assert out["tone"]["queries"] == 3 and out["gender"]["queries"] == 3  # (0,1) (0,2) (5,6); (0,3) (7,8) (1,4)
    s = torch.nn.functional.normalize(qemb, dim=1) @ torch.nn.functional.normalize(cands, dim=1).T
    for kind, picked in (("tone", [0, 1, 3]), ("gender", [2, 4, 5])):
        hits = sum(pairs[i][1] in s[i].topk(5).indices.tolist() for i in picked)
        assert abs(out[kind]["R@5"] - hits / 3) < 1e-6, kind
        assert 0.0 <= out[kind]["tone"]["match"] <= 1.0 and 0.0 < out[kind]["tone"]["chance"] <= 1.0


def test_reference_effect_against_a_direct_count():
    """Fresh random embeddings, some queries built to sit next to their own image: the share that rank it first
    and R@k with it kept and left out equal a per-query sort of the candidates; a target that is its own image, or
    lists of the wrong length, are refused."""
    from omniret.demo.real_compose import reference_effect

    g = torch.Generator().manual_seed(5)
    C, Q = 19, 14
    cands = torch.randn(C, 6, generator=g, dtype=torch.float64)
    refs = torch.randint(0, C, (Q,), generator=g).tolist()
    targets = [(r + 1 + int(x)) % C for r, x in zip(refs, torch.randint(0, C - 1, (Q,), generator=g))]
    queries = torch.randn(Q, 6, generator=g, dtype=torch.float64)
    queries[::2] = cands[refs[::2]] + 0.05 * queries[::2]  # every other query: near its own image
    got = reference_effect(queries, cands, targets, refs, ks=(1, 3))
    s = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(cands, dim=1).T
    first = sum(int(s[i].argmax()) == refs[i] for i in range(Q)) / Q
    assert abs(got["reference_first"] - first) < 1e-12 and got["reference_first"] >= 0.5
    for k in (1, 3):
        kept = left = 0
        for i in range(Q):
            order = s[i].argsort(descending=True).tolist()
            kept += targets[i] in order[:k]
            left += targets[i] in [j for j in order if j != refs[i]][:k]
        assert abs(got["with"][f"R@{k}"] - kept / Q) < 1e-12
        assert abs(got["without"][f"R@{k}"] - left / Q) < 1e-12
    assert got["without"]["R@1"] > got["with"]["R@1"]  # the queries near their own image lose it as a rival
    with pytest.raises(ValueError, match="its own image"):
        reference_effect(queries, cands, refs, refs)
    with pytest.raises(ValueError, match="references"):
        reference_effect(queries, cands, targets, refs[:-1])


def test_change_value_and_reworded_round_trip_every_wording():
    """Every test wording of the benchmark parses back to its kind and value, and rewording writes the training
    template of that kind with the same value; a text no template writes is refused."""
    from omniret.data.real_benchmark import CHANGE_WORDINGS
    from omniret.demo.real_compose import change_value, reworded

    test, train = CHANGE_WORDINGS["test"], CHANGE_WORDINGS["train"]
    values = {"tone": ["dark", "medium-light"], "gender": ["woman", "man"]}
    for kind, templates in test.items():
        for template in templates:
            for v in values[kind]:
                assert change_value(template.format(v=v), test) == (kind, v)
                q = {"image": "a.png", "text": template.format(v=v), "instruction": "Find it."}
                for c in range(5):
                    (r,) = reworded([q], test, train, c)
                    assert r["text"] == train[kind][c % len(train[kind])].format(v=v)
                    assert r["image"] == "a.png" and r["instruction"] == "Find it."
    with pytest.raises(ValueError, match="matches none"):
        change_value("make it purple", test)
    with pytest.raises(ValueError, match="matches \\[\\("):  # two templates, two readings
        change_value("with dark skin tone", {"tone": ("with {v} skin tone", "{v} skin tone")})


def test_wording_effect_against_a_direct_computation():
    """A toy encoder that reads only the change's wording (its template) and value: recall as written and per
    training wording equals a direct top-k of what that encoder gives for the reworded texts."""
    from omniret.demo.real_compose import reworded, wording_effect

    source = {"tone": ("change the skin tone to {v}",), "gender": ("turn it into a {v}",)}
    target = {"tone": ("with {v} skin tone", "{v} skin tone", "make the skin {v}"), "gender": ("as a {v}",)}
    g = torch.Generator().manual_seed(3)
    vec = {}

    def encode(qs):
        return torch.stack([vec.setdefault(q["text"], torch.randn(5, generator=g, dtype=torch.float64)) for q in qs])

    queries = [{"image": f"{i}.png", "text": (source["tone"] if i % 2 else source["gender"])[0].format(v=v)}
               for i, v in enumerate(["dark", "light", "woman", "medium", "man", "medium-dark", "person"])]
    cands = torch.randn(9, 5, generator=g, dtype=torch.float64)
    relevant = [[i % 9] for i in range(len(queries))]
    got = wording_effect(encode, queries, cands, relevant, source, target, ks=(1, 3))
    assert len(got["reworded"]) == 3
    cn = torch.nn.functional.normalize(cands, dim=1)
    for qs, rec in [(queries, got["as_written"])] + [(reworded(queries, source, target, c), got["reworded"][c])
                                                      for c in range(3)]:
        top = torch.nn.functional.normalize(encode(qs), dim=1) @ cn.T
        for k in (1, 3):
            hit = sum(relevant[i][0] in top[i].topk(k).indices.tolist() for i in range(len(qs))) / len(qs)
            assert abs(rec[f"R@{k}"] - hit) < 1e-6, k  # recall_at_k returns float32 shares
    calls = []
    reused = wording_effect(lambda qs: calls.append(len(qs)) or encode(qs), queries, cands, relevant, source, target,
                            ks=(1, 3), encoded=encode(queries))
    assert reused == got and calls == [len(queries)] * 3  # the written queries are not encoded again


def test_query_spread_against_the_pairwise_matrix_and_the_text_share():
    """query_spread is the mean off-diagonal cosine (here against the (Q, Q) matrix, in float64, odd Q); text_share
    divides the text's movement by it: a text that moves each query as far as another query sits gives 1."""
    g = torch.Generator().manual_seed(3)
    for q in (2, 7, 31):
        e = torch.nn.functional.normalize(torch.randn(q, 5, generator=g, dtype=torch.float64) + 1.0, dim=1)
        m = e @ e.T
        want = float((m.sum() - m.diagonal().sum()) / (q * (q - 1)))
        assert abs(query_spread(e) - want) < 1e-12
    with pytest.raises(ValueError, match="at least 2"):
        query_spread(torch.ones(1, 3))

    images = {f"i{k}": torch.randn(6, generator=g, dtype=torch.float64) for k in range(5)}
    queries = [{"image": f"i{k}", "text": "t"} for k in range(5)]
    cands = torch.randn(4, 6, generator=g, dtype=torch.float64)
    relevant = [[k % 4] for k in range(5)]
    shift = torch.randn(6, generator=g, dtype=torch.float64)

    def encoder(qs):
        return torch.stack([images[q["image"]] + (3.0 * shift if "text" in q else 0) for q in qs])

    row = text_effect(encoder, queries, cands, relevant)  # embeddings normalised in float32 there
    full = torch.nn.functional.normalize(encoder(queries), dim=1)
    assert abs(row["spread"] - query_spread(full)) < 1e-6
    assert abs(row["text_share"] - (1 - row["cosine"]) / (1 - row["spread"])) < 1e-12
    assert row["text_share"] > 0

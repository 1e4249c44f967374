"""GradCache against one plain full-batch backward of the total loss (omniret.train.grad_cache)."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from omniret.train import GradCache, full_batch_loss
from toy import ToyPairs, toy_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py says why


def _batch(n, n_neg=0, seed=0):
    data = ToyPairs(per_dataset=8, seed=seed)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[: n + n_neg].tolist()
    ex = [data[i] for i in idx]
    queries = [e["query"] for e in ex[:n]]
    candidates = [e["candidate"] for e in ex[:n]] + [e["candidate"] for e in ex[n:]]
    ids = [e["candidate_id"] for e in ex[:n]] + [e["candidate_id"] for e in ex[n:]]
    return queries, candidates, ids


def _grads(model):
    return {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


def _plain_grads(model, queries, candidates, **kw):
    model.zero_grad(set_to_none=True)
    ids = kw.pop("candidate_ids", None)
    positives = None
    if ids is not None:
        codes = {x: i for i, x in enumerate(dict.fromkeys(ids))}
        pc = torch.tensor([codes[x] for x in ids[: len(queries)]])
        ac = torch.tensor([codes[x] for x in ids])
        positives = pc[:, None] == ac[None, :]
    terms = full_batch_loss(model, queries, candidates, positives, **kw)
    terms.total.backward()
    return _grads(model), terms


def _assert_grads_close(a, b, rtol, atol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _assert_grads_close_scaled(a, b, tol):
    """|a - b| <= tol * max|b| per tensor: for models with float32 islands, where a tiny element's relative
    error says nothing."""
    assert a.keys() == b.keys()
    for name in a:
        scale = float(b[name].abs().max())
        err = float((a[name] - b[name]).abs().max())
        assert err <= tol * scale + 1e-12, f"{name}: max error {err:.3g}, gradient scale {scale:.3g}"


@pytest.mark.parametrize("chunk, keep", [(1, 1), (3, 0), (3, 1), (3, 5), (4, 2), (64, 1), (64, 0)])
@pytest.mark.parametrize("n_neg", [0, 3])
def test_matches_plain_full_batch_backward_float64(chunk, keep, n_neg):
    model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
    model.train()
    queries, candidates, ids = _batch(10, n_neg)
    kw = dict(tau=0.07, beta=0.5, mu1=1.0, mu2=0.1)
    want, terms = _plain_grads(model, queries, candidates, candidate_ids=ids, **kw)
    model.zero_grad(set_to_none=True)
    gc = GradCache(model, chunk_size=chunk, loss_chunk_size=5, keep_graphs=keep, **kw)
    stats = gc.step(queries, candidates, candidate_ids=ids)
    got = _grads(model)
    # the interim diversity op computes in float32, hence 1e-6 on its share; the rest is float64
    assert abs(stats["loss"] - float(terms.total.detach())) < 1e-6
    assert abs(stats["contrastive"] - float(terms.contrastive)) < 1e-10
    assert stats["diversity"] > 0  # the toy batch has media, so the diversity path is exercised
    _assert_grads_close(got, want, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("chunk, keep", [(1, 1), (3, 0), (4, 2), (64, 1)])
@pytest.mark.parametrize("n_neg", [0, 3])
def test_symmetric_loss_matches_plain_full_batch_backward_float64(chunk, keep, n_neg):
    """CLIP's symmetric InfoNCE (the candidate->query side over the positive block) through the chunked step."""
    model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
    model.train()
    queries, candidates, ids = _batch(10, n_neg)
    kw = dict(tau=0.05, beta=0.0, mu1=0.0, mu2=0.0)
    want, terms = _plain_grads(model, queries, candidates, candidate_ids=ids, symmetric=True, **kw)
    _, one_sided = _plain_grads(model, queries, candidates, candidate_ids=ids, **kw)
    assert abs(float(terms.total) - float(one_sided.total)) > 1e-3  # the symmetric side changes the loss
    model.zero_grad(set_to_none=True)
    gc = GradCache(model, chunk_size=chunk, loss_chunk_size=5, keep_graphs=keep, symmetric=True, **kw)
    stats = gc.step(queries, candidates, candidate_ids=ids)
    assert abs(stats["loss"] - float(terms.total.detach())) < 1e-10
    _assert_grads_close(_grads(model), want, rtol=1e-6, atol=1e-8)


def test_step_accumulates_like_backward_and_scales():
    model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
    queries, candidates, _ = _batch(6)
    want, _ = _plain_grads(model, queries, candidates)
    model.zero_grad(set_to_none=True)
    gc = GradCache(model, chunk_size=4)
    gc.step(queries, candidates, loss_scale=0.5)
    gc.step(queries, candidates, loss_scale=0.5)
    _assert_grads_close(_grads(model), want, rtol=1e-6, atol=1e-8)


def test_dropout_replay_is_deterministic_and_matches_single_chunk_plain_step():
    model = toy_model(dropout=0.3, diversity_p=0.5, dtype=torch.float64)
    model.train()
    queries, candidates, _ = _batch(9, 2)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        GradCache(model, chunk_size=4).step(queries, candidates)
        runs.append((_grads(model), torch.rand(3)))
    _assert_grads_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert torch.equal(runs[0][1], runs[1][1])  # the RNG stream after the step is the same too
    # one chunk per side draws the same random numbers, in the same order, as the plain step: dropout masks
    # and diversity masks must then be replayed exactly, or these gradients differ
    torch.manual_seed(7)
    want, _ = _plain_grads(model, queries, candidates)
    after_plain = torch.rand(3)
    torch.manual_seed(7)
    model.zero_grad(set_to_none=True)
    GradCache(model, chunk_size=64).step(queries, candidates)
    _assert_grads_close(_grads(model), want, rtol=1e-6, atol=1e-8)
    assert torch.equal(torch.rand(3), after_plain)


@pytest.mark.parametrize("keep", [2, 3, 100])
def test_kept_graphs_replay_the_same_randomness(keep):
    """Chunks kept from step 1 (their graphs backpropagated without a re-run) see the dropout and diversity
    masks a replayed chunk would: the gradients equal those of a step that replays every chunk."""
    model = toy_model(dropout=0.3, diversity_p=0.5, dtype=torch.float64)
    model.train()
    queries, candidates, _ = _batch(9, 2)
    runs = []
    for k in (0, keep):
        torch.manual_seed(11)
        model.zero_grad(set_to_none=True)
        stats = GradCache(model, chunk_size=4, keep_graphs=k).step(queries, candidates)
        runs.append((_grads(model), stats["loss"], torch.rand(3)))
    _assert_grads_close(runs[0][0], runs[1][0], rtol=1e-12, atol=1e-14)
    assert runs[0][1] == runs[1][1]
    assert torch.equal(runs[0][2], runs[1][2])
    # and the masks are really random: another seed changes the gradients
    torch.manual_seed(12)
    model.zero_grad(set_to_none=True)
    GradCache(model, chunk_size=4, keep_graphs=keep).step(queries, candidates)
    assert any(not torch.equal(g, runs[0][0][n]) for n, g in _grads(model).items())


def test_kept_graphs_save_forwards():
    """keep_graphs=k re-runs k chunks fewer; a batch inside k chunks runs as many forwards as a plain step."""
    model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
    queries, candidates, _ = _batch(8)
    calls = []
    model.register_forward_pre_hook(lambda mod, args: calls.append(len(args[0])))
    for keep, forwards in [(0, 8), (1, 7), (3, 5), (4, 4), (9, 4)]:
        calls.clear()
        GradCache(model, chunk_size=4, keep_graphs=keep).step(queries, candidates)
        assert len(calls) == forwards, (keep, calls)


def test_learnable_temperature_gets_gradient():
    from omniret.losses import LearnableTemperature
    model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
    queries, candidates, _ = _batch(6)
    temp = LearnableTemperature(0.1).double()
    gc = GradCache(model, chunk_size=2, temperature=temp)
    gc.step(queries, candidates)
    tau = temp()
    model_grads = _grads(model)
    temp_grad = temp.log_scale.grad.clone()
    model.zero_grad(set_to_none=True)
    temp.zero_grad(set_to_none=True)
    full_batch_loss(model, queries, candidates, tau=temp()).total.backward()
    _assert_grads_close(model_grads, _grads(model), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(temp_grad, temp.log_scale.grad, rtol=1e-6, atol=1e-10)
    assert abs(float(tau.detach()) - 0.1) < 1e-6


def test_bad_arguments():
    model = toy_model()
    queries, candidates, ids = _batch(4)
    with pytest.raises(ValueError, match="chunk_size"):
        GradCache(model, chunk_size=0)
    with pytest.raises(ValueError, match="keep_graphs"):
        GradCache(model, chunk_size=2, keep_graphs=-1)
    gc = GradCache(model, chunk_size=2)
    with pytest.raises(ValueError, match="queries"):
        gc.step([], candidates)
    with pytest.raises(ValueError, match="candidates"):
        gc.step(queries, candidates[:2])
    with pytest.raises(ValueError, match="candidate_ids"):
        gc.step(queries, candidates, candidate_ids=ids[:2])


# ----------------------------------------------------------------------------------------------------------
# the real model: the `tiny` preset
# ----------------------------------------------------------------------------------------------------------
def _tiny(dtype=torch.float64, **overrides):
    from omniret.config import preset
    from omniret.model import OmniRet
    model = OmniRet.from_config(preset("tiny", **overrides))
    model.setup_stage(2)  # LoRA in: every kind of trainable parameter takes part
    return model.to(dtype).train()


def _tiny_batch(seed=0, n_neg=1):
    g = torch.Generator().manual_seed(seed)

    def img():
        return torch.rand(3, 32, 32, generator=g)

    def aud():
        return torch.randn(6000, generator=g) * 0.1

    queries = [{"text": "a red square", "instruction": "find the image"}, {"image": img(), "text": "same colour"},
               {"audio": aud()}, {"text": "dog barking"}, {"image": img()}, {"text": "and this", "audio": aud()},
               {"text": "q seven"}]
    candidates = [{"image": img()}, {"text": "caption one"}, {"text": "caption two"}, {"audio": aud()},
                  {"text": "c four"}, {"image": img()}, {"audio": aud()}] + [{"text": "hard negative"}] * n_neg
    return queries, candidates


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_tiny_preset_matches_plain_full_batch_backward(chunk):
    model = _tiny(diversity_p=0.0)
    queries, candidates = _tiny_batch()
    want, terms = _plain_grads(model, queries, candidates)
    assert float(terms.diversity.detach()) > 0
    model.zero_grad(set_to_none=True)
    stats = GradCache(model, chunk_size=chunk).step(queries, candidates)
    got = _grads(model)
    assert abs(stats["loss"] - float(terms.total.detach())) < 1e-6
    # float64 parameters, but some ops keep float32 islands (the interim diversity op computes in float32)
    _assert_grads_close_scaled(got, want, 1e-5)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # not vacuous (LoRA A matrices get no gradient while B is still zero, as LoRA starts)
    assert sum(int(got[n].abs().sum() > 0) for n in trainable) > 0.7 * len(trainable)


def test_tiny_preset_dropout_replays():
    model = _tiny(diversity_p=0.5, lora_dropout=0.2)
    queries, candidates = _tiny_batch(1)
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        model.zero_grad(set_to_none=True)
        GradCache(model, chunk_size=2).step(queries, candidates)
        runs.append(_grads(model))
    _assert_grads_close(runs[0], runs[1], rtol=0, atol=0)
    torch.manual_seed(9)
    want, _ = _plain_grads(model, queries, candidates)
    torch.manual_seed(9)
    model.zero_grad(set_to_none=True)
    GradCache(model, chunk_size=64).step(queries, candidates)
    _assert_grads_close_scaled(_grads(model), want, 1e-5)
    # dropout is really on: another seed gives other gradients
    torch.manual_seed(6)
    model.zero_grad(set_to_none=True)
    GradCache(model, chunk_size=2).step(queries, candidates)
    other = _grads(model)
    assert any(not torch.equal(other[k], runs[0][k]) for k in other)


def _count_calls(model, monkeypatch) -> dict:
    """Counters of the work GradCache must do once per step: items prepared, media preprocessed, media items
    through each encoder's encode()."""
    calls = {"prepare": 0, "preprocess": 0, "image": 0, "audio": 0}
    prepare = model.prepare

    def counted_prepare(items, *args, **kwargs):
        calls["prepare"] += len(items)
        return prepare(items, *args, **kwargs)

    monkeypatch.setattr(model, "prepare", counted_prepare)
    for name, enc in model.encoders.items():
        def encode(batch, _run=enc.encode, _name=name):
            calls[_name] += len(batch)
            return _run(batch)

        def preprocess(raw, *args, _run=enc.preprocess, **kwargs):
            calls["preprocess"] += 1
            return _run(raw, *args, **kwargs)

        monkeypatch.setattr(enc, "encode", encode)
        monkeypatch.setattr(enc, "preprocess", preprocess)
    return calls


@pytest.mark.parametrize("chunk, keep", [(2, 0), (3, 1), (64, 1)])
def test_frozen_work_runs_once_per_step(monkeypatch, chunk, keep):
    """Parsing, media decoding and the frozen encoders run once per item per step, however many chunks and
    replays: the replays start from the kept features."""
    model = _tiny(diversity_p=0.5)
    queries, candidates = _tiny_batch()
    calls = _count_calls(model, monkeypatch)
    GradCache(model, chunk_size=chunk, keep_graphs=keep).step(queries, candidates)
    images = sum("image" in it for it in queries + candidates)
    audios = sum("audio" in it for it in queries + candidates)
    assert calls == {"prepare": len(queries) + len(candidates), "preprocess": images + audios,
                     "image": images, "audio": audios}


def test_prepared_batches_step_as_items(monkeypatch):
    """step() takes batches the model prepared: the same gradients and loss as from the items; with their frozen
    features already computed, the step runs no frozen encoder at all."""
    model = _tiny(diversity_p=0.5)
    queries, candidates = _tiny_batch(3)
    runs = []
    for prepared in (False, True):
        q, c = queries, candidates
        if prepared:
            q, c = model.prepare(queries), model.encode_frozen_media(model.prepare(candidates))
        torch.manual_seed(4)
        model.zero_grad(set_to_none=True)
        stats = GradCache(model, chunk_size=2, keep_graphs=0).step(q, c)
        runs.append((_grads(model), stats["loss"]))
    _assert_grads_close(runs[0][0], runs[1][0], rtol=0, atol=0)
    assert runs[0][1] == runs[1][1]
    q = model.encode_frozen_media(model.prepare(queries))
    c = model.encode_frozen_media(model.prepare(candidates))
    calls = _count_calls(model, monkeypatch)
    GradCache(model, chunk_size=2, keep_graphs=0).step(q, c)
    assert calls == {"prepare": 0, "preprocess": 0, "image": 0, "audio": 0}


def test_trainable_tower_replays_with_the_chunks():
    """A trainable image tower is not frozen work: it runs in every chunk and replay, and its gradient equals the
    plain step's, while the frozen audio encoder's tokens are reused."""
    from omniret.config import preset
    from omniret.model import OmniRet
    cfg = preset("tiny", diversity_p=0.0)
    cfg.image_encoder.trainable = True
    model = OmniRet(cfg)
    model.setup_stage(2)
    model = model.to(torch.float64).train()
    queries, candidates = _tiny_batch()
    want, terms = _plain_grads(model, queries, candidates)
    model.zero_grad(set_to_none=True)
    stats = GradCache(model, chunk_size=3, keep_graphs=0).step(queries, candidates)
    got = _grads(model)
    assert abs(stats["loss"] - float(terms.total.detach())) < 1e-6
    _assert_grads_close_scaled(got, want, 1e-5)
    tower = [n for n in got if n.startswith("encoders.image.") and "patch_embedding" in n]
    assert tower and all(got[n].abs().sum() > 0 for n in tower)


WORKER = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    from omniret.train import GradCache
    sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
    from toy import toy_model
    from test_grad_cache import _batch, _grads
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + os.environ["PORT"])
    queries, candidates, ids = _batch(9, 3)
    # rank 0: queries 0-4 with hard negatives 9-10; rank 1: queries 5-8 with hard negative 11
    q_rows = [range(0, 5), range(5, 9)][rank]
    n_rows = [range(9, 11), range(11, 12)][rank]
    q = [queries[i] for i in q_rows]
    c = [candidates[i] for i in q_rows] + [candidates[i] for i in n_rows]
    cid = [ids[i] for i in q_rows] + [ids[i] for i in n_rows]
    out = {}
    for mode in ("plain", "ddp", "symmetric"):
        model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
        net = model
        if mode == "ddp":
            net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        gc = GradCache(net, chunk_size=2, loss_chunk_size=4, symmetric=mode == "symmetric")
        stats = gc.step(q, c, candidate_ids=cid)
        out[mode] = (_grads(model), stats)
    # the tiny preset, plain model: rank 0 holds queries 0-3 and the hard negative, rank 1 queries 4-6
    from test_grad_cache import _tiny, _tiny_batch
    tq, tc = _tiny_batch(2)
    rows = [range(0, 4), range(4, 7)][rank]
    model = _tiny(diversity_p=0.0)
    GradCache(model, chunk_size=2).step([tq[i] for i in rows], [tc[i] for i in rows] + tc[7:] * (rank == 0))
    out["tiny"] = (_grads(model), None)
    torch.save(out, os.environ["OUT"] + str(rank))
    dist.destroy_process_group()
""")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(tmp_path):
    queries, candidates, ids = _batch(9, 3)
    model = toy_model(dropout=0.0, diversity_p=0.0, dtype=torch.float64)
    want, terms = _plain_grads(model, queries, candidates, candidate_ids=ids)
    # the symmetric loss pairs the global batch's positives with its queries across ranks
    want_sym, terms_sym = _plain_grads(model, queries, candidates, candidate_ids=ids, symmetric=True)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), PORT=port, OUT=str(tmp_path / "grads"), ROOT=ROOT,
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME="lo")
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT))
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out.decode()[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tq, tc = _tiny_batch(2)
    tiny_want, _ = _plain_grads(_tiny(diversity_p=0.0), tq, tc)
    for rank in range(2):
        result = torch.load(tmp_path / f"grads{rank}", weights_only=False)
        _assert_grads_close_scaled(result["tiny"][0], tiny_want, 1e-5)
        for mode in ("plain", "ddp", "symmetric"):
            got, stats = result[mode]
            expected_grads, expected = (want_sym, terms_sym) if mode == "symmetric" else (want, terms)
            assert abs(stats["loss"] - float(expected.total.detach())) < 1e-6
            assert stats["queries"] == 9 and stats["candidates"] == 12
            _assert_grads_close(got, expected_grads, rtol=1e-6, atol=1e-8)


class _FrozenTextTrainableImage(torch.nn.Module):
    """Text items come from a frozen table, images through a trainable projection: a chunk of text-only items has
    nothing to backpropagate into (stage 1 with EOS or mean pooling looks like this)."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 8, dtype=torch.float64)
        self.register_buffer("table", torch.randn(10, 8, dtype=torch.float64))

    def forward(self, items):
        rows = [self.proj(it["image"]) if isinstance(it, dict) else self.table[int(it)] for it in items]
        return torch.stack(rows), {"diversity": torch.zeros((), dtype=torch.float64), "num_media": 0}


def test_chunks_with_nothing_trainable_are_skipped():
    model = _FrozenTextTrainableImage()
    queries = [str(i) for i in range(6)]  # text only: no gradient path
    candidates = [{"image": torch.randn(4, dtype=torch.float64)} for _ in range(6)]
    want, _ = _plain_grads(model, queries, candidates)
    model.zero_grad(set_to_none=True)
    GradCache(model, chunk_size=2).step(queries, candidates)
    _assert_grads_close(_grads(model), want, rtol=1e-10, atol=1e-12)

"""GradCache under torch.distributed with ranks that disagree: different numbers of chunks, different
modality mixes, a rank whose last chunk (or every chunk) has nothing trainable; DDP, a plain module and FSDP2.
Two processes on gloo over 127.0.0.1, launched by the test, each bounded by a timeout so that a hang fails."""
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

from omniret.train import GradCache, full_batch_loss

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 120  # a launch takes a few seconds; a hang (the bug this file guards) would wait forever


class MixedPathModel(nn.Module):
    """Items: a str (text from a frozen table: no gradient path), {"image": (4,)} through a trainable linear
    map, {"audio": (3,)} through another. A chunk of text items has nothing trainable; a chunk without audio
    leaves the audio weights unused."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.image = nn.Linear(4, 8, dtype=torch.float64)
        self.audio = nn.Linear(3, 8, dtype=torch.float64)
        self.never_used = nn.Linear(2, 2, dtype=torch.float64)  # keeps .grad None everywhere
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        self.register_buffer("table", torch.randn(10, 8, generator=g, dtype=torch.float64))

    def forward(self, items):
        rows = []
        for it in items:
            if isinstance(it, str):
                rows.append(self.table[int(it)])
            elif "image" in it:
                rows.append(self.image(it["image"]))
            else:
                rows.append(self.audio(it["audio"]))
        media = sum(not isinstance(it, str) for it in items)
        return torch.stack(rows), {"diversity": torch.zeros((), dtype=torch.float64), "num_media": media}


def mixed_batch():
    """Per rank (queries, candidates), chunk size 2; candidates beyond the queries are hard negatives.
    Rank 0: 3 queries; its last candidate chunk is text only (nothing trainable). Rank 1: 2 queries and a
    hard negative; its last chunk is trainable (audio). Rank 0 never sees audio in its candidates."""
    g = torch.Generator().manual_seed(11)

    def img():
        return {"image": torch.randn(4, generator=g, dtype=torch.float64)}

    def aud():
        return {"audio": torch.randn(3, generator=g, dtype=torch.float64)}

    rank0 = ([img(), img(), aud()], [img(), img(), "3"])
    rank1 = ([aud(), img()], ["1", img(), aud()])
    return [rank0, rank1]


def text_only_rank_batch():
    """Rank 0 holds only text (no chunk with anything trainable at all); rank 1 images and audio."""
    g = torch.Generator().manual_seed(12)
    rank0 = (["1", "2", "5"], ["3", "4", "6"])
    rank1 = ([{"image": torch.randn(4, generator=g, dtype=torch.float64)},
              {"audio": torch.randn(3, generator=g, dtype=torch.float64)}],
             [{"audio": torch.randn(3, generator=g, dtype=torch.float64)}, "7", "8"])
    return [rank0, rank1]


def concatenated(per_rank):
    """The single-process batch the ranks hold together: every rank's positives first, then the negatives."""
    queries = [q for qs, _ in per_rank for q in qs]
    positives = [c for qs, cs in per_rank for c in cs[:len(qs)]]
    negatives = [c for qs, cs in per_rank for c in cs[len(qs):]]
    return queries, positives + negatives


def grads_of(model):
    """name -> gradient (full tensor for FSDP's sharded DTensors) or None."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad
        if g is not None and hasattr(g, "full_tensor"):
            g = g.full_tensor()
        out[name] = None if g is None else g.detach().clone()
    return out


def single_process_grads(model, per_rank, steps=1):
    queries, candidates = concatenated(per_rank)
    model.zero_grad(set_to_none=True)
    for _ in range(steps):
        full_batch_loss(model, queries, candidates).total.backward()
    return grads_of(model)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PRELUDE = textwrap.dedent("""
    import os, sys, torch, torch.distributed as dist
    torch.set_num_threads(1)
    sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
    from omniret.train.distributed import leave_process_group  # each worker's last line (it says why)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method="tcp://127.0.0.1:" + os.environ["PORT"])
""")


def run_two_ranks(worker: str, tmp_path, prelude: str = PRELUDE, **env_vars):
    """Runs `worker` (after `prelude`) on ranks 0 and 1, with torchrun's environment variables and `env_vars`;
    returns what each saved with torch.save(obj, OUT)."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, PORT=port, OUT=str(tmp_path / f"out{rank}"), ROOT=ROOT,
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
                   GLOO_SOCKET_IFNAME="lo", **env_vars)
        procs.append(subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(worker)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = []
        for rank, p in enumerate(procs):
            try:
                logs.append(p.communicate(timeout=TIMEOUT_S)[0].decode())
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank {rank} did not finish in {TIMEOUT_S} s (hung in a collective?)")
        for rank, p in enumerate(procs):  # the first rank to fail explains; the others only lost their peer
            assert p.returncode == 0, "\n".join(f"--- rank {r}:\n{log[-2500:]}" for r, log in enumerate(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [torch.load(tmp_path / f"out{rank}", weights_only=False) for rank in range(2)]


def assert_same_grads(got, want, where):
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, f"{where}: {name} should have no gradient (unused on every rank)"
            continue
        assert got[name] is not None, f"{where}: {name} has no gradient"
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m: f"{where}: {name}: {m}")


# Every step is taken twice (with zero_grad between, then once more without: accumulation): with DDP's hooks a
# desynchronised first step shows up as a hang, or as a reducer error at the next forward.
DISAGREEING_RANKS_WORKER = """
    from omniret.train import GradCache
    from test_distributed import MixedPathModel, mixed_batch, text_only_rank_batch, grads_of
    out = {}
    for case, batch in (("mixed", mixed_batch()), ("text_only_rank", text_only_rank_batch())):
        q, c = batch[rank]
        for mode in ("ddp", "ddp_find_unused", "plain"):
            model = MixedPathModel()
            net = model
            if mode != "plain":
                net = torch.nn.parallel.DistributedDataParallel(model,
                                                                find_unused_parameters=mode == "ddp_find_unused")
            gc = GradCache(net, chunk_size=2)
            gc.step(q, c)
            model.zero_grad(set_to_none=True)
            gc.step(q, c)
            one = grads_of(model)
            gc.step(q, c)  # accumulates onto synced gradients: the average leaves those as they are
            out[case, mode] = (one, grads_of(model))
    torch.save(out, os.environ["OUT"])
    leave_process_group()
"""


@pytest.mark.slow
def test_ranks_disagreeing_on_trainable_chunks_do_not_hang(tmp_path):
    results = run_two_ranks(DISAGREEING_RANKS_WORKER, tmp_path)
    for case, batch in (("mixed", mixed_batch()), ("text_only_rank", text_only_rank_batch())):
        want_one = single_process_grads(MixedPathModel(), batch)
        want_two = single_process_grads(MixedPathModel(), batch, steps=2)
        assert want_one["audio.weight"] is not None and want_one["never_used.weight"] is None
        for rank, result in enumerate(results):
            for mode in ("ddp", "ddp_find_unused", "plain"):
                one, two = result[case, mode]
                assert_same_grads(one, want_one, f"{case}/{mode}/rank {rank}")
                assert_same_grads(two, want_two, f"{case}/{mode}/rank {rank}, accumulated")


FSDP_WORKER = """
    from omniret.train import GradCache
    from omniret.train.distributed import shard_model_fsdp
    from test_distributed import MixedPathModel, mixed_batch, text_only_rank_batch, grads_of
    out = {}
    for case, batch in (("mixed", mixed_batch()), ("text_only_rank", text_only_rank_batch())):
        q, c = batch[rank]
        model = shard_model_fsdp(MixedPathModel())
        gc = GradCache(model, chunk_size=2)
        gc.step(q, c)
        out[case, "local_shapes"] = {n: tuple(p.to_local().shape) for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        gc.step(q, c)
        one = grads_of(model)
        # gradient accumulation: two half-scaled micro-steps, the first without sync
        model.zero_grad(set_to_none=True)
        gc.step(q, c, loss_scale=0.5, sync=False)
        gc.step(q, c, loss_scale=0.5)
        half = grads_of(model)
        # the optimizer runs on the shards
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.step()
        model.unshard()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        model.reshard()
        out[case] = (one, half, params)
    # the tiny preset (stage 2, LoRA in), uneven shards: rank 0 queries 0-3 + the hard negative, rank 1 4-6
    from test_grad_cache import _tiny, _tiny_batch
    tq, tc = _tiny_batch(2)
    rows = [range(0, 4), range(4, 7)][rank]
    model = shard_model_fsdp(_tiny(diversity_p=0.0))
    GradCache(model, chunk_size=3).step([tq[i] for i in rows], [tc[i] for i in rows] + tc[7:] * (rank == 0))
    out["tiny"] = grads_of(model)
    torch.save(out, os.environ["OUT"])
    leave_process_group()
"""


@pytest.mark.slow
def test_fsdp_grad_cache_matches_single_process(tmp_path):
    results = run_two_ranks(FSDP_WORKER, tmp_path)
    for case, batch in (("mixed", mixed_batch()), ("text_only_rank", text_only_rank_batch())):
        model = MixedPathModel()
        want = single_process_grads(model, batch)
        with torch.no_grad():
            stepped = {n: p - 0.1 * want[n] if want[n] is not None else p.clone()
                       for n, p in model.named_parameters()}
        for rank, result in enumerate(results):
            one, half, params = result[case]
            assert_same_grads(one, want, f"fsdp {case} rank {rank}")
            assert_same_grads(half, want, f"fsdp {case} rank {rank}, accumulated")
            for n in stepped:
                torch.testing.assert_close(params[n], stepped[n], rtol=1e-9, atol=1e-12)
        # really sharded: rank 0 holds the first rows of image.weight (8 x 4), rank 1 the rest
        assert results[0][case, "local_shapes"]["image.weight"] == (4, 4)
        assert results[1][case, "local_shapes"]["image.weight"] == (4, 4)
    from test_grad_cache import _assert_grads_close_scaled, _tiny, _tiny_batch
    tq, tc = _tiny_batch(2)
    tiny = _tiny(diversity_p=0.0)
    tiny.zero_grad(set_to_none=True)
    full_batch_loss(tiny, tq, tc).total.backward()
    want = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in tiny.named_parameters()}
    for rank, result in enumerate(results):
        got = {n: g if g is not None else torch.zeros_like(want[n]) for n, g in result["tiny"].items()}
        _assert_grads_close_scaled(got, want, 1e-5)


def test_average_gradients_needs_no_process_group_for_one_rank_models():
    """Single process: GradCache with chunks of nothing trainable still matches (no collective is entered)."""
    batch = mixed_batch()
    queries, candidates = concatenated(batch)
    model = MixedPathModel()
    want = single_process_grads(model, batch)
    model.zero_grad(set_to_none=True)
    GradCache(model, chunk_size=2).step(queries, candidates)
    assert_same_grads(grads_of(model), want, "single process")


# The trainer under two ranks: DDP unbroken against FSDP stopped after 5 of 8 steps (mid stage 2: stage 2
# unfreezes the text table, so the FSDP path must reach the already-created unsharded parameters) and resumed
# by a fresh model, as a restarted torchrun would. Dropout is on, so per-rank RNG streams must be resumed too.
TRAINER_WORKER = """
    from omniret.train import StageConfig, TrainConfig, Trainer
    from omniret.train.distributed import full_state_dict
    from toy import toy_dataset, toy_model
    out_dir = os.path.join(os.path.dirname(os.environ["OUT"]), "runs")  # shared by the ranks

    def cfg(name, strategy):
        return TrainConfig(stages=[StageConfig(1, 4, 12, tasks=["text->image", "image->text", "text->audio"]),
                                   StageConfig(2, 4, 12)],
                           chunk_size=5, lr=3e-3, warmup_steps=2, tasks_per_batch=2, checkpoint_every=3,
                           progress_bar=False, tensorboard=False, seed=11, strategy=strategy,
                           output_dir=os.path.join(out_dir, name))

    data = toy_dataset(per_dataset=10)
    out = {}
    model = toy_model(seed=1)
    ddp = Trainer(model, cfg("ddp", "ddp")).fit(data)
    out["ddp"] = ({k: v.clone() for k, v in model.state_dict().items()}, [h["loss"] for h in ddp.history])
    part = Trainer(toy_model(seed=1), cfg("fsdp", "fsdp")).fit(data, max_steps=5)
    model = toy_model(seed=1)
    trainer = Trainer(model, cfg("fsdp", "fsdp"))
    rest = trainer.fit(data)
    state, _ = full_state_dict(model)
    out["fsdp"] = (state, [h["loss"] for h in part.history + rest.history], rest.steps,
                   type(next(model.parameters())).__name__)
    torch.save(out, os.environ["OUT"])
    leave_process_group()
"""


@pytest.mark.slow
def test_trainer_fsdp_resumed_matches_ddp(tmp_path):
    results = run_two_ranks(TRAINER_WORKER, tmp_path)
    ddp_state, ddp_losses = results[0]["ddp"]
    fsdp_state, fsdp_losses, steps, param_type = results[0]["fsdp"]
    assert steps == 8 and param_type == "DTensor"
    assert len(ddp_losses) == 8 and ddp_losses == results[1]["ddp"][1]  # every rank logs the global loss
    torch.testing.assert_close(fsdp_losses, ddp_losses, rtol=1e-5, atol=1e-7)
    assert fsdp_state.keys() == ddp_state.keys()
    for k in ddp_state:
        torch.testing.assert_close(fsdp_state[k], ddp_state[k], rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")
    # the weights moved (a run that trained nothing would also "match")
    from toy import toy_model
    start = toy_model(seed=1).state_dict()
    assert not torch.allclose(ddp_state["text.weight"], start["text.weight"])  # trained in stage 2
    assert not torch.allclose(ddp_state["head.0.weight"], start["head.0.weight"])


# `omniret train` as torchrun starts it: the command initialises the group from the environment (gloo on CPU),
# trains, and destroys the group before it returns, since a process that exits with its group alive can abort
# in the backend's threads at interpreter exit.
TRAIN_COMMAND_WORKER = """
    import os, sys, torch, torch.distributed as dist
    sys.path.insert(0, os.path.join(os.environ["ROOT"], "tests"))
    from omniret.cli import main
    rc = main(["train", "--config", os.environ["CONFIG"], "--no-progress"])
    torch.save({"rc": rc, "group_alive": dist.is_initialized()}, os.environ["OUT"])
"""


@pytest.mark.slow
def test_train_command_under_torchrun_environment_trains_and_destroys_its_group(tmp_path):
    from test_trainer import _final_model, _write_config
    config = _write_config(tmp_path / "two_ranks.json", tmp_path / "run")
    results = run_two_ranks(TRAIN_COMMAND_WORKER, tmp_path, prelude="", CONFIG=str(config))
    for rank, result in enumerate(results):
        assert result == {"rc": 0, "group_alive": False}, f"rank {rank}: {result}"
    state = _final_model(tmp_path / "run")
    assert state["global_step"] == 10 and state["strategy"] == "ddp"

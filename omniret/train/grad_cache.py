"""Gradient caching (Gao et al., "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"):
a contrastive step over a batch of thousands with the activation memory of one chunk.

    gc = GradCache(model, chunk_size=64, tau=0.07, beta=0.5, mu1=1.0, mu2=0.1)
    stats = gc.step(queries, candidates)  # fills .grad as one full-batch backward of the total loss would

1. each side (queries, candidates) is prepared once: a model with `prepare` (OmniRet) turns the items, a chunk
   at a time, into one PreparedBatch (parsing, tokenizing, media decoding), its frozen encoders run once over
   each chunk without autograd (`encode_frozen_media`, whose tokens replace the decoded media), and chunks are
   `PreparedBatch.subset`s that carry those tokens. Items may also come already prepared. Other models (a plain
   `model(items)`) get slices of the item list;
2. every chunk of queries and candidates is embedded without autograd, after saving the RNG state;
3. the total loss (omniret.losses.total_loss; `symmetric=True`: CLIP's symmetric InfoNCE) is computed on the
   detached embeddings, and its gradient with respect to them;
4. every chunk is re-run with autograd from its saved RNG state (dropout and the diversity mask replay
   exactly) and backpropagates the cached embedding gradient plus its share of the diversity loss. The re-run
   starts from the kept frozen features: only the trainable part of the model (trainable towers, projectors,
   resamplers, the LLM, the head) runs twice.

The last `keep_graphs` chunks of step 2 (default 1) run with autograd instead, and step 4 backpropagates
their graphs first, without a re-run: one kept graph costs no memory (no chunk runs after the last one, and it
is freed before the first replay), and it saves one chunk's forward. A batch that fits in `keep_graphs`
chunks runs no extra forward at all, as a plain step.

Time: the extra cost over a plain step is one forward of the trainable part without autograd (its floor), plus
a fixed cost per model call (a step makes about two calls per chunk where a plain step makes two in all), so
the largest chunk that fits in memory is the fastest (docs/training.md measures both). Memory: the whole
batch's token ids, frozen encoders' tokens and per-chunk RNG snapshots stay for the step.

The diversity term of the total loss is the mean over all media items of the batch: chunk k, holding n_k of
the N media items, contributes mu2 * n_k / N * aux["diversity"]_k (the model computes it in training mode).

Under torch.distributed the embeddings (and media counts) are all-gathered, so negatives span the global
batch; each rank computes the same global loss but only its own rows carry gradient. The global loss's
gradient is the sum over ranks of the local backward passes. No chunk communicates (ranks may replay
different numbers of chunks and skip different ones): the chunks run through the bare module (a DDP wrapper's
inner module), the local backward is scaled by the world size, and after the last chunk every rank averages
the gradients once (omniret.train.distributed); an FSDP2 root is unsharded for the step and each rank keeps
its shard of the averaged gradient.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from omniret import losses
from omniret.modalities import MEDIA_MODALITIES
from omniret.train.checkpoint import capture_rng, restore_rng
from omniret.train.distributed import average_gradients, bare_module, fsdp_step, is_fsdp

__all__ = ["GradCache", "full_batch_loss", "count_media"]

def count_media(items: Sequence[Any]) -> int:
    """Media items in a list of items (an entry may hold a list of media, interleaved in its text), or in a
    prepared batch."""
    if hasattr(items, "num_media"):
        return int(items.num_media)
    n = 0
    for it in items:
        if isinstance(it, dict):
            for key in MEDIA_MODALITIES:
                v = it.get(key)
                if v is None:
                    continue
                n += len(v) if isinstance(v, (list, tuple)) else 1
    return n


class _RNGSnapshot:
    """Every global RNG a forward pass may draw from (omniret.train.checkpoint.capture_rng: torch's CPU and CUDA
    generators, Python's, NumPy's) plus the extra torch.Generator objects a GradCache was given."""

    def __init__(self, generators: Sequence[torch.Generator] = ()):
        self.global_state = capture_rng()
        self.generators = [(g, g.get_state()) for g in generators]

    def restore(self) -> None:
        restore_rng(self.global_state)
        for g, s in self.generators:
            g.set_state(s)


def _num_media(aux: Dict[str, Any], items: Sequence[Any]) -> int:
    n = aux.get("num_media") if isinstance(aux, dict) else None
    return int(n) if n is not None else count_media(items)


def _is_prepared(items) -> bool:
    return callable(getattr(items, "subset", None))


def _take(items, rows: slice):
    """The items at `rows`: a subset of a prepared batch (built when needed, so a step holds one chunk's subset
    at a time), a slice of a list."""
    return items.subset(range(rows.start, rows.stop)) if _is_prepared(items) else items[rows]


@dataclass
class _Chunk:
    side: Sequence[Any]  # the whole side (a list of items or a PreparedBatch); the chunk is side[rows]
    rng: _RNGSnapshot
    rows: slice  # rows of the local embedding matrix
    num_media: int
    diversity: float = 0.0
    graph: Optional[tuple] = None  # (embeddings, aux) with autograd, for a chunk kept from step 1


class GradCache:
    """See the module docstring. `step` returns the loss terms as floats (global values under
    torch.distributed). The loss hyper-parameters follow SPEC section 4."""

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 64,
        tau: float = 0.07,
        beta: float = 0.5,
        mu1: float = 1.0,
        mu2: float = 0.1,
        *,
        margin: float = 0.1,
        detach_weights: bool = True,
        temperature: Optional[losses.LearnableTemperature] = None,
        loss_chunk_size: int = losses.DEFAULT_CHUNK,
        autocast_dtype: Optional[torch.dtype] = None,
        keep_graphs: int = 1,
        generators: Sequence[torch.Generator] = (),
        process_group=None,
        symmetric: bool = False,
    ):
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if keep_graphs < 0:
            raise ValueError(f"keep_graphs must be >= 0, got {keep_graphs}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.model = model
        self.chunk_size = int(chunk_size)
        self.tau, self.beta, self.mu1, self.mu2, self.margin = tau, beta, mu1, mu2, margin
        self.detach_weights = detach_weights
        self.symmetric = bool(symmetric)  # CLIP's symmetric InfoNCE (losses.total_loss)
        self.temperature = temperature  # learnable tau (its .grad is filled too); None keeps tau fixed
        self.loss_chunk_size = loss_chunk_size
        self.autocast_dtype = autocast_dtype
        self.keep_graphs = int(keep_graphs)
        self.generators = list(generators)
        self.process_group = process_group

    # ------------------------------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self._device().type, dtype=self.autocast_dtype)

    def _distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def _forward_module(self) -> nn.Module:
        return bare_module(self.model)

    def _step_context(self, sync: bool):
        """An FSDP2 root stays unsharded for the whole step and is reduced once when the step ends."""
        if is_fsdp(self.model):
            return fsdp_step(self.model, sync, self.process_group)
        return contextlib.nullcontext()

    def _world(self):
        if not self._distributed():
            return 1, 0
        return dist.get_world_size(self.process_group), dist.get_rank(self.process_group)

    def _tau(self):
        return self.temperature() if self.temperature is not None else self.tau

    def _prepare(self, items):
        """One side of the batch as the model takes it for chunking: a model that prepares batches (OmniRet:
        `prepare(items, positions=)`, `encode_frozen_media`, `PreparedBatch.concat`) gets one PreparedBatch
        (unless the items come prepared) with its frozen encoders' features computed once; any other model gets
        the item list."""
        net = self._forward_module()
        prepare = getattr(net, "prepare", None)
        encode_frozen = getattr(net, "encode_frozen_media", None)
        if _is_prepared(items):
            if callable(encode_frozen):
                with torch.no_grad(), self._autocast():
                    encode_frozen(items, max_media=self.chunk_size)
            return items
        if not callable(prepare):
            return items
        if not callable(encode_frozen):
            return prepare(items)
        # chunk by chunk, each chunk's frozen media replaced by their tokens right away: the step never holds the
        # whole batch's decoded media, nor the frozen encoders' activations over more than one chunk
        parts = []
        for start in range(0, len(items), self.chunk_size):
            stop = min(start + self.chunk_size, len(items))
            part = prepare(items[start:stop], positions=list(range(start, stop)))  # errors name the batch index
            with torch.no_grad(), self._autocast():
                parts.append(encode_frozen(part, keep_media=False))
        return type(parts[0]).concat(parts) if len(parts) > 1 else parts[0]

    def _embed_chunks(self, items, keep: int) -> tuple:
        """Step 2 for one side: every chunk without autograd, except the last `keep`, whose graphs are kept."""
        chunks: List[_Chunk] = []
        embs = []
        net = self._forward_module()
        starts = range(0, len(items), self.chunk_size)
        first_kept = len(starts) - keep
        for k, start in enumerate(starts):
            part = _take(items, slice(start, min(start + self.chunk_size, len(items))))
            rng = _RNGSnapshot(self.generators)
            kept = k >= first_kept
            with torch.set_grad_enabled(kept), self._autocast():
                emb, aux = net(part)
            if emb.shape[0] != len(part):
                raise ValueError(f"model returned {emb.shape[0]} embeddings for {len(part)} items")
            chunk = _Chunk(items, rng, slice(start, start + len(part)), _num_media(aux, part))
            if isinstance(aux, dict) and "diversity" in aux:
                chunk.diversity = float(aux["diversity"].detach())
            if kept:
                chunk.graph = (emb, aux)
            chunks.append(chunk)
            embs.append(emb.detach())
        return chunks, torch.cat(embs)

    def _gather(self, local: torch.Tensor) -> tuple:
        """All-gather rows of every rank (sizes may differ) -> (global tensor, offset of this rank's rows)."""
        world, rank = self._world()
        if world == 1:
            return local, 0
        n = torch.tensor([local.shape[0]], device=local.device)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n, group=self.process_group)
        sizes = [int(s) for s in sizes]
        pad = max(sizes)
        buf = local.new_zeros((pad,) + tuple(local.shape[1:]))
        buf[: local.shape[0]] = local
        out = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(out, buf.contiguous(), group=self.process_group)
        parts = [o[:s] for o, s in zip(out, sizes)]
        return torch.cat(parts), sum(sizes[:rank])

    def _gather_objects(self, values: list) -> list:
        world, _ = self._world()
        if world == 1:
            return [values]
        out = [None] * world
        dist.all_gather_object(out, values, group=self.process_group)
        return out

    def _duplicate_mask(self, ids: list, n_pos: int, device) -> torch.Tensor:
        """(Q, C) over the global batch, ordered as the loss sees it (positives of every rank, then negatives):
        True where candidate j has the same id as query i's positive (j != i)."""
        per_rank = self._gather_objects([ids[:n_pos], ids[n_pos:]])
        pos_ids = [x for p, _ in per_rank for x in p]
        all_ids = pos_ids + [x for _, n in per_rank for x in n]
        codes = {}
        pos_codes = torch.tensor([codes.setdefault(x, len(codes)) for x in pos_ids], device=device)
        all_codes = torch.tensor([codes.setdefault(x, len(codes)) for x in all_ids], device=device)
        return pos_codes[:, None] == all_codes[None, :]

    def _all_sum(self, values: List[float], device) -> List[float]:
        if self._world()[0] == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=self.process_group)
        return t.tolist()

    # ------------------------------------------------------------------------------------------------------
    def step(self, queries: Sequence[Any], candidates: Sequence[Any], positives: Optional[torch.Tensor] = None,
             *, candidate_ids: Optional[Sequence[Any]] = None, loss_scale: float = 1.0,
             sync: bool = True) -> Dict[str, float]:
        """One contrastive step. `queries` and `candidates` are lists of items, or batches the model already
        prepared (OmniRet.prepare; their frozen features are computed here unless present). `candidates[i]` is
        `queries[i]`'s positive; candidates beyond len(queries) are
        extra hard negatives. `positives` (Q, C) bool over the global batch marks further relevant candidates
        (masked out of the negatives); alternatively `candidate_ids` (one hashable per local candidate) masks
        every candidate whose id equals query i's positive's id (duplicates in the batch). `loss_scale`
        multiplies the backpropagated loss (1 / accumulation steps); `sync=False` skips the cross-rank gradient
        reduction (for all micro-steps but the last); the reduction happens once, after the last chunk, on every
        rank, whatever chunks each rank skipped."""
        if len(queries) == 0:
            raise ValueError("queries: empty batch")
        if positives is not None and candidate_ids is not None:
            raise ValueError("pass positives or candidate_ids, not both")
        if candidate_ids is not None and len(candidate_ids) != len(candidates):
            raise ValueError(f"candidate_ids must have one id per candidate, got {len(candidate_ids)} "
                             f"for {len(candidates)}")
        if len(candidates) < len(queries):
            raise ValueError(f"candidates must hold one positive per query first: got {len(candidates)} "
                             f"candidates for {len(queries)} queries")
        with self._step_context(sync):
            return self._step(queries, candidates, positives, candidate_ids, loss_scale, sync)

    def _step(self, queries, candidates, positives, candidate_ids, loss_scale, sync) -> Dict[str, float]:
        device = self._device()
        world, _ = self._world()

        # 1-2. prepare each side once (frozen features included), then embed its chunks without autograd,
        # remembering each chunk's RNG state; the last keep_graphs chunks (candidates first, since they run last)
        # keep their graphs. Each side is prepared right before its chunks, so with one chunk per side the RNG
        # draws come in a plain step's order (a frozen encoder in training mode may draw, e.g. an augmentation).
        n_c_chunks = -(-len(candidates) // self.chunk_size)
        keep_c = min(self.keep_graphs, n_c_chunks)
        q_chunks, q_local = self._embed_chunks(self._prepare(queries), self.keep_graphs - keep_c)
        c_chunks, c_local = self._embed_chunks(self._prepare(candidates), keep_c)
        rng_after = _RNGSnapshot(self.generators)
        n_pos = len(queries)

        # 3. the loss on the (gathered) detached embeddings and its gradient with respect to them
        q_glob, q_off = self._gather(q_local.float() if q_local.dtype != torch.float64 else q_local)
        c_work = c_local.float() if c_local.dtype != torch.float64 else c_local
        # positives of every rank first, then every rank's extra negatives: candidate i stays query i's positive
        c_pos, c_off = self._gather(c_work[:n_pos])
        c_neg, n_off = self._gather(c_work[n_pos:])
        q_glob = q_glob.detach().requires_grad_()
        c_all = torch.cat([c_pos, c_neg]).detach().requires_grad_()
        media_local = sum(ch.num_media for ch in q_chunks + c_chunks)
        div_local = sum(ch.num_media * ch.diversity for ch in q_chunks + c_chunks)
        media_total, div_sum = self._all_sum([float(media_local), div_local], device)
        diversity = torch.tensor(div_sum / media_total if media_total > 0 else 0.0, dtype=q_glob.dtype)
        if candidate_ids is not None:
            positives = self._duplicate_mask(list(candidate_ids), n_pos, q_glob.device)
        tau = self._tau()
        with torch.enable_grad():
            terms = losses.total_loss(q_glob, c_all, diversity, tau=tau, beta=self.beta, margin=self.margin,
                                      mu1=self.mu1, mu2=self.mu2, detach_weights=self.detach_weights,
                                      positives=positives, chunk_size=self.loss_chunk_size,
                                      symmetric=self.symmetric)
            inputs = [q_glob, c_all]
            temp_params = list(self.temperature.parameters()) if self.temperature is not None else []
            grads = torch.autograd.grad(terms.total * loss_scale, inputs + temp_params, allow_unused=True)
        g_q, g_c = grads[0], grads[1]
        for p, g in zip(temp_params, grads[2:]):
            if g is not None:  # every rank computes the same global loss: this gradient needs no reduction
                p.grad = g if p.grad is None else p.grad + g
        g_q_local = g_q[q_off:q_off + q_local.shape[0]]
        g_c_local = torch.cat([g_c[c_off:c_off + n_pos],
                               g_c[c_pos.shape[0] + n_off:c_pos.shape[0] + n_off + c_local.shape[0] - n_pos]])

        # 4. replay each chunk with autograd and backpropagate the cached gradients. No chunk talks to other
        # ranks: the forward goes to the bare module (a DDP wrapper's hooks would all-reduce on whichever chunk
        # runs outside no_sync(), and ranks whose last chunk has nothing trainable would never join that
        # reduction), and the gradients are reduced once, explicitly, after the last chunk of every rank.
        net = self._forward_module()
        # the reduction averages over ranks (which makes re-reducing already-synced gradients a no-op), so the
        # local backward is scaled by the world size to make the result the gradient of the global loss
        rank_scale = float(world)
        div_weight = self.mu2 * loss_scale / media_total if media_total > 0 else 0.0
        work = [(ch, g_q_local) for ch in q_chunks] + [(ch, g_c_local) for ch in c_chunks]
        work.sort(key=lambda w: w[0].graph is None)  # kept graphs first: each is freed before the next replay
        for ch, g_emb in work:
            with torch.enable_grad():
                if ch.graph is not None:
                    (emb, aux), ch.graph = ch.graph, None
                else:
                    ch.rng.restore()
                    with self._autocast():
                        emb, aux = net(_take(ch.side, ch.rows))
                surrogate = (emb.to(g_emb.dtype) * g_emb[ch.rows]).sum()
                div = aux.get("diversity") if isinstance(aux, dict) else None
                if div is not None and ch.num_media > 0 and div_weight != 0.0 and div.requires_grad:
                    surrogate = surrogate + (div_weight * ch.num_media) * div.to(surrogate.dtype)
                if not surrogate.requires_grad:
                    # nothing trainable produced this chunk (e.g. text-only queries while the text path is
                    # frozen): its cached gradient has nowhere to go. Skipping it is safe under
                    # torch.distributed too, since no chunk takes part in a collective.
                    continue
                (surrogate * rank_scale).backward()
        rng_after.restore()  # the step consumed the randomness of one pass, as a plain step would
        if world > 1 and sync and not is_fsdp(self.model):
            self.all_reduce_gradients()  # (an FSDP root is reduced when _step_context exits)
        return {
            "loss": float(terms.total.detach()),
            "contrastive": float(terms.contrastive.detach()),
            "triplet": float(terms.triplet.detach()),
            "diversity": float(terms.diversity.detach()),
            "tau": float(tau.detach()) if isinstance(tau, torch.Tensor) else float(tau),
            "queries": int(q_glob.shape[0]),
            "candidates": int(c_all.shape[0]),
        }

    def all_reduce_gradients(self) -> None:
        """Average the gradients of every trainable model parameter over ranks, once (what `step` does when
        `sync`; call it yourself after steps with `sync=False`). Local backward passes are scaled by the world
        size, so the average is the gradient of the global loss; gradients that are already synced (the same
        on every rank) stay as they are. Not for an FSDP root: its steps reduce on their own."""
        params = [p for p in bare_module(self.model).parameters() if p.requires_grad]
        average_gradients(params, self.process_group)


def full_batch_loss(model: nn.Module, queries: Sequence[Any], candidates: Sequence[Any],
                    positives: Optional[torch.Tensor] = None, *, tau=0.07, beta: float = 0.5, mu1: float = 1.0,
                    mu2: float = 0.1, margin: float = 0.1, detach_weights: bool = True,
                    loss_chunk_size: int = losses.DEFAULT_CHUNK, symmetric: bool = False) -> losses.LossTerms:
    """The plain step that GradCache reproduces: one forward of the whole batch with autograd (queries first,
    then candidates, two model calls) and the total loss. Call .total.backward() on the result."""
    q, aux_q = model(queries)
    c, aux_c = model(candidates)
    n_q, n_c = _num_media(aux_q, queries), _num_media(aux_c, candidates)
    n = n_q + n_c
    div = None
    if n > 0 and "diversity" in aux_q and "diversity" in aux_c:  # (a model in eval mode computes none)
        div = (n_q * aux_q["diversity"].float() + n_c * aux_c["diversity"].float()) / n
        if q.dtype == torch.float64:
            div = div.double()
    return losses.total_loss(q, c, div, tau=tau, beta=beta, margin=margin, mu1=mu1, mu2=mu2,
                             detach_weights=detach_weights, positives=positives, chunk_size=loss_chunk_size,
                             symmetric=symmetric)

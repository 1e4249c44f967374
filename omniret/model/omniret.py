"""OmniRet: encoders -> projectors -> SharedMediaResampler -> composer LLM (+ LoRA) -> pooling head.

`model(items) -> (embeddings, aux)` for training (autograd; in training mode, or with `diversity=True`,
aux["diversity"] is the mean diversity loss over the call's media items, its dropout on only in training mode);
`encode_queries` / `encode_corpus` for inference (L2-normalised float32, no diversity term). A training step
that runs the model more than once per batch (GradCache) prepares the batch once (`prepare`), runs the encoders
that take no gradient once (`encode_frozen_media`) and then calls the model on `PreparedBatch.subset`s, which
reuse those features. See docs/model.md.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from omniret.config import OmniRetConfig, preset
from omniret.files import atomic_path, atomic_write_json, load_safetensors
from omniret.model.cache import FeatureCache, content_key
from omniret.modalities import MEDIA_MODALITIES
from omniret.model.composer import Composer, ParsedItem, parse_item
from omniret.model.encoders import MediaEncoder, build_encoder, cu_seqlens_from_lengths
from omniret.model.heads import build_head, late_interaction_scores
from omniret.model.media_norm import MediaStandardizer, fit_standardizers
from omniret.model.projectors import build_projector
from omniret_kernels import SharedMediaResampler, diversity_loss

__all__ = ["OmniRet", "PreparedBatch"]

CONFIG_FILE = "omniret_config.json"
WEIGHTS_FILE = "model.safetensors"
RANDOM_BACKBONES_FILE = "random_backbones.safetensors"


@dataclass
class PreparedBatch:
    """A batch ready for the model: token/media sequences per item, the preprocessed media per modality (the CPU
    side, from `OmniRet.prepare`) and, once `OmniRet.encode_frozen_media` ran, the tokens of the encoders that take
    no gradient, per media item (reused by every later call on this batch or a subset of it)."""

    sequences: list  # per item: [("ids", [...]) | (modality, k)]
    media_offsets: list  # per item: {modality: index of its first media in media[modality]}
    media: dict  # modality -> list of preprocessed tensors (images (3,S,S), audio (n,), video (T,3,S,S))
    features: dict = field(default_factory=dict)  # modality -> per media item, encoder tokens (n_i, D_enc)

    def __len__(self) -> int:
        return len(self.sequences)

    def subset(self, indices: Sequence[int]) -> "PreparedBatch":
        """The items at `indices`, in that order, with their media and frozen features (e.g. for gradient-cache
        chunks)."""
        media = {m: [] for m in self.media}
        features = {m: [] for m in self.features}
        offsets = []
        for i in indices:
            seq, off = self.sequences[i], self.media_offsets[i]
            counts = {m: sum(1 for kind, _ in seq if kind == m) for m in self.media}
            offsets.append({m: len(media[m]) for m in self.media})
            for m in self.media:
                media[m].extend(self.media[m][off[m]:off[m] + counts[m]])
            for m in self.features:
                features[m].extend(self.features[m][off[m]:off[m] + counts[m]])
        return PreparedBatch([self.sequences[i] for i in indices], offsets, media, features)

    @property
    def num_media(self) -> int:
        return sum(len(v) for v in self.media.values())

    @classmethod
    def concat(cls, batches: Sequence["PreparedBatch"]) -> "PreparedBatch":
        """The items of `batches`, in order, as one batch (e.g. prepared chunk by chunk to bound peak memory)."""
        if not batches:
            raise ValueError("batches is empty")
        modalities = list(batches[0].media)
        featured = {m for b in batches for m in b.features}
        for m in featured:
            if any(b.media.get(m) and m not in b.features for b in batches):
                raise ValueError(f"batches: some have {m} features and some have {m} media without them")
        media = {m: [] for m in modalities}
        features = {m: [] for m in featured}
        sequences, offsets = [], []
        for b in batches:
            base = {m: len(media[m]) for m in modalities}
            sequences.extend(b.sequences)
            offsets.extend({m: base[m] + off[m] for m in modalities} for off in b.media_offsets)
            for m in modalities:
                media[m].extend(b.media.get(m, []))
            for m in featured:
                features[m].extend(b.features.get(m, []))
        return cls(sequences, offsets, media, features)


class OmniRet(nn.Module):
    def __init__(self, config: OmniRetConfig, *, _skip_seed: bool = False):
        super().__init__()
        # the model's own copy, shared by its parts: add_lora sets its `lora`, and the caller's config stays as given
        self.config = config = config.replace()
        rng = contextlib.nullcontext() if _skip_seed else torch.random.fork_rng(devices=[])
        with rng:
            if not _skip_seed:
                torch.manual_seed(config.seed)  # random backbones and new modules: the same config, the same model
            self.encoders = nn.ModuleDict()
            if config.image_encoder is not None:
                self.encoders["image"] = build_encoder(config.image_encoder, config)
            if config.audio_encoder is not None:
                self.encoders["audio"] = build_encoder(config.audio_encoder, config)
            self.composer = Composer(config)
            dim = self.composer.hidden_size
            self.projectors = nn.ModuleDict({
                name: build_projector(config.projector, enc.out_dim, dim) for name, enc in self.encoders.items()})
            if config.standardize_media:
                self.media_norms = nn.ModuleDict({name: MediaStandardizer(enc.out_dim, f"{name} encoder")
                                                  for name, enc in self.encoders.items()})
            self.media_resampler = self._build_media_resampler(dim)
            self.head = build_head(config, dim)
        self.feature_cache: Optional[FeatureCache] = None
        if config.lora:  # a stage-2 checkpoint: LoRA is there before its weights load
            config.lora = False
            self.add_lora()
        if config.gradient_checkpointing:
            self.composer.llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # -------------------------------------------------------------------------------------------------
    # construction, stages
    # -------------------------------------------------------------------------------------------------
    def _build_media_resampler(self, dim: int):
        """Table 5 (d): "shared" (one resampler, per-modality latents; the paper's), "shared_no_latents",
        "separate" (one resampler per modality), "none" (projected encoder tokens go to the LLM as they are)."""
        cfg = self.config
        modalities = [m for m in MEDIA_MODALITIES if self._encoder_for(m) is not None]
        if not modalities or cfg.media_resampler == "none":
            return None

        def make(mods):
            return SharedMediaResampler(dim, num_latents=cfg.media_latents, depth=cfg.resampler_depth,
                                        heads=cfg.resampler_heads, modalities=mods, mlp_mult=cfg.resampler_mlp_mult)

        if cfg.media_resampler == "separate":
            return nn.ModuleDict({m: make(()) for m in modalities})
        return make(modalities if cfg.media_resampler == "shared" else ())

    def resample_media(self, modality: str, tokens: torch.Tensor, cu: torch.Tensor):
        """Projected packed tokens of one modality -> (n, Nq, D), or a list of (n_i, D) with no resampler."""
        kind = self.config.media_resampler
        if kind == "none":
            return [tokens[cu[i]:cu[i + 1]] for i in range(cu.shape[0] - 1)]
        if kind == "separate":
            return self.media_resampler[modality](tokens, cu, modality=None)
        return self.media_resampler(tokens, cu, modality=modality if kind == "shared" else None)

    @classmethod
    def from_config(cls, config) -> "OmniRet":
        """An OmniRetConfig or a preset name ("paper", "demo", "tiny")."""
        return cls(preset(config) if isinstance(config, str) else config)

    def _encoder_for(self, modality: str) -> Optional[MediaEncoder]:
        if modality == "video":
            return self.encoders["image"] if ("image" in self.encoders and self.config.video) else None
        return self.encoders[modality] if modality in self.encoders else None

    def _projector_for(self, modality: str) -> nn.Module:
        return self.projectors["image" if modality == "video" else modality]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def modalities(self) -> tuple:
        return tuple(m for m in MEDIA_MODALITIES if self._encoder_for(m) is not None)

    def frozen_prefixes(self) -> list:
        """State-dict prefixes of the frozen backbones (not saved by save_pretrained)."""
        out = [f"encoders.{n}." for n, e in self.encoders.items() if not e.trainable]
        out.append("composer.llm.")
        return out

    def is_frozen_name(self, name: str) -> bool:
        return any(name.startswith(p) for p in self.frozen_prefixes()) and "lora_" not in name

    def freeze_backbones(self) -> None:
        """Media encoders (unless trainable towers) and the LLM's own weights take no gradient."""
        for name, p in self.named_parameters():
            if self.is_frozen_name(name):
                p.requires_grad_(False)

    def add_lora(self) -> list:
        """Stage 2: LoRA (rank/alpha from the config) into the LLM. Returns the new parameters (for the
        optimizer). Idempotent."""
        if not self.config.lora:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed + 1)  # the same config gives the same LoRA init
                self.composer.add_lora()
            self.config.lora = True
        return [p for n, p in self.named_parameters() if "lora_" in n]

    def _has_video_latents(self) -> bool:
        r = self.media_resampler
        if isinstance(r, nn.ModuleDict):
            return {"image", "video"} <= set(r.keys())
        return r is not None and {"image", "video"} <= set(r.modalities)

    def init_video_latents_from_image(self) -> None:
        """Stage 2 starts the video latents from the image latents (section 5.1); with separate resamplers the
        video resampler starts as a copy of the image one."""
        if not self._has_video_latents():
            raise ValueError("init_video_latents_from_image needs image and video latents in the media resampler "
                             f"(media_resampler={self.config.media_resampler!r})")
        r = self.media_resampler
        with torch.no_grad():
            if isinstance(r, nn.ModuleDict):
                r["video"].load_state_dict(r["image"].state_dict())
            else:
                r.modality_latents["video"].copy_(r.modality_latents["image"])

    def setup_stage(self, stage: int) -> list:
        """Stage 1: projectors, resamplers and the pooling head train (plus the trainable towers); backbones
        frozen, no LoRA. Stage 2: the same plus LoRA, video latents copied from the image latents.
        Returns the trainable parameters."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        if stage == 1 and self.config.lora:
            raise ValueError("stage: this model already has LoRA (stage 2); stage 1 trains without it")
        for name, p in self.named_parameters():
            p.requires_grad_(not self.is_frozen_name(name))
        if stage == 2 and not self.config.lora:  # entering stage 2 (a stage-2 model keeps its video latents)
            self.add_lora()
            if self._has_video_latents():
                self.init_video_latents_from_image()
        return self.trainable_parameters()

    def trainable_parameters(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode: bool = True):
        super().train(mode)
        for enc in self.encoders.values():  # frozen encoders are fixed feature extractors: no dropout ever
            if not enc.trainable:
                enc.eval()
        if not self.config.llm_dropout:  # the frozen LLM's own dropout stays off; LoRA's dropout follows `mode`
            self.composer.llm.eval()
            for name, module in self.composer.llm.named_modules():
                if "lora_dropout" in name:
                    module.train(mode)
        return self

    def enable_feature_cache(self, root) -> FeatureCache:
        """Cache frozen-encoder features on disk under `root` (see omniret.model.cache)."""
        self.feature_cache = FeatureCache(root)
        return self.feature_cache

    # -------------------------------------------------------------------------------------------------
    # forward
    # -------------------------------------------------------------------------------------------------
    def prepare(self, items: Sequence, instruction: Optional[str] = None,
                positions: Optional[Sequence[int]] = None) -> PreparedBatch:
        """Parse items and load/preprocess their media (CPU work; can run in a data loader worker).
        `positions`: the items' indices in the caller's list, used in error messages."""
        if isinstance(items, (str, dict)):
            raise ValueError("items must be a list of items (strings or dicts), got a single item")
        if len(items) == 0:
            raise ValueError("items is empty")
        media = {m: [] for m in MEDIA_MODALITIES}
        sequences, offsets = [], []
        for j, item in enumerate(items):
            i = j if positions is None else positions[j]
            parsed = item if isinstance(item, ParsedItem) else parse_item(item, i, instruction)
            offsets.append({m: len(media[m]) for m in MEDIA_MODALITIES})
            counters = {m: 0 for m in MEDIA_MODALITIES}
            for kind, raw in parsed.segments:
                if kind == "text":
                    continue
                enc = self._encoder_for(kind)
                if enc is None:
                    raise ValueError(f"items[{i}] has {kind} but this model has no {kind} encoder")
                name = f"items[{i}]['{kind}'][{counters[kind]}]"
                counters[kind] += 1
                media[kind].append(enc.preprocess_video(raw, name) if kind == "video" else enc.preprocess(raw, name))
            sequences.append(self.composer.tokenize(parsed))
        return PreparedBatch(sequences=sequences, media_offsets=offsets, media=media)

    def _run_encoder(self, modality: str, xs: list) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self._encoder_for(modality)
        run = enc.encode_video if modality == "video" else enc.encode
        if enc.trainable:
            return run(xs)
        with torch.no_grad():
            return run(xs)

    def encode_media(self, modality: str, xs: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Preprocessed media of one modality -> packed encoder tokens (T, D_enc), cu_seqlens. Frozen encoders
        read/write the feature cache when one is enabled."""
        enc = self._encoder_for(modality)
        if self.feature_cache is None or enc.trainable or not getattr(enc, "cacheable", True):
            return self._run_encoder(modality, xs)
        extra = str(tuple(self.config.video_grid)) if modality == "video" else ""
        keys = [content_key(enc.fingerprint(), modality, x, extra) for x in xs]

        def compute(indices):
            tokens, cu = self._run_encoder(modality, [xs[i] for i in indices])
            return [tokens[cu[j]:cu[j + 1]] for j in range(len(indices))]

        feats = self.feature_cache.get_or_compute(keys, compute)
        device = enc.device
        return (torch.cat(feats, 0).to(device, enc.dtype),
                cu_seqlens_from_lengths([f.shape[0] for f in feats], device))

    def precompute_media(self, items: Sequence, batch_size: int = 32, show_progress_bar: bool = False) -> int:
        """Run the frozen encoders once over the media of `items`, filling the feature cache (enable_feature_cache
        first). Returns the number of media items seen."""
        if self.feature_cache is None:
            raise ValueError("precompute_media needs a feature cache: call enable_feature_cache(root) first")
        starts = range(0, len(items), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="features", unit="batch")
        seen = 0
        with torch.inference_mode():
            for s in starts:
                batch = self.prepare(items[s:s + batch_size])
                for modality, xs in batch.media.items():
                    if xs and not self._encoder_for(modality).trainable:
                        self.encode_media(modality, xs)
                        seen += len(xs)
        return seen

    def before_training(self, dataset, batch_size: int = 64) -> None:
        """Called by the Trainer before a fresh run's first step: with `standardize_media`, fits each media
        standardizer not fitted yet to its encoder's tokens of the dataset's media of that modality (each file
        once; the image encoder's on images only: video frames share its statistics)."""
        if not self.config.standardize_media:
            return

        def tokens_of(modality: str, paths: list):
            with torch.inference_mode():
                for s in range(0, len(paths), batch_size):
                    batch = self.prepare([{modality: p} for p in paths[s:s + batch_size]])
                    packed, cu = self.encode_media(modality, batch.media[modality])
                    for i in range(cu.shape[0] - 1):
                        yield packed[cu[i]:cu[i + 1]].float().cpu()

        fit_standardizers(self.media_norms, dataset, tokens_of)

    def takes_gradient(self, modality: str) -> bool:
        """Whether the encoder of `modality` trains now (a trainable tower with parameters that require grad).
        One that does not is a fixed feature extractor: a training step runs it once per batch."""
        enc = self._encoder_for(modality)
        return enc.trainable and any(p.requires_grad for p in enc.parameters())

    def encode_frozen_media(self, batch: PreparedBatch, *, keep_media: bool = True,
                            max_media: Optional[int] = None) -> PreparedBatch:
        """Run the encoders that take no gradient over the batch's media, once and without autograd, and keep
        their tokens in `batch.features`: later calls on the batch or on its subsets start from them (GradCache
        embeds chunks twice; the second pass then recomputes none of this). `keep_media=False` drops the
        preprocessed media those tokens came from (their entries become None), so a step holds one of the two.
        `max_media`: encode at most this many media items per call (bounds the encoders' peak memory on a large
        batch). Returns the batch."""
        if max_media is not None and max_media < 1:
            raise ValueError(f"max_media must be >= 1 or None, got {max_media}")
        for modality, xs in batch.media.items():
            if not xs or modality in batch.features or self.takes_gradient(modality):
                continue
            step = max_media or len(xs)
            feats = []
            for start in range(0, len(xs), step):
                with torch.no_grad():
                    tokens, cu = self.encode_media(modality, xs[start:start + step])
                bounds = cu.tolist()
                feats.extend(tokens[bounds[i]:bounds[i + 1]] for i in range(len(bounds) - 1))
            batch.features[modality] = feats
            if not keep_media:
                batch.media[modality] = [None] * len(xs)
        return batch

    def _media_tokens(self, batch: PreparedBatch, modality: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed encoder tokens and cu_seqlens of the batch's media of one modality: the kept frozen features
        when the batch has them, else a run of the encoder."""
        feats = batch.features.get(modality)
        if feats is None:
            return self.encode_media(modality, batch.media[modality])
        return torch.cat(feats, 0), cu_seqlens_from_lengths([f.shape[0] for f in feats], feats[0].device)

    def forward(self, items, instruction: Optional[str] = None, *, diversity: Optional[bool] = None):
        """items (list of str / dict, or a PreparedBatch) -> (embeddings, aux). Embeddings are unnormalised:
        (B, L) for ASWP, (B, D) for eos/mean, (B, V, D) for multi_vector. aux["num_media"]: the media items of the
        call; aux["diversity"]: the diversity loss (Eq. 5-6) over their resampled tokens, computed when
        `diversity` is True, or when it is None and the model is in training mode (its dropout follows the mode)."""
        batch = items if isinstance(items, PreparedBatch) else self.prepare(items, instruction)
        if diversity is None:
            diversity = self.training
        resampled = {}
        for modality in MEDIA_MODALITIES:
            if not batch.media[modality]:
                continue
            tokens, cu = self._media_tokens(batch, modality)
            proj = self._projector_for(modality)
            tokens = tokens.to(next(proj.parameters()).dtype)
            if self.config.standardize_media:
                tokens = self.media_norms["image" if modality == "video" else modality](tokens)
            tokens = proj(tokens)
            resampled[modality] = self.resample_media(modality, tokens, cu)
        aux = {"num_media": batch.num_media}
        if diversity:
            aux["diversity"] = self._diversity(resampled)
        embeds, mask = self.composer.build_inputs(batch.sequences, batch.media_offsets, resampled)
        hidden = self.composer(embeds, mask)
        if not self.config.pool_instruction:
            mask = self.composer.pool_mask(batch.sequences, mask)
        return self.head(hidden, mask), aux

    def _diversity(self, resampled: dict) -> torch.Tensor:
        """The mean diversity loss over the resampled media of a call (zero without media); the keep-mask
        dropout p only in training mode."""
        if not resampled:
            return torch.zeros((), device=self.device)
        p = self.config.diversity_p if self.training else 0.0
        gamma = self.config.diversity_gamma
        parts = [resampled[m] for m in MEDIA_MODALITIES if m in resampled]
        if all(isinstance(x, torch.Tensor) for x in parts):
            return diversity_loss(torch.cat(parts, dim=0), p=p, gamma=gamma)
        # no resampler: every item has its own token count; the mean over items
        return torch.stack([diversity_loss(t.unsqueeze(0), p=p, gamma=gamma) for x in parts for t in x]).mean()

    # -------------------------------------------------------------------------------------------------
    # inference API (sentence-transformers style)
    # -------------------------------------------------------------------------------------------------
    def _length_estimate(self, item) -> int:
        if isinstance(item, str):
            return len(item) // 4 + 1
        n = len(item.get("text") or "") // 4 + 1
        for m in MEDIA_MODALITIES:
            if item.get(m) is not None:
                n += self.config.media_latents * len(item[m]) if isinstance(item[m], (list, tuple)) \
                    else self.config.media_latents
        return n

    @torch.inference_mode()
    def encode(self, items: Sequence, *, instruction: Optional[str] = None, batch_size: int = 32,
               show_progress_bar: bool = False, convert_to_numpy: bool = False, normalize_embeddings: bool = True,
               bf16: bool = False, device=None):
        """Embed items (see composer.parse_item); `instruction` is used for items that carry none."""
        if isinstance(items, (str, dict)):
            raise ValueError("items must be a list of items (strings or dicts), got a single item")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        items = list(items)
        if not items:
            dim = self.embedding_dim
            empty = torch.zeros(0, *dim) if isinstance(dim, tuple) else torch.zeros(0, dim)
            return empty.numpy() if convert_to_numpy else empty
        if device is not None:
            self.to(device)
        order = sorted(range(len(items)), key=lambda i: -self._length_estimate(items[i]))
        was_training = self.training
        self.eval()
        outs = [None] * len(items)
        dev = self.device
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        starts = range(0, len(items), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        try:
            with autocast:
                for s in starts:
                    idx = order[s:s + batch_size]
                    emb, _ = self(self.prepare([items[i] for i in idx], instruction, positions=idx))
                    emb = emb.float()
                    if normalize_embeddings:
                        emb = F.normalize(emb, dim=-1)
                    for j, i in enumerate(idx):
                        outs[i] = emb[j].cpu()
        finally:
            self.train(was_training)
        out = torch.stack(outs)
        return out.numpy() if convert_to_numpy else out

    def encode_queries(self, items: Sequence, instruction: Optional[str] = None, **kwargs):
        """Queries: wrapped in the Eq. 1 template with `instruction` (or the item's own 'instruction')."""
        return self.encode(items, instruction=instruction, **kwargs)

    def encode_corpus(self, items: Sequence, **kwargs):
        """Candidates: no instruction is added."""
        if "instruction" in kwargs:
            raise ValueError("instruction: candidates carry no instruction (use encode_queries)")
        return self.encode(items, instruction=None, **kwargs)

    @property
    def embedding_dim(self):
        c = self.config
        if c.pooling == "aswp":
            return c.num_slices
        if c.pooling == "multi_vector":
            return (c.multi_vectors, self.composer.hidden_size)
        return self.composer.hidden_size

    @staticmethod
    def similarity(q, c) -> torch.Tensor:
        """Cosine scores (Q, C) between normalised embeddings: inner products for (n, E) vectors, late
        interaction (mean over query vectors of the best candidate vector) for multi-vector (n, V, D)."""
        q = torch.as_tensor(q)
        c = torch.as_tensor(c)
        if q.dim() == 3:
            return late_interaction_scores(q, c)
        return q @ c.t()

    # -------------------------------------------------------------------------------------------------
    # save / load
    # -------------------------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """config JSON + the trainable weights (safetensors). Frozen backbones are referenced by their config
        path; frozen backbones without a path (random, built from `arch`) are saved too, so the load is exact."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        trainable, random_frozen = {}, {}
        random_prefixes = self._random_backbone_prefixes()
        for name, t in state.items():
            t = t.detach().to("cpu").contiguous()
            if not self.is_frozen_name(name):
                trainable[name] = t
            elif any(name.startswith(p) for p in random_prefixes):
                random_frozen[name] = t
        with atomic_path(path / WEIGHTS_FILE) as tmp:  # each file atomic (omniret.files)
            save_file(_dedupe(trainable), str(tmp))
        if random_frozen:
            with atomic_path(path / RANDOM_BACKBONES_FILE) as tmp:
                save_file(_dedupe(random_frozen), str(tmp))
        elif (path / RANDOM_BACKBONES_FILE).exists():
            (path / RANDOM_BACKBONES_FILE).unlink()
        meta = {"format": "omniret", "version": 1, "config": self.config.to_dict(),
                "frozen_backbones": self._backbone_manifest()}
        atomic_write_json(path / CONFIG_FILE, meta, indent=2, sort_keys=True)

    def _random_backbone_prefixes(self) -> list:
        out = [f"encoders.{n}." for n, e in self.encoders.items()
               if not e.trainable and e.backbone_config.path is None]
        if self.config.llm.path is None:
            out.append("composer.llm.")
        return out

    def _backbone_manifest(self) -> dict:
        c = self.config
        out = {}
        for role, bb in (("image_encoder", c.image_encoder), ("audio_encoder", c.audio_encoder), ("llm", c.llm)):
            if bb is not None and not bb.trainable:
                out[role] = {"kind": bb.kind, "path": bb.path, "hub_id": bb.hub_id,
                             "saved_here": bb.path is None}
        return out

    @classmethod
    def from_pretrained(cls, path, **config_overrides) -> "OmniRet":
        """Load a directory written by save_pretrained. Frozen backbones load from their configured paths
        (override them, e.g. `llm=...`, with config_overrides); a missing one raises FileNotFoundError naming
        the path and how to get it."""
        path = Path(path)
        f = path / CONFIG_FILE
        if not f.is_file():
            raise FileNotFoundError(f"path: no {CONFIG_FILE} in {str(path)!r} (not an OmniRet save_pretrained dir)")
        meta = json.loads(f.read_text())
        config = OmniRetConfig.from_dict(meta["config"])
        if config_overrides:
            config = config.replace(**config_overrides)
        model = cls(config)
        state = load_safetensors(path / WEIGHTS_FILE)
        if (path / RANDOM_BACKBONES_FILE).is_file():
            state.update(load_safetensors(path / RANDOM_BACKBONES_FILE))
        # keys are matched by load_state_dict itself, so its hooks apply (names of earlier versions, e.g. the
        # hidden-state resampler's, load under today's names); a mismatch discards the model
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not model.is_frozen_name(k)]
        unexpected = list(result.unexpected_keys)
        if missing or unexpected:
            raise ValueError(f"path: weights in {str(path)!r} do not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model


def _dedupe(state: dict) -> dict:
    """safetensors refuses shared storage: copy tensors that alias another one."""
    seen, out = set(), {}
    for k, t in state.items():
        ptr = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        out[k] = t.clone() if ptr in seen else t
        seen.add(ptr)
    return out

"""A CLIP-style dual encoder on frozen features: what a user would build instead of OmniRet (issue 20, item 4).

Every part of an item is embedded on its own and projected into one shared space:
- text: the frozen all-MiniLM-L6-v2 sentence embedding (omniret.baselines.frozen_inputs.SentenceEmbeddings,
  memoised per string);
- image / audio: the frozen encoder's tokens (EfficientNet-Lite0 (49, 1280), Whisper tiny.en (T, 384)),
  mean-pooled, from an injected `media_features(modality, paths)` (default: the on-disk feature cache);
- one projection head per modality (a 2-layer MLP with GELU, or linear), after a LayerNorm by default, then
  L2-normalised.
A composed item (e.g. image + text, audio + text) is the sum of its parts' unit projections, renormalised: UniIR's
score-level fusion (CLIP_SF, the fusion the OmniRet paper's baselines use, "features fused as UniIR"). With
`fusion="transformer"` its parts instead go through a small transformer (UniIR's feature-level fusion, CLIP_FF, in
miniature) whose output projections start at zero, so it starts as the sum and may learn any other weighting;
single-part items are their part's unit projection either way. Instructions are ignored: a CLIP-style model has no
instruction input, and its queries and candidates share one encoder. Trained with symmetric InfoNCE through
omniret.train.Trainer (`dual_encoder_train_config`), evaluated through omniret.eval.evaluate with
`encode_queries` / `encode_corpus`.

    torch.manual_seed(seed)  # (or DualEncoder(..., seed=seed)): the heads start random
    model = DualEncoder(DualEncoderConfig(), media_features=lookup)
    Trainer(model, dual_encoder_train_config(steps=1000, batch_size=64, seed=seed, output_dir=run)).fit(data)
    model.save_pretrained(run / "model")

Items are dicts with any of "text" (str), "image" / "audio" (a file path or a list of them), "instruction"
(ignored), or plain strings (text). Pooled media features are memoised per (modality, path) on the model: the
features are frozen, so each file is looked up once per model.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from omniret.baselines.frozen_inputs import (MINILM_DIM, MINILM_MAX_TOKENS, MINILM_PATH, CachedMediaFeatures,
                                             MediaFeatures, shared_sentence_embeddings)
from omniret.data.frozen_features import AUDIO_DIM, IMAGE_DIM
from omniret.errors import check_field_types
from omniret.model.media_norm import MediaStandardizer, fit_standardizers
from omniret.files import atomic_path, atomic_write_json, load_safetensors

__all__ = ["DualEncoder", "DualEncoderConfig", "dual_encoder_train_config"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "omniret-dual-encoder"
MODALITIES = ("text", "image", "audio")  # the order parts are embedded in
ITEM_KEYS = MODALITIES + ("instruction",)
HEADS = ("mlp", "linear")
FUSIONS = ("sum", "transformer")


@dataclass
class DualEncoderConfig:
    """`feature_dims`: the frozen feature width per modality (a modality left out gets no head, and items with
    it are refused). `head`: "mlp" (Linear, GELU, dropout, Linear) or "linear". `input_norm`: a LayerNorm on
    the pooled feature before the head (the frozen encoders' scales differ by orders of magnitude)."""

    dim: int = 256
    head: str = "mlp"
    hidden_dim: int = 512
    dropout: float = 0.0
    input_norm: bool = True
    feature_dims: Dict[str, int] = field(
        default_factory=lambda: {"text": MINILM_DIM, "image": IMAGE_DIM, "audio": AUDIO_DIM})
    text_model: str = MINILM_PATH
    max_text_tokens: int = MINILM_MAX_TOKENS
    # the frozen media tokens standardised per channel with statistics of the training media (fitted by
    # `before_training`, which the Trainer calls on a fresh run): the real preset's `standardize_media`
    standardize_media: bool = False
    # how a composed item's parts combine: "sum" (renormalised) or "transformer" (fusion_layers pre-norm layers of
    # fusion_heads heads over the parts' unit projections, mean over the parts, renormalised)
    fusion: str = "sum"
    fusion_layers: int = 2
    fusion_heads: int = 4

    def validate(self) -> "DualEncoderConfig":
        check_field_types(self, "dual_encoder")
        if self.dim < 1 or self.hidden_dim < 1 or self.max_text_tokens < 1:
            raise ValueError(f"dual_encoder: dim, hidden_dim and max_text_tokens must be >= 1, got {self.dim}, "
                             f"{self.hidden_dim}, {self.max_text_tokens}")
        if self.head not in HEADS:
            raise ValueError(f"dual_encoder.head must be one of {HEADS}, got {self.head!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"dual_encoder.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        if self.fusion_layers < 1 or self.fusion_heads < 1 or self.dim % self.fusion_heads:
            raise ValueError(f"dual_encoder: fusion_layers and fusion_heads must be >= 1 with dim divisible by "
                             f"fusion_heads, got {self.fusion_layers}, {self.fusion_heads} (dim {self.dim})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dual_encoder.dropout must be in [0, 1), got {self.dropout}")
        unknown = set(self.feature_dims) - set(MODALITIES)
        if not self.feature_dims or unknown:
            raise ValueError(f"dual_encoder.feature_dims: widths for some of {MODALITIES}, got {self.feature_dims}")
        if any(not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in self.feature_dims.values()):
            raise ValueError(f"dual_encoder.feature_dims: positive integers, got {self.feature_dims}")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DualEncoderConfig":
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"dual_encoder config: unknown keys {sorted(unknown)}")
        return cls(**d).validate()


def _projection_head(cfg: DualEncoderConfig, in_dim: int) -> nn.Sequential:
    layers: List[nn.Module] = [nn.LayerNorm(in_dim)] if cfg.input_norm else []
    if cfg.head == "linear":
        layers.append(nn.Linear(in_dim, cfg.dim))
    else:
        layers += [nn.Linear(in_dim, cfg.hidden_dim), nn.GELU(), nn.Dropout(cfg.dropout),
                   nn.Linear(cfg.hidden_dim, cfg.dim)]
    return nn.Sequential(*layers)


class PartFusion(nn.Module):
    """Composed items' parts (B, P, dim) unit vectors, a key padding mask (B, P) (True: no part there) and their
    modality indices (B, P) -> (B, dim): a modality embedding added, `layers` pre-norm transformer layers, the mean
    over each item's parts. The attention and MLP output projections and the modality embeddings start at zero, so
    an untrained fusion returns the mean of the parts: after renormalising, the sum fusion."""

    def __init__(self, dim: int, layers: int, heads: int):
        super().__init__()
        self.modality = nn.Embedding(len(MODALITIES), dim)
        nn.init.zeros_(self.modality.weight)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for block in self.layers.layers:
            for out in (block.self_attn.out_proj, block.linear2):
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)

    def forward(self, parts: torch.Tensor, padding: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        x = self.layers(parts + self.modality(modality), src_key_padding_mask=padding)
        keep = (~padding).unsqueeze(-1).to(x.dtype)
        return (x * keep).sum(1) / keep.sum(1)


class DualEncoder(nn.Module):
    """See the module docstring. `media_features` and `text_features` (texts -> (N, text width) tensor) replace
    the default frozen inputs (tests pass fakes); `seed` seeds the heads' initialisation without touching the
    global RNG."""

    def __init__(self, config: Optional[DualEncoderConfig] = None, *,
                 media_features: Optional[MediaFeatures] = None, text_features=None, seed: Optional[int] = None):
        super().__init__()
        self.config = (config or DualEncoderConfig()).validate()
        rng = torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext()
        with rng:
            if seed is not None:
                torch.manual_seed(seed)
            self.heads = nn.ModuleDict({m: _projection_head(self.config, self.config.feature_dims[m])
                                        for m in MODALITIES if m in self.config.feature_dims})
            if self.config.fusion == "transformer":
                self.fusion = PartFusion(self.config.dim, self.config.fusion_layers, self.config.fusion_heads)
        if self.config.standardize_media:
            self.media_norms = nn.ModuleDict({m: MediaStandardizer(w, f"{m} features")
                                              for m, w in self.config.feature_dims.items() if m != "text"})
        # plain attributes, not submodules: the frozen inputs are neither trained nor saved
        self._media_features = media_features
        self._text_features = text_features
        self._pooled: Dict[tuple, torch.Tensor] = {}  # (modality, path) -> mean-pooled feature, float32 CPU

    # ------------------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embedding_dim(self) -> int:
        return self.config.dim

    @property
    def text_features(self):
        if self._text_features is None:
            self._text_features = shared_sentence_embeddings(self.config.text_model, self.config.max_text_tokens)
        return self._text_features

    @property
    def media_features(self) -> MediaFeatures:
        if self._media_features is None:
            self._media_features = CachedMediaFeatures()
        return self._media_features

    def setup_stage(self, stage: int) -> list:
        """Every head trains in every stage (there is nothing else to train)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for p in self.parameters():
            p.requires_grad_(True)
        return list(self.parameters())

    # ------------------------------------------------------------------------------------------------------
    def _parts(self, item, index: int) -> List[tuple]:
        """An item -> its (modality, value) parts: the text (if non-empty) and each media path."""
        name = f"items[{index}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            raise ValueError(f"{name} must be a string or a dict with text/image/audio, got {type(item).__name__}")
        if "video" in item:
            raise ValueError(f"{name} has a video: the dual-encoder baseline has no frozen video features")
        unknown = [k for k in item if k not in ITEM_KEYS]
        if unknown:
            raise ValueError(f"{name} has unknown keys {unknown}; allowed: {list(ITEM_KEYS)}")
        parts = []
        text = item.get("text")
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{name}['text'] must be a string, got {type(text).__name__}")
        if text:
            parts.append(("text", text))
        for m in MODALITIES[1:]:
            value = item.get(m)
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if v is None:
                    continue
                if not isinstance(v, (str, os.PathLike)):
                    raise ValueError(f"{name}[{m!r}] must be a file path (the baseline reads frozen features by "
                                     f"path), got {type(v).__name__}")
                parts.append((m, os.fspath(v)))
        if not parts:
            raise ValueError(f"{name} has no text, image or audio to embed: {sorted(item)}")
        for m, _ in parts:
            if m not in self.heads:
                raise ValueError(f"{name} has {m}, but this model has no {m} head (feature_dims: "
                                 f"{sorted(self.config.feature_dims)})")
        return parts

    def _pooled_media(self, modality: str, paths: List[str]) -> torch.Tensor:
        """(N, width) mean-pooled frozen tokens of the files, from the memo or one call of media_features."""
        missing = list(dict.fromkeys(p for p in paths if (modality, p) not in self._pooled))
        if missing:
            feats = self.media_features(modality, missing)
            if len(feats) != len(missing):
                raise ValueError(f"media_features({modality!r}) returned {len(feats)} feature arrays for "
                                 f"{len(missing)} paths")
            width = self.config.feature_dims[modality]
            pooled = {}
            for path, f in zip(missing, feats):
                f = torch.as_tensor(f)
                if f.dim() != 2 or f.shape[0] == 0 or f.shape[1] != width:
                    raise ValueError(f"{modality} features of {path}: expected (tokens >= 1, {width}), "
                                     f"got {tuple(f.shape)}")
                f = f.float()
                if not bool(torch.isfinite(f).all()):
                    raise ValueError(f"{modality} features of {path} contain NaN or Inf")
                pooled[(modality, path)] = f.mean(0)
            self._pooled.update(pooled)  # only once every file of the call is good
        return torch.stack([self._pooled[(modality, p)] for p in paths])

    def before_training(self, dataset) -> None:
        """With `standardize_media`: fits each media standardizer not fitted yet to the frozen tokens of the
        dataset's media of its modality (each file once). The Trainer calls it before a fresh run."""
        if self.config.standardize_media:
            fit_standardizers(self.media_norms, dataset,
                              lambda m, paths: (torch.as_tensor(f) for f in self.media_features(m, paths)))

    def _frozen(self, modality: str, values: List[str]) -> torch.Tensor:
        if modality != "text":
            pooled = self._pooled_media(modality, values)
            # pooling is linear: the pooled standardised tokens are the standardised pooled feature
            return self.media_norms[modality](pooled) if self.config.standardize_media else pooled
        feats = torch.as_tensor(self.text_features(values))
        width = self.config.feature_dims["text"]
        if feats.shape != (len(values), width):
            raise ValueError(f"text features: expected ({len(values)}, {width}), got {tuple(feats.shape)}")
        if not bool(torch.isfinite(feats).all()):
            raise ValueError("text features contain NaN or Inf")
        return feats

    def forward(self, items: Sequence):
        """items (strings or dicts) -> (unit embeddings (B, dim), {"num_media": n}): each part through its
        modality's head, unit-normalised; an item's parts summed and renormalised."""
        if isinstance(items, (str, dict)):
            raise ValueError("items must be a list of items (strings or dicts), got a single item")
        if len(items) == 0:
            raise ValueError("items: empty batch")
        rows: Dict[str, List[int]] = {m: [] for m in MODALITIES}
        values: Dict[str, List[str]] = {m: [] for m in MODALITIES}
        for b, item in enumerate(items):
            for m, v in self._parts(item, b):
                rows[m].append(b)
                values[m].append(v)
        weight = next(self.parameters())
        parts = {}  # modality -> its parts' unit projections, in item order
        for m in MODALITIES:
            if values[m]:
                feats = self._frozen(m, values[m]).to(device=weight.device, dtype=weight.dtype)
                parts[m] = F.normalize(self.heads[m](feats), dim=-1)
        fused = torch.zeros(len(items), self.config.dim, dtype=weight.dtype, device=weight.device)
        for m, part in parts.items():
            fused = fused.index_add(0, torch.tensor(rows[m], device=weight.device), part)
        if self.config.fusion == "transformer":
            fused = self._fuse_composed(fused, parts, rows)
        n_media = len(values["image"]) + len(values["audio"])
        return F.normalize(fused, dim=-1), {"num_media": n_media}

    def _fuse_composed(self, summed: torch.Tensor, parts: Dict[str, torch.Tensor],
                       rows: Dict[str, List[int]]) -> torch.Tensor:
        """`summed` with the rows of items of two or more parts replaced by `self.fusion` of their parts."""
        owned: Dict[int, list] = {}  # item -> [(modality index, part vector)] in modality order
        for mi, m in enumerate(MODALITIES):
            for j, b in enumerate(rows[m]):
                owned.setdefault(b, []).append((mi, parts[m][j]))
        composed = [b for b, ps in owned.items() if len(ps) > 1]
        if not composed:
            return summed
        pad = nn.utils.rnn.pad_sequence
        tokens = pad([torch.stack([vec for _, vec in owned[b]]) for b in composed], batch_first=True)
        modality = pad([torch.tensor([mi for mi, _ in owned[b]], device=summed.device) for b in composed],
                       batch_first=True)
        lengths = torch.tensor([len(owned[b]) for b in composed], device=summed.device)
        padding = torch.arange(tokens.shape[1], device=summed.device)[None, :] >= lengths[:, None]
        index = torch.tensor(composed, device=summed.device)
        return summed.index_copy(0, index, self.fusion(tokens, padding, modality))

    # ------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, items: Sequence, *, batch_size: int = 256, show_progress_bar: bool = False,
               convert_to_numpy: bool = False, normalize_embeddings: bool = True, device=None, **ignored):
        """Embed items in eval mode -> (N, dim) float32 CPU tensor (or array) of unit vectors (the fusion
        normalises, so `normalize_embeddings` changes nothing). Other keyword arguments of OmniRet.encode (bf16,
        instruction) are accepted and ignored."""
        if isinstance(items, (str, dict)):
            raise ValueError("items must be a list of items (strings or dicts), got a single item")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if device is not None:
            self.to(device)
        items = list(items)
        starts = range(0, len(items), batch_size)
        if show_progress_bar:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="encode", unit="batch")
        was_training = self.training
        self.eval()
        try:
            outs = [self(items[s:s + batch_size])[0].float().cpu() for s in starts]
        finally:
            self.train(was_training)
        out = torch.cat(outs) if outs else torch.zeros(0, self.config.dim)
        return out.numpy() if convert_to_numpy else out

    def encode_queries(self, items: Sequence, instruction: Optional[str] = None, **kwargs):
        """Queries: `instruction` (and items' own) are ignored, as a CLIP-style model has no instruction input."""
        return self.encode(items, **kwargs)

    def encode_corpus(self, items: Sequence, **kwargs):
        if "instruction" in kwargs:
            raise ValueError("instruction: candidates carry no instruction (use encode_queries)")
        return self.encode(items, **kwargs)

    @staticmethod
    def similarity(q, c) -> torch.Tensor:
        return torch.as_tensor(q) @ torch.as_tensor(c).t()

    # ------------------------------------------------------------------------------------------------------
    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors (the heads), each written atomically."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(path / WEIGHTS_FILE) as tmp:
            save_file(state, str(tmp))
        atomic_write_json(path / CONFIG_FILE, {"format": FORMAT, "version": 1, "config": self.config.to_dict()},
                          indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, path, *, media_features: Optional[MediaFeatures] = None,
                        text_features=None) -> "DualEncoder":
        path = Path(path)
        f = path / CONFIG_FILE
        if not f.is_file():
            raise FileNotFoundError(f"path: no {CONFIG_FILE} in {str(path)!r} (not a DualEncoder save_pretrained dir)")
        try:
            meta = json.loads(f.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{f}: not valid JSON ({exc.msg})") from None
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != FORMAT or "config" not in meta:
            raise ValueError(f"{f}: not a DualEncoder config (format {found!r}, expected {FORMAT!r})")
        model = cls(DualEncoderConfig.from_dict(meta["config"]), media_features=media_features,
                    text_features=text_features)
        result = model.load_state_dict(load_safetensors(path / WEIGHTS_FILE), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(f"{path}: weights do not match the config: missing {result.missing_keys[:5]}, "
                             f"unexpected {result.unexpected_keys[:5]}")
        return model


def dual_encoder_train_config(steps: int, *, batch_size: int = 64, task_counts: Optional[Dict[str, int]] = None,
                              tasks_per_batch: Optional[int] = None, lr: float = 1e-3, seed: int = 0,
                              output_dir: Optional[str] = None, tau: float = 0.07, learnable_temperature: bool = True,
                              warmup_steps: Optional[int] = None, **overrides):
    """The TrainConfig of the CLIP-style baseline: one contrastive stage of `steps` optimizer steps, symmetric
    InfoNCE with plain (beta = 0) negatives, no triplet (mu1 = 0) and no diversity term (mu2 = 0), CLIP's
    learnable temperature starting at `tau`, AdamW at `lr` (heads trained from scratch) with a linear warm-up
    over `warmup_steps` (default: 5% of the steps) and cosine decay. Batches: `task_counts` ({task: examples})
    fixes every batch's mix, else `batch_size` examples from `tasks_per_batch` tasks (TrainConfig's default).
    The whole micro-batch is one GradCache chunk and no forward is replayed (the heads are small). Any other
    TrainConfig field may be given in `overrides` (e.g. negatives="modality", device="cuda", progress_bar=False)."""
    from omniret.train.trainer import StageConfig, TrainConfig

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    micro = sum(task_counts.values()) if task_counts else batch_size
    stage = StageConfig(stage=1, steps=int(steps), batch_size=int(batch_size), task_counts=task_counts,
                        tasks_per_batch=tasks_per_batch, name="dual_encoder")
    settings = dict(stages=[stage], lr=float(lr), seed=int(seed), output_dir=output_dir, tau=float(tau),
                    learnable_temperature=learnable_temperature, symmetric=True, beta=0.0, mu1=0.0, mu2=0.0,
                    warmup_steps=int(warmup_steps) if warmup_steps is not None else max(1, steps // 20),
                    chunk_size=max(1, micro), keep_graphs=2)
    settings.update(overrides)
    return TrainConfig(**settings).validate()

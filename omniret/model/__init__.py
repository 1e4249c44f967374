"""The OmniRet model (section 3.2 of the paper): encoders, projectors, shared media resampler, LLM composer with
LoRA, pooling heads, and the sentence-transformers style encode API."""
from omniret.config import OmniRetConfig, preset
from omniret.model.omniret import OmniRet, PreparedBatch

__all__ = ["OmniRet", "PreparedBatch", "OmniRetConfig", "preset"]

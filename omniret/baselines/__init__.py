"""Baselines trained and evaluated through the same paths as OmniRet (omniret.train.Trainer,
omniret.eval.evaluate): a CLIP-style dual encoder on the same frozen features."""
from omniret.baselines.dual_encoder import DualEncoder, DualEncoderConfig, dual_encoder_train_config
from omniret.baselines.frozen_inputs import CachedMediaFeatures, SentenceEmbeddings, shared_sentence_embeddings

__all__ = ["DualEncoder", "DualEncoderConfig", "dual_encoder_train_config", "SentenceEmbeddings",
           "shared_sentence_embeddings", "CachedMediaFeatures"]

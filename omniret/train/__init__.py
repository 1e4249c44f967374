"""Training: gradient caching, task-balanced sampling, the trainer (one step loop, an objective per stage) and
checkpoints."""
from omniret.train.checkpoint import CheckpointManager
from omniret.train.grad_cache import GradCache, full_batch_loss
from omniret.train.sampler import TaskBalancedSampler
from omniret.train.config import StageConfig, TrainConfig
from omniret.train.trainer import Trainer, TrainResult

__all__ = ["GradCache", "full_batch_loss", "TaskBalancedSampler", "Trainer", "TrainConfig", "StageConfig",
           "TrainResult", "CheckpointManager"]

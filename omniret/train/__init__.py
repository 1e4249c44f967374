"""Training: gradient caching, task-balanced sampling, the two-stage trainer and checkpoints."""
from omniret.train.grad_cache import GradCache, full_batch_loss

__all__ = ["GradCache", "full_batch_loss"]

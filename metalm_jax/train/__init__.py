"""Training: train state, pure jitted steps, checkpoints, metrics, `train_and_evaluate`."""
from metalm_jax.train.trainer import NonFiniteLossError, train_and_evaluate

__all__ = ["NonFiniteLossError", "train_and_evaluate"]

"""metalm_jax.inference: generation over KV caches."""
from metalm_jax.inference.generate import generate, sample_logits

__all__ = ['generate', 'sample_logits']

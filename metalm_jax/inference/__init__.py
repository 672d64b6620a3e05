"""metalm_jax.inference: generation over KV caches (greedy, sampling, beam search), PPLM."""
from metalm_jax.inference.beam_search import BeamSearchOutput, beam_search
from metalm_jax.inference.generate import generate, sample_logits

__all__ = ['BeamSearchOutput', 'beam_search', 'generate', 'sample_logits']

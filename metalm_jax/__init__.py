"""metalm_jax: general-purpose-interface multimodal language models in JAX / Flax NNX.

Sharding is done by this package (logical axis names -> mesh axes, see
`metalm_jax.sharding`), never eagerly by Flax at variable creation, so Flax's eager
sharding is switched off on import.
"""
import flax

flax.config.update("flax_always_shard_variable", False)

__version__ = "0.1.0"

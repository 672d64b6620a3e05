"""metalm_jax.models."""

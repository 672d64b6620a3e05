"""metalm_jax.train."""

"""metalm_jax.data."""

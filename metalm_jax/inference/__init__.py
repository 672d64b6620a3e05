"""metalm_jax.inference."""

"""metalm_jax.objectives."""

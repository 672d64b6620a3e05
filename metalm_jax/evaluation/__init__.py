"""metalm_jax.evaluation."""

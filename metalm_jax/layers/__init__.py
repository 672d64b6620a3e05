"""metalm_jax.layers."""

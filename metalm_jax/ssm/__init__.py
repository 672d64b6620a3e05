"""metalm_jax.ssm."""

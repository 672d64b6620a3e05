"""metalm_jax.ssm: selective state-space (Mamba) scans and the Mamba block."""
from metalm_jax.ssm.mamba import MambaBlock
from metalm_jax.ssm.scan import METHODS, resolve_method, selective_scan, selective_scan_reference

__all__ = ["METHODS", "MambaBlock", "resolve_method", "selective_scan",
           "selective_scan_reference"]

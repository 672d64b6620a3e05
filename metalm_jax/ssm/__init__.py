"""metalm_jax.ssm: selective state-space scans (Mamba-1's S6, Mamba-2's SSD) and their blocks."""
from metalm_jax.ssm.mamba import MambaBlock
from metalm_jax.ssm.scan import METHODS, resolve_method, selective_scan, selective_scan_reference
from metalm_jax.ssm.ssd import ssd_chunked, ssd_reference, ssd_step

__all__ = ["METHODS", "MambaBlock", "resolve_method", "selective_scan",
           "selective_scan_reference", "ssd_chunked", "ssd_reference", "ssd_step"]

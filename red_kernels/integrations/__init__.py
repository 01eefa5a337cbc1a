"""Adapters that put red_kernels into other training libraries (TRL)."""

"""red: a thin trainer for RED (Recall-Extend Dynamics) built on red_kernels."""

__version__ = "0.1.0"

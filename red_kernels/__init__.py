"""red-kernels: fused log-prob / entropy / RED policy loss straight from hidden states and the lm_head weight.

CUDA tensors run Triton kernels, CPU tensors an exact chunked PyTorch path; neither materialises the
[tokens × vocab] logits.
"""
from .logprobs import linear_logprobs

__all__ = ["linear_logprobs"]
__version__ = "0.1.0"

"""red-kernels: fused log-prob / entropy / RED policy loss straight from hidden states and the lm_head weight.

CUDA tensors run Triton kernels, CPU tensors an exact chunked PyTorch path; neither materialises the
[tokens × vocab] logits.
"""

from .logprobs import linear_logprobs
from .policy_loss import REDLossConfig
from .red_loss import FusedLinearREDLoss, REDLossOutput, red_loss

__all__ = ["linear_logprobs", "red_loss", "FusedLinearREDLoss", "REDLossConfig", "REDLossOutput"]
__version__ = "0.1.0"

# TRITON_INTERPRET is read when @triton.jit decorates a kernel: set it before red_kernels.triton_ops is imported,
# so that the Triton kernels run on CPU in Triton's interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

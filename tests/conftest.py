# TRITON_INTERPRET is read when @triton.jit decorates a kernel: set it before red_kernels.triton_ops is imported,
# so that the Triton kernels run on CPU in Triton's interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_model(seed: int):
    """(model, tokenizer): the smallest synthetic Qwen2 + in-process BPE tokenizer, for fast trainer tests."""
    from red import synthetic
    tok = synthetic.build_tokenizer()
    model = synthetic.build_model(tok, {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                        "num_attention_heads": 2, "num_key_value_heads": 1}, seed=seed)
    return model, tok

# TRITON_INTERPRET is read when @triton.jit decorates a kernel: set it before red_kernels.triton_ops is imported,
# so that the Triton kernels run on CPU in Triton's interpreter.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_model(seed: int):
    """(model, tokenizer): the smallest synthetic Qwen2 + in-process BPE tokenizer, for fast trainer tests."""
    from red import synthetic

    tok = synthetic.build_tokenizer()
    model = synthetic.build_model(
        tok,
        {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
        },
        seed=seed,
    )
    return model, tok


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` need a GPU: they run under RED_KERNELS_TEST_DEVICE=cuda and are deselected (not
    skipped) everywhere else."""
    if os.environ.get("RED_KERNELS_TEST_DEVICE") == "cuda":
        return
    gpu = [item for item in items if item.get_closest_marker("cuda")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]

"""red.train's start-of-run line naming the two distributions its importance ratios compare."""

from types import SimpleNamespace

from red.train import ratio_distributions


def test_full_softmax_sampling_is_said_to_match():
    line = ratio_distributions(SimpleNamespace(top_p=1.0, temperature=0.7))
    assert "sampler's full softmax with the trainer's full softmax" in line and "0.7" in line
    assert "biased" not in line


def test_top_p_sampling_is_said_to_differ():
    line = ratio_distributions(SimpleNamespace(top_p=0.9, temperature=1.0))
    assert "top-p=0.9 truncated, renormalised softmax with the trainer's full softmax" in line
    assert "not the same distribution" in line

"""Benchmarks of red_kernels against naive PyTorch, TRL and Liger-Kernel.

cases.py (what is measured, FLOP counts) · impls.py (the implementations) · measure.py (time and peak memory) ·
record.py (results JSON) · report.py (markdown table and chart) · gpu_bench.py (plain-Python GPU runner) ·
trl_step.py (a few GRPO steps of TRL's trainer, by phase).
"""

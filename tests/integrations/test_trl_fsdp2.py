"""REDKernelsGRPOTrainer under accelerate FSDP2 on 2 CPU processes (gloo) against stock trl.GRPOTrainer.

`accelerate launch` with a config file written here runs trl_fsdp2_worker.py: each rank trains stock TRL, then the
subclass, one optimizer step (two micro-steps from one generation, reference model, SGD) from the same saved model
and fixed per-rank rollouts, with the head sharded as a DTensor (so the adapter's `full_tensor()` path runs). The
logged loss, the grad norm and every final weight (gathered) must agree; the weights must have moved.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_two_processes_match_stock_trl(tmp_path):
    model, tok = tiny_model(seed=3)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(10.0)  # sharper than a random init, so entropies vary
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    init = {n: p.detach().double() for n, p in model.named_parameters()}
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: FSDP\n"  # launched with torchrun and FSDP2 env (the worker completes the switch)
        "num_machines: 1\n"
        "num_processes: 2\n"
        "machine_rank: 0\n"
        f"main_process_port: {_free_port()}\n"
        "use_cpu: true\n"
        "mixed_precision: 'no'\n"
        "fsdp_config:\n"
        "  fsdp_version: 2\n"
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_transformer_layer_cls_to_wrap: Qwen2DecoderLayer\n"
        "  fsdp_reshard_after_forward: true\n"
        "  fsdp_state_dict_type: FULL_STATE_DICT\n"
        "  fsdp_cpu_ram_efficient_loading: false\n"
    )
    out = tmp_path / "result.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.update(OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    cmd += [os.path.join(HERE, "trl_fsdp2_worker.py"), str(tmp_path / "model"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads(out.read_text())
    stock, red = result["stock"], result["red"]
    assert stock["kernel_calls"] == 0 and red["kernel_calls"] >= 3  # old-policy, reference and policy passes
    assert red["loss"] == pytest.approx(stock["loss"], rel=1e-5)
    assert red["grad_norm"] == pytest.approx(stock["grad_norm"], rel=1e-4)
    assert stock["grad_norm"] > 0
    moved = 0.0
    for name, w in stock["weights"].items():
        w, r = torch.tensor(w, dtype=torch.float64), torch.tensor(red["weights"][name], dtype=torch.float64)
        torch.testing.assert_close(r, w, rtol=1e-4, atol=1e-6 * float(w.abs().max()), msg=name)
        moved = max(moved, float((w - init[name].flatten()).abs().max()))
    assert moved > 1e-3  # the step changed the weights, so equal weights mean equal updates

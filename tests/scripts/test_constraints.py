"""The constraints files agree with the library's declared ranges and with each other."""

import pathlib

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[2]


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            dist, version = line.split("==")
            out[canonicalize_name(dist)] = version
    return out


def declared() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    return {canonicalize_name(r.name): r for r in reqs if not r.name.startswith("red-kernels")}


def test_latest_differs_from_constraints_only_by_transformers_and_what_it_adds():
    base, latest = pins("constraints.txt"), pins("constraints-latest.txt")
    changed = {d for d in base.keys() | latest.keys() if base.get(d) != latest.get(d)}
    assert changed == {"transformers", "kernels", "tomlkit"}
    assert Version(latest["transformers"]) >= Version("5.25")


def test_every_pin_of_a_declared_requirement_lies_in_its_range():
    reqs = declared()
    for name in (
        "constraints.txt",
        "constraints-latest.txt",
        "constraints-gpu.txt",
        "constraints-vllm-cpu.txt",
    ):
        for dist, version in pins(name).items():
            if dist in reqs and (reqs[dist].marker is None or reqs[dist].marker.evaluate()):
                assert reqs[dist].specifier.contains(version, prereleases=True), (name, dist, version)


def test_gpu_constraints_pin_the_stack_vllm_needs():
    from red.rollout.vllm_sync import SUPPORTED_VLLM

    gpu = pins("constraints-gpu.txt")
    assert {"torch", "triton", "vllm", "flash-attn", "transformers"} <= gpu.keys()
    assert Requirement(f"vllm{SUPPORTED_VLLM}").specifier.contains(gpu["vllm"])

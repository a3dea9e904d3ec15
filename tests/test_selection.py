"""Where tests run: the GPU machine's selection and the CPU machine's, collected under both settings.

``GROUPVIT_TEST_DEVICE=cuda|cpu`` makes tests/conftest.py apply its one selection rule as on that machine and list
every collected test as ``selection: run|skip <device|-> <gpu|interpreter|-> <nodeid>`` (collection only; a real run
is refused).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [
    "tests/test_contrastive_loss.py",
    "tests/test_model_backends.py",
    "tests/test_assign_attention.py",
    "tests/test_philox.py",
    "tests/test_segmentation.py",
]
# tests of these files that touch no kernel, or only a CPU path on purpose: they need no `device`
DEVICE_FREE = {
    "test_cpu_tensors_without_interpreter",
    "test_chunked_oracle_matches_reference",
    "test_kernels_compile_for_sm90",
}


def _collect(setting: str) -> dict[str, tuple[str, str, str]]:
    """nodeid -> (run|skip, device|-, marks) as the conftest would decide on a ``setting`` machine."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GROUPVIT_TEST_DEVICE"] = setting
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *FILES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [ln.split(" :: ")[0].split(maxsplit=4) for ln in r.stdout.splitlines() if ln.startswith("selection: ")]
    assert " ".join(lines[0][1:]) == f"setting cuda={setting == 'cuda'} interpreter={setting == 'cpu'}"
    return {node: (verdict, where, marks) for _, verdict, where, marks, node in lines[1:]}


@pytest.mark.slow
def test_gpu_and_cpu_selections_are_complementary():
    gpu, cpu = _collect("cuda"), _collect("cpu")
    assert gpu.keys() == cpu.keys() and len(gpu) > 100
    gpu_marked = {n for n, (_, _, m) in gpu.items() if "gpu" in m.split(",")}
    interp_marked = {n for n, (_, _, m) in gpu.items() if "interpreter" in m.split(",")}
    assert gpu_marked and interp_marked and not gpu_marked & interp_marked
    # GPU machine: the interpreter tests skip, the gpu tests run; CPU machine: the reverse
    assert {n for n, (v, _, _) in gpu.items() if v == "skip"} == interp_marked
    assert {n for n, (v, _, _) in cpu.items() if v == "skip"} == gpu_marked
    assert "tests/test_contrastive_loss.py::test_parity_bf16_upcast_path" in interp_marked
    assert any("test_gpu_parity_large" in n for n in gpu_marked)
    # a test that runs on both machines and calls the kernels takes its tensors from the `device` fixture (CUDA on
    # the GPU machine), so none builds CPU tensors for the compiled kernels
    both = {n for n in gpu if gpu[n][0] == cpu[n][0] == "run"}
    assert len(both) == len(gpu) - len(gpu_marked) - len(interp_marked)
    for n in both:
        if n.startswith(("tests/test_contrastive_loss.py", "tests/test_model_backends.py")):
            name = n.split("::")[1].split("[")[0]
            assert gpu[n][1] == "device" or name in DEVICE_FREE, f"{n} runs on the GPU machine without `device`"
    assert all(gpu[n][1] == "device" for n in both if n.startswith("tests/test_model_backends.py"))


def test_simulated_setting_refuses_a_real_run():
    import torch

    other = "cpu" if torch.cuda.is_available() else "cuda"
    env = {**os.environ, "GROUPVIT_TEST_DEVICE": other}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_selection.py", "-k", "nothing"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "use it with --collect-only" in r.stdout + r.stderr

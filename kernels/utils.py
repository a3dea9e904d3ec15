"""Plumbing shared by the kernels, their reference and their callers: the interpreter flag, the dtypes the kernels
take and compute in, and the one answer to "can the Triton kernels launch on this device?".

Imports torch only (no triton), so the model library, the command lines and the benchmarks can ask before any
kernel module is loaded.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DTYPES", "DTYPE_NAMES", "INTERPRET", "compute_dtype", "interpreter_on", "triton_can_launch"]


def interpreter_on() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set now (the kernels read it once, when their module is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


INTERPRET: bool = interpreter_on()  # at import: the @triton.jit kernels imported with this module share the mode

DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)  # kernel inputs
DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype the kernels and the reference compute in (softmax, accumulators): fp64 when an input is fp64, else
    fp32 (fp16, bf16 and fp32 inputs)."""
    out = torch.float32
    for d in dtypes:
        out = torch.promote_types(out, d)
    return out


def triton_can_launch(device: torch.device | str, interpret: bool | None = None) -> bool:
    """Whether the Triton kernels can run on ``device``: a CUDA device, or the CPU under the Triton interpreter
    (``interpret``; default: ``TRITON_INTERPRET=1`` set now)."""
    dev = torch.device(device)
    return dev.type == "cuda" or (dev.type == "cpu" and (interpreter_on() if interpret is None else interpret))

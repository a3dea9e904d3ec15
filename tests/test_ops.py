"""The ops switch: backend selection at call time, attention implementations, and no silent fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from groupvit import ops
from kernels import reference
from kernels.registry import OPS
from tests.helpers import assert_parity

ROOT = Path(__file__).resolve().parents[1]


def test_backend_selection_is_scoped_and_validated():
    assert ops.get_backend() == "eager"
    with ops.use_backend("triton"):
        assert ops.get_backend() == "triton"
        with pytest.raises(ValueError, match="unknown backend"):
            ops.set_backend("cuda")
        assert ops.get_backend() == "triton"
    assert ops.get_backend() == "eager"
    with pytest.raises(RuntimeError):
        with ops.use_backend("triton"):
            raise RuntimeError("boom")
    assert ops.get_backend() == "eager"


def test_backend_env_var_is_validated():
    env = {**os.environ, "GROUPVIT_BACKEND": "fast"}
    r = subprocess.run([sys.executable, "-c", "import groupvit"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and "unknown GROUPVIT_BACKEND 'fast'" in r.stderr


@pytest.mark.parametrize("case", OPS["attention"].select("smoke"), ids=lambda c: c.name)
@pytest.mark.parametrize("impl", ["sdpa", "auto"])
def test_attention_fast_paths_match_reference(case, impl):
    spec = OPS["attention"]
    (q, k, v), kw = spec.make_inputs(case, torch.float32, torch.device("cpu"), 0)
    ref64 = reference.attention(q.double(), k.double(), v.double(), **kw)
    with ops.use_attention(impl):
        out = ops.attention(q, k, v, **kw)
    assert_parity(out, reference.attention(q, k, v, **kw), ref64)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_attention_passes_scale_through(impl):
    """``scale`` reaches the implementation: 0.37 is neither the default Dh ** -0.5 (0.25) nor 1."""
    (q, k, v), _ = OPS["attention"].make_inputs(
        OPS["attention"].case("cross-odd"), torch.float64, torch.device("cpu"), 0
    )
    with ops.use_attention(impl):
        out = ops.attention(q, k, v, scale=0.37)
    want = torch.softmax(0.37 * q @ k.transpose(-1, -2), dim=-1) @ v
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_assign_attention_passes_scale_through():
    (q, k, v), kw = OPS["assign_attention"].make_inputs(
        OPS["assign_attention"].case("g16-n37-c24-soft"), torch.float64, torch.device("cpu"), 0
    )
    out = ops.assign_attention(q, k, v, scale=0.37, **kw)
    torch.testing.assert_close(out, reference.assign_attention(q, k, v, scale=0.37, **kw), rtol=0, atol=0)
    assert not torch.allclose(out, reference.assign_attention(q, k, v, **kw))
    soft, _ = ops.assignment_maps(q, k, scale=0.37, hard=False)
    torch.testing.assert_close(soft, torch.softmax(0.37 * q @ k.transpose(-1, -2), dim=1), rtol=1e-10, atol=1e-10)


def test_xformers_request_without_cuda_raises():
    q = torch.randn(1, 2, 5, 8)
    with ops.use_attention("xformers"), pytest.raises(RuntimeError, match="xformers.*not usable"):
        ops.attention(q, q, q)


def test_triton_backend_never_falls_back_to_eager():
    """Without a GPU and without the interpreter, the triton backend must refuse CPU tensors, naming the op."""
    code = textwrap.dedent("""
        import torch
        from groupvit import ops
        q = torch.randn(2, 8, 16); k = torch.randn(2, 13, 16)
        with ops.use_backend("triton"):
            ops.assign_attention(q, k, k)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if torch.cuda.is_available():
        pytest.skip("the refusal concerns CPU tensors on a machine without the interpreter")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "assign_attention" in r.stderr and "(2, 8, 16)" in r.stderr, r.stderr[-2000:]

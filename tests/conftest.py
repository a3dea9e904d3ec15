"""Test configuration: where each test runs (CPU interpreter or CUDA), seeds, markers, shared-data paths.

Selection (one rule, here): tests marked ``gpu`` run only with CUDA present and the Triton interpreter off; tests
marked ``interpreter`` (kernels on CPU tensors under ``TRITON_INTERPRET=1``) run only with the interpreter on, which
is the default without CUDA; everything else runs on both, kernel tests on the ``device`` fixture (CPU under the
interpreter, else CUDA). ``GROUPVIT_TEST_DEVICE=cuda|cpu`` simulates either machine for ``pytest --collect-only``
(refused otherwise) and lists every test as ``selection: run|skip ...`` (tests/test_selection.py checks both sets).
"""

import os
from pathlib import Path

import torch

SIMULATE = os.environ.get("GROUPVIT_TEST_DEVICE", "")  # "", "cuda" or "cpu"
if SIMULATE not in ("", "cuda", "cpu"):
    raise SystemExit(f"GROUPVIT_TEST_DEVICE={SIMULATE!r}: use 'cuda' or 'cpu' (or leave it unset)")
HAS_CUDA = torch.cuda.is_available() if not SIMULATE else SIMULATE == "cuda"
if not HAS_CUDA:  # must happen before any @triton.jit decorator runs
    os.environ.setdefault("TRITON_INTERPRET", "1")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

import pytest  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_DATA = SHARED / "data"
if (SHARED_DATA / "nltk_data").is_dir():  # the offline POS tagger for noun-prompt tests
    os.environ.setdefault("NLTK_DATA", str(SHARED_DATA / "nltk_data"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs CUDA with the Triton interpreter off (skipped otherwise)")
    config.addinivalue_line(
        "markers",
        "interpreter: runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1 "
        "(skipped where the interpreter is off, e.g. on a GPU machine)",
    )
    config.addinivalue_line("markers", "slow: slower CPU test (still run in CI)")
    if SIMULATE and SIMULATE != ("cuda" if torch.cuda.is_available() else "cpu") and not config.option.collectonly:
        raise pytest.UsageError(
            f"GROUPVIT_TEST_DEVICE={SIMULATE} simulates another machine's test selection: "
            "use it with --collect-only, or unset it to run the tests here"
        )


def skip_reason(item: pytest.Item) -> str | None:
    """Why ``item`` does not run in this setting (None: it runs)."""
    if item.get_closest_marker("gpu") and not (HAS_CUDA and not INTERPRET):
        return "needs a CUDA GPU with the Triton interpreter off (real kernel compilation)"
    if item.get_closest_marker("interpreter") and not INTERPRET:
        return (
            "CPU-interpreter test (TRITON_INTERPRET=1); the interpreter is off here, "
            "the GPU tests (-m gpu) cover the compiled kernels"
        )
    return None


def pytest_collection_modifyitems(config, items):
    for item in items:
        reason = skip_reason(item)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_collectionfinish(config, start_path, items):
    if not SIMULATE:
        return []
    lines = [f"selection: setting cuda={HAS_CUDA} interpreter={INTERPRET}"]
    for item in items:
        reason = skip_reason(item)
        where = "device" if "device" in getattr(item, "fixturenames", ()) else "-"
        marks = ",".join(m for m in ("gpu", "interpreter") if item.get_closest_marker(m)) or "-"
        lines.append(
            f"selection: {'skip' if reason else 'run'} {where} {marks} {item.nodeid}"
            + (f" :: {reason}" if reason else "")
        )
    return lines


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests put their tensors: CPU under the Triton interpreter, else CUDA."""
    if INTERPRET:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("the Triton kernels need a CUDA GPU or TRITON_INTERPRET=1 (CPU interpreter)")
    return torch.device("cuda")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout (CI has it; a user's checkout may not)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared test data not found at {SHARED_DATA} (only present in the project's CI layout)")
    return SHARED_DATA

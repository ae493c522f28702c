"""The cuda backend's kernels build for a real GPU, checked on a machine without one.

The simulator runs the kernels as Python and checks no types: here every kernel is
compiled to PTX for sm_90 (Hopper) in both compute dtypes, assembled with ptxas through
nvJitLink (`refattn.backends._cuda_build`), in a process without the simulator. Needs
numba-cuda with NVVM and nvJitLink (``numba-cuda[cu13]``, in the test extra); no GPU.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda not installed")

ATTENTION = ("forward", "dq", "dkdv")
ELEMENTWISE = ("cast4", "cast3", "first_bad4", "first_bad3", "first_bad_lse")


@pytest.fixture(scope="module")
def report():
    code = ("import json; from refattn.backends._cuda_build import report; "
            "print(json.dumps(report((9, 0), 64, 64, elementwise=True)))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "NUMBA_ENABLE_CUDASIM": "0"})
    missing = ("NvvmSupportError", "libNVVM cannot be found", "nvJitLink library not found")
    if any(m in r.stderr for m in missing):
        pytest.skip("NVVM or nvJitLink is not installed (pip install 'numba-cuda[cu13]')")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_every_kernel_assembles_for_sm90(report):
    assert {(row["dtype"], row["kernel"]) for row in report} == {
        (dt, name) for dt in ("float32", "float64") for name in ATTENTION + ELEMENTWISE}
    for row in report:
        # ptxas fits every kernel in the register file and in the shared memory a block may
        # use statically (48 KiB, plus the 1 KiB sm_90 reserves per block)
        assert 0 < row["registers"] <= 255 and row["shared"] <= 48 * 1024 + 1024, row


def test_float32_kernels_do_no_float64_arithmetic(report):
    """A float32 value promoted by an int or a constant would make a float32 kernel compute
    in float64 (a factor 64 slower on most GPUs, and not the precision it claims)."""
    f32 = [row for row in report if row["dtype"] == "float32" and row["kernel"] in ATTENTION]
    assert len(f32) == 3 and all(row["f64_instructions"] == 0 for row in f32), f32
    f64 = [row for row in report if row["dtype"] == "float64" and row["kernel"] in ATTENTION]
    assert all(row["f64_instructions"] > 0 for row in f64)      # the count sees float64 when it is there

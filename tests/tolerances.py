"""Tolerances per dtype, in one table: (rtol, atol) for outputs compared with an oracle.

float32 results are compared with a float64 computation on the same float32 input, or with
torch's float32; half types with a float32 or float64 computation on the same half input.
"""

import torch

TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (5e-3, 5e-3),
    torch.bfloat16: (3e-2, 3e-2),
}


def assert_close(actual, expected, dtype=None, scale=1.0, msg=""):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` times ``scale``."""
    dtype = dtype or actual.dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=rtol * scale,
                               atol=atol * scale, msg=msg or None)

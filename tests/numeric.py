"""Assertion helper shared by the numeric tests."""
import torch


def close(a, b, tol=1e-5):
    """Element-wise equality within ``tol`` (absolute and relative), in float32."""
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float32),
                               torch.as_tensor(b, dtype=torch.float32), atol=tol, rtol=tol)

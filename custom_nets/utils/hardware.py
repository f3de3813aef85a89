"""What the machine can do, probed once where a choice depends on it."""

from __future__ import annotations

import torch

__all__ = ["cpu_has_native_bf16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX-512 BF16 / AMX) that oneDNN uses.

    Without them bf16 is emulated and slower than fp32, so "auto" precision picks fp32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False

"""Helpers shared by every op folder: argument-check wording and launch-time stride helpers.

One home for each: ops import these instead of keeping their own copies.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor


def describe(t: Tensor) -> str:
    """"shape (...), dtype ..., device ..." for error messages that name what an argument got."""
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, ndim: Sequence[int]) -> None:
    """TypeError unless ``t`` is a Tensor; ValueError (naming ``name`` and what it got) unless its
    rank is one of ``ndim``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndim:
        want = " or ".join(f"{n}-D" for n in ndim)
        raise ValueError(f"{name} must be {want}, got {describe(t)}")


def batch_strides(t: Tensor, shared_dim: int) -> tuple[int, int, int]:
    """(batch, row, column) element strides of a tensor that is either shared by the batch
    (``shared_dim`` dims: batch stride 0, no expand) or per example (one more leading batch dim).

    prefix (Hkv, P, D) / (B, Hkv, P, D) -> (batch, head, position); prompt (P, E) / (B, P, E) ->
    (batch, position, channel)."""
    if t.dim() == shared_dim:
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim has stride 1 (or size <= 1), else a contiguous copy: kernels
    address the last dim with stride 1 and take every other layout as it is."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()

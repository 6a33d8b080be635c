"""Backend selection shared by every op: "auto" | "triton" | "torch" | "reference".

* "triton": the fused Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1).
* "torch": the fast PyTorch path (scaled_dot_product_attention, embedding / cat), any device and
  float dtype, float64 included.
* "reference": the readable PyTorch oracle (explicit concat, expand, mask, softmax), what the
  tests compare the other two against.
* "auto": "triton" for CUDA tensors when triton is installed, "torch" everywhere else.
"""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch", "reference")


# Looked up once, without importing triton (whose import reads TRITON_INTERPRET).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed (it is not on macOS/Windows CPU-only installs)."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn the user's ``backend`` argument into "triton", "torch" or "reference" for tensors on ``device``.

    "auto" picks Triton for CUDA tensors (when triton is installed) and the fast PyTorch path
    otherwise. "triton" on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter).
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package, which is not importable here")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"backend='triton' needs CUDA tensors, got tensors on {device}; set TRITON_INTERPRET=1 "
                "before triton is imported to run the kernels on CPU in Triton's interpreter, "
                "or use backend='torch'"
            )
    return backend

"""Backend selection shared by every op: "auto" | "triton" | "torch"."""

from __future__ import annotations

import importlib.util
import os

import torch

BACKENDS = ("auto", "triton", "torch")


# Looked up once, without importing triton (whose import reads TRITON_INTERPRET).
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """True when triton is installed (it is not on macOS/Windows CPU-only installs)."""
    return _TRITON_INSTALLED


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is on (TRITON_INTERPRET=1, set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turn the user's ``backend`` argument into "triton" or "torch" for tensors on ``device``.

    "auto" picks Triton for CUDA tensors (when triton is installed) and the PyTorch reference
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

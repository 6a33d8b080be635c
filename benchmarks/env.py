"""What this machine has: device, library versions, and whether the Triton backend can run here."""

from __future__ import annotations

import datetime
import importlib
import importlib.util
import os
import platform
import sys
from typing import Optional

import torch

from ptkernels._backend import interpreter_enabled


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
    return torch.device(requested)


def _version(module: str) -> Optional[str]:
    """Installed version without importing the package (transformers and peft take seconds to import)."""
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        try:
            return importlib.import_module(module).__version__
        except Exception:
            return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = os.cpu_count()
    arch = platform.processor() or platform.machine()
    return f"CPU ({arch}, {cores} logical cores, {torch.get_num_threads()} torch threads)"


def environment(device: torch.device) -> dict:
    import ptkernels

    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": device_name(device),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "ptkernels": getattr(ptkernels, "__version__", None),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "triton_interpret": interpreter_enabled(),
        "argv": sys.argv[1:],
    }


def triton_status(device: torch.device) -> Optional[str]:
    """None when ``backend="triton"`` can run on ``device``, else the reason why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed here"
    if device.type != "cuda" and not interpreter_enabled():
        return "no CUDA device; pass --interpret to run the Triton kernels in Triton's CPU interpreter"
    return None


def flex_attention_status(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "FlexAttention is compared on GPU only"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None

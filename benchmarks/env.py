"""What this machine has: device, library versions, and which ptkernels ops/backends exist yet."""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import sys
from typing import Optional

import torch


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


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


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def prefix_attention_triton_status(device: torch.device) -> Optional[str]:
    """None when ``prefix_attention(backend="triton")`` can run on ``device``, else the reason why not."""
    if not triton_importable():
        return "triton is not importable here"
    if device.type != "cuda" and not interpreter_enabled():
        return "no CUDA device; pass --interpret to run the Triton kernels in Triton's CPU interpreter"
    try:
        importlib.import_module("ptkernels.ops.prefix_attention.function")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("ptkernels"):
            return "ptkernels.ops.prefix_attention.function (the Triton backend) is not in this checkout yet"
        return f"the Triton backend failed to import: {exc}"
    except Exception as exc:  # pragma: no cover - depends on the checkout
        return f"the Triton backend failed to import: {type(exc).__name__}: {exc}"
    return None


def prompt_embedding_module():
    """(module, None) or (None, reason) for ``ptkernels.ops.prompt_embedding``."""
    try:
        mod = importlib.import_module("ptkernels.ops.prompt_embedding")
    except Exception as exc:
        return None, f"ptkernels.ops.prompt_embedding is not importable yet ({type(exc).__name__}: {exc})"
    missing = [n for n in ("prompt_embedding", "virtual_token_embedding") if not hasattr(mod, n)]
    if "prompt_embedding" in missing:
        return None, "ptkernels.ops.prompt_embedding has no prompt_embedding function yet"
    return mod, None


def prompt_embedding_triton_status(device: torch.device) -> Optional[str]:
    """None when prompt_embedding(backend="triton") runs on ``device``, else why not."""
    if not triton_importable():
        return "triton is not importable here"
    if device.type != "cuda" and not interpreter_enabled():
        return "no CUDA device; pass --interpret to run the Triton kernels in Triton's CPU interpreter"
    mod, why = prompt_embedding_module()
    if mod is None:
        return why
    # Try a one-token call: the backend may not be wired up yet even though the module imports.
    try:
        w = torch.zeros(4, 16, device=device)
        p = torch.zeros(2, 16, device=device)
        ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        mod.prompt_embedding(ids, w, p, backend="triton")
    except Exception as exc:
        return f"prompt_embedding(backend='triton') failed: {type(exc).__name__}: {exc}"
    return None


def integrations_module():
    """(patch, unpatch, None) or (None, None, reason)."""
    try:
        mod = importlib.import_module("ptkernels.integrations")
        return mod.patch, mod.unpatch, None
    except Exception as exc:
        import ptkernels

        if hasattr(ptkernels, "patch") and hasattr(ptkernels, "unpatch"):
            return ptkernels.patch, ptkernels.unpatch, None
        return None, None, f"ptkernels.integrations (patch/unpatch) is not importable yet ({type(exc).__name__}: {exc})"


def flex_attention_status(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return "FlexAttention is compared on GPU only"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except Exception:
        return f"torch {torch.__version__} has no torch.nn.attention.flex_attention"
    return None

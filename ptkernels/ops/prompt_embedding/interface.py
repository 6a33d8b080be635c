"""The public ``prompt_embedding`` and ``virtual_token_embedding`` functions: argument checks,
backend choice, dispatch."""

from __future__ import annotations

import torch
from torch import Tensor

from ..._backend import resolve_backend
from ..utils import describe
from .launch import check_id_range
from .reference import prompt_embedding_reference, virtual_token_embedding_reference
from .torch_path import prompt_embedding_torch, virtual_token_embedding_torch

TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - very old torch
        return False


def check_embedding_args(ids_name: str, ids, weight, prompt) -> None:
    """Raise ValueError/TypeError naming the argument for anything the ops do not define.

    ids: (B, S) integer; weight: (V, E) float; prompt: (P, E) or (B, P, E) in weight's dtype,
    everything on one device. (The id range is checked separately: it needs a pass over the ids.)
    """
    for name, t in ((ids_name, ids), ("weight", weight), ("prompt", prompt)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ids.dtype not in ID_DTYPES:
        raise TypeError(f"{ids_name} must be an integer tensor (int64 or int32), got {describe(ids)}")
    if ids.dim() != 2:
        raise ValueError(f"{ids_name} must be 2-D (B, S), got {describe(ids)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (V, E), got {describe(weight)}")
    if not weight.dtype.is_floating_point:
        raise TypeError(f"weight must be float16, bfloat16 or float32, got {describe(weight)}")
    if weight.device != ids.device:
        raise ValueError(f"weight must be on {ids_name}'s device {ids.device}, got {weight.device}")
    batch = ids.shape[0]
    emb_dim = weight.shape[1]
    if prompt.dim() not in (2, 3):
        raise ValueError(f"prompt must be 2-D (P, E) or 3-D (B, P, E), got {describe(prompt)}")
    if prompt.shape[-1] != emb_dim:
        raise ValueError(
            f"prompt must have weight's embedding size E = {emb_dim} in its last dim, got prompt "
            f"{tuple(prompt.shape)} and weight {tuple(weight.shape)}"
        )
    if prompt.dim() == 3 and prompt.shape[0] != batch:
        raise ValueError(
            f"a per-example prompt (B, P, E) must have {ids_name}'s batch size B = {batch} in dim 0, got prompt "
            f"{tuple(prompt.shape)} and {ids_name} {tuple(ids.shape)}"
        )
    if prompt.dtype != weight.dtype:
        raise TypeError(f"prompt must have weight's dtype {weight.dtype}, got {prompt.dtype}")
    if prompt.device != weight.device:
        raise ValueError(f"prompt must be on weight's device {weight.device}, got {prompt.device}")


def _check_triton_dtype(weight: Tensor) -> None:
    if weight.dtype not in TRITON_DTYPES:
        raise TypeError(
            f"weight must be float16, bfloat16 or float32 for backend='triton' (float64 only with "
            f"backend='torch' / 'reference'), got {weight.dtype}"
        )


def _embedding(ids: Tensor, weight: Tensor, prompt: Tensor, backend: str, *, virtual: bool) -> Tensor:
    """Check, pick the backend, run: prompt_embedding (virtual=False, ids are ``input_ids``) or
    virtual_token_embedding (virtual=True, ids are ``token_ids``)."""
    check_embedding_args("token_ids" if virtual else "input_ids", ids, weight, prompt)
    chosen = resolve_backend(backend, weight.device)
    if chosen in ("torch", "reference"):
        if not _is_compiling():
            check_id_range(ids, weight.shape[0], prompt.shape[-2], virtual)
        if virtual:
            fn = virtual_token_embedding_torch if chosen == "torch" else virtual_token_embedding_reference
        else:
            fn = prompt_embedding_torch if chosen == "torch" else prompt_embedding_reference
        return fn(ids, weight, prompt)
    _check_triton_dtype(weight)
    from .function import prompt_embedding_triton  # imports triton: only on the Triton path

    return prompt_embedding_triton(ids, weight, prompt, virtual=virtual)


def prompt_embedding(input_ids: Tensor, weight: Tensor, prompt: Tensor, *, backend: str = "auto") -> Tensor:
    """Word embeddings with a soft prompt in front: ``cat([prompt, weight[input_ids]], dim=1)``.

    The Triton path writes the output in one pass, reading each row from the prompt or the word
    table: no concatenation, no intermediate (B, S, E) gather, no batch-expanded shared prompt.

    Arguments:
        input_ids: (B, S) integer (int64 / int32) word ids, each in [0, V). Any strides.
        weight: (V, E) word-embedding table, float16 / bfloat16 / float32 (float64 with
            backend="torch"). Any strides. Gets a gradient only when weight.requires_grad.
        prompt: (P, E) shared by the batch, or (B, P, E) per example, weight's dtype and device;
            P may be 0. A shared prompt gets its gradient summed over the batch (deterministically).
        backend: "auto" (Triton for CUDA tensors, the fast PyTorch path otherwise), "triton",
            "torch" (the fast PyTorch path) or "reference" (the readable oracle). "triton" on CPU
            tensors runs Triton's interpreter (TRITON_INTERPRET=1).
    Returns:
        out: (B, P + S, E) in weight's dtype; out[:, :P] = prompt, out[:, P:] = weight[input_ids].
    """
    return _embedding(input_ids, weight, prompt, backend, virtual=False)


def virtual_token_embedding(token_ids: Tensor, weight: Tensor, prompt: Tensor, *, backend: str = "auto") -> Tensor:
    """Embedding lookup in the virtual table ``[weight; prompt]``, so prompt tokens can sit anywhere
    in a template (original P-Tuning, e.g. "[P][P][P] x [P][P][P] [MASK]").

    Ids below V = weight.shape[0] read the word table; ids V .. V + P - 1 read prompt row id - V (of
    the same example when the prompt is per example). One pass, no concatenated table.

    Arguments:
        token_ids: (B, S) integer (int64 / int32) ids, each in [0, V + P). Any strides.
        weight: (V, E) word-embedding table, float16 / bfloat16 / float32 (float64 with
            backend="torch"). Any strides. Gets a gradient only when weight.requires_grad.
        prompt: (P, E) shared by the batch, or (B, P, E) per example, weight's dtype and device.
            Its gradient sums every position that reads a row (deterministically).
        backend: "auto" (Triton for CUDA tensors, the fast PyTorch path otherwise), "triton",
            "torch" (the fast PyTorch path) or "reference" (the readable oracle). "triton" on CPU
            tensors runs Triton's interpreter (TRITON_INTERPRET=1).
    Returns:
        out: (B, S, E) in weight's dtype.
    """
    return _embedding(token_ids, weight, prompt, backend, virtual=True)

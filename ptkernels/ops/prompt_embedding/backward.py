"""Triton backward kernels of the prompt-embedding ops, and their launcher.

Deterministic, no float atomics:
- prompt_embedding, grad of prompt: ``_prompt_grad_kernel``, one program per ([example,] BLOCK_P
  prompt rows, BLOCK_E columns) that sums grad_out[b, p] over b = 0, 1, ..., B - 1 in that fixed order
  (fp32 accumulator). Per-example prompts use the same kernel with a one-step loop.
- every id-indexed gradient (grad of weight; grad of prompt in virtual_token_embedding) is a
  sort-based segment reduction: the launcher builds one int64 key per id position (the target row),
  sorts the keys with a *stable* sort (so equal keys keep their position order), and
  ``_segment_grad_kernel`` runs one program per (sorted position, BLOCK_E columns); the program at the
  start of each run of equal keys sums the grad_out rows of that run in sorted order (fp32) and
  writes the target row. Same inputs -> same order -> same bits. Rows no id points to stay zero.

Row/column offsets are computed in int64, so B * T * E and V * E may pass 2**31. grad_out is read
through its strides (no copies, stride 0 included); the gradients are allocated contiguous. Block
sizes come from :mod:`.launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .forward import nonempty
from .launch import prompt_grad_config, segment_config


@triton.jit
def _prompt_grad_kernel(
    grad_out_ptr, grad_prompt_ptr,
    n_loop, prompt_len, emb_dim,
    stride_gb, stride_gt, stride_ge,
    BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # grad_prompt[(e,) p] = sum_{b = e0 .. e0 + n_loop - 1} grad_out[b, p], b in increasing order.
    # program id 0 enumerates (example of the output, prompt block), so the batch may pass 65535
    n_p_blocks = tl.cdiv(prompt_len, BLOCK_P)
    pid = tl.program_id(0)
    pid_b = (pid // n_p_blocks).to(tl.int64)
    pid_p = pid % n_p_blocks
    pid_e = tl.program_id(1)
    p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    cols = pid_e.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
    mask = (p < prompt_len)[:, None] & (cols < emb_dim)[None, :]
    src = grad_out_ptr + pid_b * stride_gb + p[:, None] * stride_gt + cols[None, :] * stride_ge
    acc = tl.zeros((BLOCK_P, BLOCK_E), dtype=tl.float32)
    for _ in range(0, n_loop):
        acc += tl.load(src, mask=mask, other=0.0).to(tl.float32)
        src += stride_gb  # pointer increments: no int32 product of the loop index and the stride
    dst = grad_prompt_ptr + (pid_b * prompt_len + p[:, None]) * emb_dim + cols[None, :]
    tl.store(dst, acc.to(grad_prompt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _segment_grad_kernel(
    grad_out_ptr, sorted_keys_ptr, perm_ptr, seg_end_ptr, grad_weight_ptr, grad_prompt_ptr,
    ids_len, row_offset, num_words, emb_dim,
    stride_gb, stride_gt, stride_ge,
    WEIGHT_GRAD: tl.constexpr, BLOCK_E: tl.constexpr,
):
    # Keys < V are word rows (grad_weight[key]); keys >= V are prompt rows (grad_prompt[key - V]).
    # Position pos = b * ids_len + s of the ids reads grad_out[b, s + row_offset].
    i = tl.program_id(0).to(tl.int64)
    pid_e = tl.program_id(1)
    cols = pid_e.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
    col_mask = cols < emb_dim
    key = tl.load(sorted_keys_ptr + i)
    prev = tl.load(sorted_keys_ptr + i - 1, mask=i > 0, other=-1)
    is_start = key != prev  # keys are >= 0, so position 0 always starts a run
    is_word = key < num_words
    if WEIGHT_GRAD:
        active = is_start
    else:
        active = is_start & (key >= num_words)
    end = tl.load(seg_end_ptr + i)
    n = tl.where(active, end - i, 0).to(tl.int32)
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    for j in range(0, n):
        pos = tl.load(perm_ptr + i + j)
        b = pos // ids_len
        s = pos % ids_len + row_offset
        acc += tl.load(grad_out_ptr + b * stride_gb + s * stride_gt + cols * stride_ge, mask=col_mask, other=0.0).to(
            tl.float32
        )
    if WEIGHT_GRAD:
        w_row = tl.where(is_word, key, 0)
        tl.store(
            grad_weight_ptr + w_row * emb_dim + cols, acc.to(grad_weight_ptr.dtype.element_ty),
            mask=cols < tl.where(active & is_word, emb_dim, 0),
        )
    # (scalar & vector masks trip Triton 3.9's interpreter, so the run condition masks via the bound)
    p_row = tl.where(is_word, 0, key - num_words)
    tl.store(
        grad_prompt_ptr + p_row * emb_dim + cols, acc.to(grad_prompt_ptr.dtype.element_ty),
        mask=cols < tl.where(active & (key >= num_words), emb_dim, 0),
    )


# ---------------------------------------------------------------------------------------------- #
# launchers


def _segment_reduce(
    grad_out: Tensor, keys: Tensor, ids_len: int, row_offset: int, num_words: int,
    grad_weight: Tensor, grad_prompt: Tensor, weight_grad: bool,
) -> None:
    """Deterministic segment sum of grad_out rows by key (see the module docstring).

    keys: (N,) int64 with N = B * ids_len, key of id position pos = b * ids_len + s; rows of
    grad_out read: grad_out[b, s + row_offset]. grad_weight (V, E) and grad_prompt (R, E) must be
    contiguous and zero-filled; key k < V adds to grad_weight[k], k >= V to grad_prompt[k - V].
    """
    n_keys = keys.numel()
    emb_dim = grad_out.shape[-1]
    if n_keys == 0 or emb_dim == 0 or (not weight_grad and grad_prompt.numel() == 0):
        return
    sorted_keys, perm = torch.sort(keys, stable=True)
    seg_end = torch.searchsorted(sorted_keys, sorted_keys, right=True)
    config = segment_config(emb_dim, weight_grad)
    grid = (n_keys, triton.cdiv(emb_dim, config["BLOCK_E"]))
    _segment_grad_kernel[grid](
        grad_out, sorted_keys, perm, seg_end,
        nonempty(grad_weight, grad_prompt), nonempty(grad_prompt, grad_weight),
        ids_len, row_offset, num_words, emb_dim,
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        **config,
    )


def _prompt_embedding_backward(
    grad_out: Tensor, input_ids: Tensor, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    # grad_out (B, P + S, E): rows :P sum into the prompt, rows P: into weight by input_ids
    batch, ids_len = input_ids.shape
    emb_dim = grad_out.shape[-1]
    opts = dict(dtype=grad_out.dtype, device=grad_out.device)
    gp_shape = (batch, prompt_len, emb_dim) if per_example else (prompt_len, emb_dim)
    grad_prompt = torch.empty(gp_shape, **opts)
    if prompt_len > 0 and emb_dim > 0:
        if batch == 0:
            grad_prompt.zero_()
        else:
            config = prompt_grad_config(prompt_len, emb_dim)
            grid = (
                triton.cdiv(prompt_len, config["BLOCK_P"]) * (batch if per_example else 1),
                triton.cdiv(emb_dim, config["BLOCK_E"]),
            )
            _prompt_grad_kernel[grid](
                grad_out, grad_prompt,
                1 if per_example else batch, prompt_len, emb_dim,
                grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
                **config,
            )
    if not weight_grad:
        return grad_prompt, torch.empty(0, emb_dim, **opts)
    grad_weight = torch.zeros(num_words, emb_dim, **opts)
    keys = input_ids.reshape(-1).to(torch.int64)
    _segment_reduce(grad_out, keys, ids_len, prompt_len, num_words, grad_weight, grad_prompt, True)
    return grad_prompt, grad_weight


def _virtual_token_embedding_backward(
    grad_out: Tensor, token_ids: Tensor, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    # grad_out (B, S, E): row (b, s) sums into weight or the prompt by token_ids[b, s]
    batch, ids_len = token_ids.shape
    emb_dim = grad_out.shape[-1]
    opts = dict(dtype=grad_out.dtype, device=grad_out.device)
    gp_shape = (batch, prompt_len, emb_dim) if per_example else (prompt_len, emb_dim)
    grad_prompt = torch.zeros(gp_shape, **opts)
    grad_weight = torch.zeros(num_words if weight_grad else 0, emb_dim, **opts)
    keys = token_ids.reshape(-1).to(torch.int64)
    if per_example and prompt_len > 0:
        # prompt row p of example b is target row V + b * P + p
        example = torch.arange(batch, device=keys.device, dtype=torch.int64).repeat_interleave(ids_len)
        keys = torch.where(keys >= num_words, keys + example * prompt_len, keys)
    _segment_reduce(grad_out, keys, ids_len, 0, num_words, grad_weight, grad_prompt, weight_grad)
    return grad_prompt, grad_weight


def embedding_backward(
    grad_out: Tensor, ids: Tensor, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool,
    virtual: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of prompt_embedding (virtual=False) or virtual_token_embedding (virtual=True).

    grad_out: (B, P + S, E) (virtual=False) or (B, S, E) (virtual=True), any strides; ids: (B, S),
    the forward's input_ids / token_ids; num_words: V; prompt_len: P.
    Returns grad_prompt ((B, P, E) if per_example else (P, E)) and grad_weight ((V, E) if weight_grad,
    else an empty (0, E) placeholder), both contiguous in grad_out's dtype.
    """
    backward = _virtual_token_embedding_backward if virtual else _prompt_embedding_backward
    return backward(grad_out, ids, num_words, prompt_len, per_example, weight_grad)

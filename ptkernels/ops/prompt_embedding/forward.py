"""Triton forward kernel of the prompt-embedding ops, and its launcher.

One pass over the output rows, for both ops. A program owns a (BLOCK_T rows, BLOCK_E columns) tile
of the flattened (B * T, E) output and reads each row straight from its source: a ``prompt`` row
(shared (P, E) via a zero batch stride, or per example (B, P, E)) or a ``weight`` row picked by the
id. No concatenation, no intermediate gather, no batch-expanded prompt.

- prompt_embedding (VIRTUAL=False): T = P + S; out[b, t] = prompt[(b,) t] for t < P, else
  weight[input_ids[b, t - P]].
- virtual_token_embedding (VIRTUAL=True): T = S; out[b, t] = weight[id] for id < V, else
  prompt[(b,) id - V], id = token_ids[b, t].

Row/column offsets are computed in int64, so B * T * E and V * E may pass 2**31. Inputs are read
through their strides (no copies); the output is allocated contiguous. Block sizes come from
:mod:`.launch`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..utils import batch_strides
from .launch import forward_config


@triton.jit
def _embed_fwd_kernel(
    ids_ptr, weight_ptr, prompt_ptr, out_ptr,
    n_rows, out_len, num_words, prompt_len, emb_dim,
    stride_ib, stride_is,
    stride_wv, stride_we,
    stride_pb, stride_pp, stride_pe,
    VIRTUAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_e = tl.program_id(1)
    rows = pid_t.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)  # flat (b, t) of out
    row_mask = rows < n_rows
    b = rows // out_len
    t = rows % out_len
    cols = pid_e.to(tl.int64) * BLOCK_E + tl.arange(0, BLOCK_E).to(tl.int64)
    col_mask = cols < emb_dim
    if VIRTUAL:
        # out[b, t] = weight[id] if id < V else prompt[(b,) id - V], id = token_ids[b, t]
        ids = tl.load(ids_ptr + b * stride_ib + t * stride_is, mask=row_mask, other=0).to(tl.int64)
        is_prompt = ids >= num_words
        p_idx = tl.where(is_prompt, ids - num_words, 0)
        w_idx = tl.where(is_prompt, 0, ids)
    else:
        # out[b, t] = prompt[(b,) t] if t < P else weight[input_ids[b, t - P]]
        is_prompt = t < prompt_len
        s = tl.where(is_prompt, 0, t - prompt_len)
        ids = tl.load(ids_ptr + b * stride_ib + s * stride_is, mask=row_mask & (t >= prompt_len), other=0)
        w_idx = ids.to(tl.int64)
        p_idx = tl.where(is_prompt, t, 0)
    is_word = is_prompt == 0
    word_mask = (row_mask & is_word)[:, None] & col_mask[None, :]
    prompt_mask = (row_mask & is_prompt)[:, None] & col_mask[None, :]
    w = tl.load(weight_ptr + w_idx[:, None] * stride_wv + cols[None, :] * stride_we, mask=word_mask, other=0.0)
    p = tl.load(
        prompt_ptr + b[:, None] * stride_pb + p_idx[:, None] * stride_pp + cols[None, :] * stride_pe,
        mask=prompt_mask, other=0.0,
    )
    val = tl.where(is_prompt[:, None], p, w)
    tl.store(out_ptr + rows[:, None] * emb_dim + cols[None, :], val, mask=row_mask[:, None] & col_mask[None, :])


# ---------------------------------------------------------------------------------------------- #
# launcher


def nonempty(t: Tensor, *fallbacks: Tensor) -> Tensor:
    """A tensor to pass for a pointer argument that the kernel never dereferences when ``t`` is empty
    (an empty tensor may have a null data pointer)."""
    if t.numel() > 0:
        return t
    for f in fallbacks:
        if f.numel() > 0:
            return f
    return t


def embedding_forward(ids: Tensor, weight: Tensor, prompt: Tensor, virtual: bool) -> Tensor:
    """Launch the one-pass forward.

    ids: (B, S) integer; weight: (V, E); prompt: (P, E) or (B, P, E), weight's dtype.
    Returns (B, P + S, E) (virtual=False: prompt_embedding) or (B, S, E) (virtual=True:
    virtual_token_embedding), contiguous, in weight's dtype. Ids must already be range-checked.
    """
    batch, ids_len = ids.shape
    num_words, emb_dim = weight.shape
    prompt_len = prompt.shape[-2]
    out_len = ids_len if virtual else prompt_len + ids_len
    out = torch.empty(batch, out_len, emb_dim, dtype=weight.dtype, device=weight.device)
    n_rows = batch * out_len
    if n_rows == 0 or emb_dim == 0:
        return out
    config = forward_config(emb_dim, virtual)
    grid = (triton.cdiv(n_rows, config["BLOCK_T"]), triton.cdiv(emb_dim, config["BLOCK_E"]))
    _embed_fwd_kernel[grid](
        nonempty(ids, out), nonempty(weight, prompt), nonempty(prompt, weight), out,
        n_rows, out_len, num_words, prompt_len, emb_dim,
        ids.stride(0), ids.stride(1),
        weight.stride(0), weight.stride(1),
        *batch_strides(prompt, 2),
        **config,
    )
    return out

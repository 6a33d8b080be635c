"""Launch configuration of the prompt-embedding kernels: pure functions of the sizes, and the id
range every launch relies on.

The kernels index the word table and the prompt by id without bounds checks, so each launch needs
the ids in range first (``check_id_range``; the PyTorch backends run the same check). Block sizes
depend only on the embedding size E and the prompt length P. No device limit enters, so none is an
argument: the kernels are gathers and sums (no tl.dot, no shared-memory tiles), every tile holds at
most 4096 elements, and every grid keeps its large count (rows, ids, batch x prompt blocks) on axis
0, whose limit is 2**31 - 1, while axis 1 counts E / BLOCK_E column blocks.

Pure Python (no triton import), so interface.py can use the id check on every backend, including
where triton is not installed. Each config is the kernel's constexpr features and meta-parameters,
passed to the launch as ``kernel[grid](..., **config)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_BLOCK_E = 2048  # columns per program (forward); E is tiled with masks above that
TILE_ELEMS = 4096  # forward tile size target: BLOCK_T * BLOCK_E
MAX_BLOCK_T = 64  # rows per forward program
MAX_BLOCK_E_PROMPT_GRAD = 512  # columns per program of the prompt-gradient kernel
PROMPT_GRAD_TILE_ELEMS = 2048  # prompt-gradient tile size cap: BLOCK_P * BLOCK_E
MAX_BLOCK_E_SEGMENT = 1024  # columns per program of the segment-reduction kernel
NUM_WARPS = 4


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def forward_config(emb_dim: int, virtual: bool) -> dict:
    """Config of ``_embed_fwd_kernel`` for (B * T, E) output rows: BLOCK_T rows x BLOCK_E columns per
    program. virtual: ids index the virtual table [weight; prompt] (virtual_token_embedding) instead
    of output rows P.. reading weight[input_ids] (prompt_embedding)."""
    block_e = min(next_power_of_2(max(emb_dim, 1)), MAX_BLOCK_E)
    block_t = max(1, min(TILE_ELEMS // block_e, MAX_BLOCK_T))
    return dict(VIRTUAL=virtual, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=NUM_WARPS)


def prompt_grad_config(prompt_len: int, emb_dim: int) -> dict:
    """Config of ``_prompt_grad_kernel`` (P >= 1, E >= 1): BLOCK_P prompt rows x BLOCK_E columns."""
    block_e = min(next_power_of_2(emb_dim), MAX_BLOCK_E_PROMPT_GRAD)
    block_p = max(1, min(next_power_of_2(prompt_len), PROMPT_GRAD_TILE_ELEMS // block_e))
    return dict(BLOCK_P=block_p, BLOCK_E=block_e, num_warps=NUM_WARPS)


def segment_config(emb_dim: int, weight_grad: bool) -> dict:
    """Config of ``_segment_grad_kernel`` (E >= 1): one sorted id position x BLOCK_E columns per
    program. weight_grad: runs of word ids write grad_weight (else only prompt runs are summed)."""
    block_e = min(next_power_of_2(emb_dim), MAX_BLOCK_E_SEGMENT)
    return dict(WEIGHT_GRAD=weight_grad, BLOCK_E=block_e, num_warps=NUM_WARPS)


def check_id_range(ids: Tensor, num_words: int, prompt_len: int, virtual: bool) -> None:
    """Raise ValueError unless every id is in range: [0, V) for prompt_embedding's ``input_ids``,
    [0, V + P) for virtual_token_embedding's ``token_ids`` (virtual=True).

    ids: (B, S) integer; num_words: V; prompt_len: P. Needs a min/max over the ids (a host sync).
    """
    if virtual:
        high, name, what = num_words + prompt_len, "token_ids", "ids in [0, V + P)"
    else:
        high, name, what = num_words, "input_ids", "word ids in [0, V)"
    if ids.numel() == 0:
        return
    lo, hi = (int(x) for x in torch.aminmax(ids))
    if lo < 0 or hi >= high:
        raise ValueError(
            f"{name} must hold {what} = [0, {high}), got ids from {lo} to {hi} ({name} shape {tuple(ids.shape)})"
        )

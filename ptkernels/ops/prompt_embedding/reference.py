"""PyTorch references for the prompt-embedding ops: the CPU fallback (``backend="torch"``) and the
test oracle.

Both are plain differentiable torch ops (embedding, expand, cat, where, indexing), so autograd gives
the gradients of ``weight`` and ``prompt``. They materialise what the Triton path avoids (the
gathered word rows, the batch-expanded prompt, the concatenation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prompt_embedding_reference(input_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    """``cat([prompt (expanded to the batch), weight[input_ids]], dim=1)``.

    Arguments:
        input_ids: (B, S) integer word ids, each in [0, V).
        weight: (V, E) word-embedding table.
        prompt: (P, E) shared by the batch, or (B, P, E) per example; weight's dtype.
    Returns:
        out: (B, P + S, E) in weight's dtype; out[:, :P] = prompt, out[:, P:] = weight[input_ids].
    """
    batch = input_ids.shape[0]
    words = F.embedding(input_ids.long(), weight)  # (B, S, E)
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(batch, -1, -1)  # (B, P, E)
    return torch.cat([prompt, words], dim=1)


def virtual_token_embedding_reference(token_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    """Embedding lookup in the virtual table ``[weight; prompt]``: ids < V read ``weight``, ids in
    [V, V + P) read ``prompt[id - V]`` (of the same example when the prompt is per example).

    Arguments:
        token_ids: (B, S) integer ids, each in [0, V + P).
        weight: (V, E) word-embedding table.
        prompt: (P, E) shared by the batch, or (B, P, E) per example; weight's dtype.
    Returns:
        out: (B, S, E) in weight's dtype.
    """
    ids = token_ids.long()
    num_words = weight.shape[0]
    prompt_len = prompt.shape[-2]
    is_prompt = ids >= num_words  # (B, S)
    if num_words > 0:
        words = F.embedding(ids.clamp(max=num_words - 1), weight)  # (B, S, E)
    else:
        words = weight.new_zeros(*ids.shape, weight.shape[1])
    if prompt_len == 0:
        return words
    prompt_idx = (ids - num_words).clamp(0, prompt_len - 1)  # (B, S)
    if prompt.dim() == 2:
        prompt_rows = prompt[prompt_idx]  # (B, S, E)
    else:
        batch_idx = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
        prompt_rows = prompt[batch_idx, prompt_idx]  # (B, S, E)
    return torch.where(is_prompt[..., None], prompt_rows, words)

"""The fast PyTorch path of the prompt-embedding ops (``backend="torch"``): any device and dtype.

Both are a handful of ops that autograd differentiates well:

* ``prompt_embedding``: one gather of the word rows (``F.embedding``, whose backward is PyTorch's
  embedding-dense backward) and one ``cat`` with the prompt broadcast to the batch (an expand view,
  so a shared prompt is never copied B times before the cat, and its gradient is summed by autograd).
* ``virtual_token_embedding``: one gather of the word rows, then the prompt rows written only at the
  positions that hold prompt ids (``index_put``), instead of gathering both tables at every position
  and selecting; its backward scatters the prompt positions' gradient into the prompt.

The readable oracles are in :mod:`.reference` (``backend="reference"``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import virtual_token_embedding_reference


def prompt_embedding_torch(input_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    """(B, P + S, E): ``out[:, :P] = prompt``, ``out[:, P:] = weight[input_ids]``.

    Arguments (already checked): input_ids (B, S) ids in [0, V); weight (V, E); prompt (P, E)
    shared or (B, P, E) per example, weight's dtype.
    """
    words = F.embedding(input_ids.long(), weight)  # (B, S, E)
    if prompt.shape[-2] == 0:
        return words
    if prompt.dim() == 2:
        prompt = prompt.unsqueeze(0).expand(input_ids.shape[0], -1, -1)
    return torch.cat([prompt, words], dim=1)


def virtual_token_embedding_torch(token_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    """(B, S, E): ids < V read ``weight``, ids in [V, V + P) read ``prompt[id - V]``.

    Arguments (already checked): token_ids (B, S) ids in [0, V + P); weight (V, E); prompt (P, E)
    shared or (B, P, E) per example, weight's dtype.
    """
    if torch.compiler.is_compiling():  # nonzero's shape depends on the data: keep one graph
        return virtual_token_embedding_reference(token_ids, weight, prompt)
    ids = token_ids.long()
    num_words = weight.shape[0]
    is_prompt = ids >= num_words  # (B, S)
    words = F.embedding(ids.clamp(max=max(num_words - 1, 0)), weight) if num_words else \
        weight.new_zeros(*ids.shape, weight.shape[1])
    if prompt.shape[-2] == 0:
        return words
    batch_idx, pos_idx = is_prompt.nonzero(as_tuple=True)  # the positions holding prompt ids
    prompt_idx = ids[batch_idx, pos_idx] - num_words
    rows = prompt[prompt_idx] if prompt.dim() == 2 else prompt[batch_idx, prompt_idx]  # (N, E)
    return words.index_put((batch_idx, pos_idx), rows)

"""Autograd / torch.library wiring of the Triton path.

Each op is a ``torch.library.custom_op`` (forward op + backward op) with ``register_fake`` and
``register_autograd``, so ``torch.compile(fullgraph=True)`` sees opaque ops instead of graph-breaking
on the Triton launches. The id range check (a min/max over the ids, a host sync) runs inside the
forward op, i.e. at run time even under torch.compile.

Ops:
    ptkernels::prompt_embedding(input_ids, weight, prompt) -> (B, P + S, E)
    ptkernels::prompt_embedding_backward(grad_out, input_ids, num_words, prompt_len, per_example,
                                         weight_grad) -> (grad_prompt, grad_weight)
    ptkernels::virtual_token_embedding(token_ids, weight, prompt) -> (B, S, E)
    ptkernels::virtual_token_embedding_backward(grad_out, token_ids, num_words, prompt_len,
                                                per_example, weight_grad) -> (grad_prompt, grad_weight)
grad_weight is an empty (0, E) placeholder when weight_grad is False (custom ops return tensors).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import kernels
from .interface import check_id_range


def _grad_shapes(grad_out: Tensor, batch: int, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool):
    emb_dim = grad_out.shape[-1]
    gp = (batch, prompt_len, emb_dim) if per_example else (prompt_len, emb_dim)
    gw = (num_words if weight_grad else 0, emb_dim)
    return grad_out.new_empty(gp), grad_out.new_empty(gw)


# --------------------------------------------------------------------------------------------- #
# prompt_embedding


@torch.library.custom_op("ptkernels::prompt_embedding", mutates_args=())
def _prompt_embedding_op(input_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    check_id_range(input_ids, weight.shape[0], "input_ids", "word ids in [0, V)")
    return kernels.embedding_forward(input_ids, weight, prompt, virtual=False)


@_prompt_embedding_op.register_fake
def _(input_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    batch, ids_len = input_ids.shape
    return weight.new_empty(batch, prompt.shape[-2] + ids_len, weight.shape[1])


@torch.library.custom_op("ptkernels::prompt_embedding_backward", mutates_args=())
def _prompt_embedding_backward_op(
    grad_out: Tensor, input_ids: Tensor, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    return kernels.prompt_embedding_backward(grad_out, input_ids, num_words, prompt_len, per_example, weight_grad)


@_prompt_embedding_backward_op.register_fake
def _(grad_out, input_ids, num_words, prompt_len, per_example, weight_grad):
    return _grad_shapes(grad_out, input_ids.shape[0], num_words, prompt_len, per_example, weight_grad)


def _setup_context(ctx, inputs, output) -> None:
    ids, weight, prompt = inputs
    ctx.save_for_backward(ids)
    ctx.num_words = weight.shape[0]
    ctx.prompt_len = prompt.shape[-2]
    ctx.per_example = prompt.dim() == 3


def _prompt_embedding_backward(ctx, grad_out):
    (input_ids,) = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1])
    grad_prompt, grad_weight = _prompt_embedding_backward_op(
        grad_out, input_ids, ctx.num_words, ctx.prompt_len, ctx.per_example, weight_grad
    )
    return None, (grad_weight if weight_grad else None), grad_prompt


_prompt_embedding_op.register_autograd(_prompt_embedding_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- #
# virtual_token_embedding


@torch.library.custom_op("ptkernels::virtual_token_embedding", mutates_args=())
def _virtual_token_embedding_op(token_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    check_id_range(token_ids, weight.shape[0] + prompt.shape[-2], "token_ids", "ids in [0, V + P)")
    return kernels.embedding_forward(token_ids, weight, prompt, virtual=True)


@_virtual_token_embedding_op.register_fake
def _(token_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    batch, ids_len = token_ids.shape
    return weight.new_empty(batch, ids_len, weight.shape[1])


@torch.library.custom_op("ptkernels::virtual_token_embedding_backward", mutates_args=())
def _virtual_token_embedding_backward_op(
    grad_out: Tensor, token_ids: Tensor, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool
) -> tuple[Tensor, Tensor]:
    return kernels.virtual_token_embedding_backward(grad_out, token_ids, num_words, prompt_len, per_example, weight_grad)


@_virtual_token_embedding_backward_op.register_fake
def _(grad_out, token_ids, num_words, prompt_len, per_example, weight_grad):
    return _grad_shapes(grad_out, token_ids.shape[0], num_words, prompt_len, per_example, weight_grad)


def _virtual_token_embedding_backward(ctx, grad_out):
    (token_ids,) = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1])
    grad_prompt, grad_weight = _virtual_token_embedding_backward_op(
        grad_out, token_ids, ctx.num_words, ctx.prompt_len, ctx.per_example, weight_grad
    )
    return None, (grad_weight if weight_grad else None), grad_prompt


_virtual_token_embedding_op.register_autograd(_virtual_token_embedding_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------- #
# entry points used by interface.py (arguments already checked)


def prompt_embedding_triton(input_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    """(B, S) ids, (V, E) weight, (P, E) or (B, P, E) prompt -> (B, P + S, E), via the custom op."""
    return torch.ops.ptkernels.prompt_embedding(input_ids, weight, prompt)


def virtual_token_embedding_triton(token_ids: Tensor, weight: Tensor, prompt: Tensor) -> Tensor:
    """(B, S) ids, (V, E) weight, (P, E) or (B, P, E) prompt -> (B, S, E), via the custom op."""
    return torch.ops.ptkernels.virtual_token_embedding(token_ids, weight, prompt)

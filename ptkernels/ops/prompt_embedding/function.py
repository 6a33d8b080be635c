"""Autograd wiring of the Triton path, as torch.library custom ops.

One op pair serves both public functions, told apart by ``virtual`` (False: prompt_embedding,
True: virtual_token_embedding):

    ptkernels::prompt_embedding_fwd(ids, weight, prompt, virtual) -> (B, P + S, E) or (B, S, E)
    ptkernels::prompt_embedding_bwd(grad_out, ids, num_words, prompt_len, per_example, weight_grad,
                                    virtual) -> (grad_prompt, grad_weight)

ids: (B, S); weight: (V, E); prompt: (P, E) or (B, P, E). grad_weight is an empty (0, E)
placeholder when weight_grad is False (custom ops return tensors).

The ops are opaque to torch.compile (fake implementations give it the output shapes), and
``register_autograd`` connects them, so ``torch.compile(fullgraph=True)`` traces through the public
functions without a graph break. The id range check (a min/max over the ids, a host sync) runs
inside the forward op, i.e. at run time even under torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .backward import embedding_backward
from .forward import embedding_forward
from .launch import check_id_range


@torch.library.custom_op("ptkernels::prompt_embedding_fwd", mutates_args=())
def prompt_embedding_fwd_op(ids: Tensor, weight: Tensor, prompt: Tensor, virtual: bool) -> Tensor:
    check_id_range(ids, weight.shape[0], prompt.shape[-2], virtual)
    return embedding_forward(ids, weight, prompt, virtual)


@prompt_embedding_fwd_op.register_fake
def _(ids, weight, prompt, virtual):
    batch, ids_len = ids.shape
    out_len = ids_len if virtual else prompt.shape[-2] + ids_len
    return weight.new_empty(batch, out_len, weight.shape[1])


@torch.library.custom_op("ptkernels::prompt_embedding_bwd", mutates_args=())
def prompt_embedding_bwd_op(
    grad_out: Tensor, ids: Tensor, num_words: int, prompt_len: int, per_example: bool, weight_grad: bool,
    virtual: bool,
) -> tuple[Tensor, Tensor]:
    return embedding_backward(grad_out, ids, num_words, prompt_len, per_example, weight_grad, virtual)


@prompt_embedding_bwd_op.register_fake
def _(grad_out, ids, num_words, prompt_len, per_example, weight_grad, virtual):
    batch, emb_dim = ids.shape[0], grad_out.shape[-1]
    grad_prompt = grad_out.new_empty((batch, prompt_len, emb_dim) if per_example else (prompt_len, emb_dim))
    return grad_prompt, grad_out.new_empty(num_words if weight_grad else 0, emb_dim)


def _setup_context(ctx, inputs, output) -> None:
    ids, weight, prompt, virtual = inputs
    ctx.save_for_backward(ids)
    ctx.num_words = weight.shape[0]
    ctx.prompt_len = prompt.shape[-2]
    ctx.per_example = prompt.dim() == 3
    ctx.virtual = virtual


def _backward(ctx, grad_out):
    (ids,) = ctx.saved_tensors
    weight_grad = bool(ctx.needs_input_grad[1])
    grad_prompt, grad_weight = prompt_embedding_bwd_op(
        grad_out, ids, ctx.num_words, ctx.prompt_len, ctx.per_example, weight_grad, ctx.virtual
    )
    return None, (grad_weight if weight_grad else None), grad_prompt, None


prompt_embedding_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def prompt_embedding_triton(ids: Tensor, weight: Tensor, prompt: Tensor, *, virtual: bool) -> Tensor:
    """Triton path of ``prompt_embedding`` (virtual=False) and ``virtual_token_embedding``
    (virtual=True), arguments already checked: (B, S) ids, (V, E) weight, (P, E) or (B, P, E)
    prompt -> (B, P + S, E) or (B, S, E), via the custom op."""
    return prompt_embedding_fwd_op(ids, weight, prompt, virtual)

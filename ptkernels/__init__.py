"""ptkernels: fused Triton kernels for prefix-tuning and prompt-tuning training.

Public API (see README.md and DESIGN.md for the full contract):

    prefix_attention(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, causal=False,
                     scale=None, dropout_p=0.0, prefix_index=None, prefix_lengths=None,
                     prefix_dropout_p=0.0, backend="auto")
    prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, *, causal=False, scale=None, dropout_p=0.0, prefix_index=None,
                            prefix_lengths=None, prefix_dropout_p=0.0, backend="auto")
    prompt_embedding(input_ids, weight, prompt, *, backend="auto")
    virtual_token_embedding(token_ids, weight, prompt, *, backend="auto")
    patch(model, *, backend="auto", shift_positions=True) / unpatch(model)
"""

from .ops.prefix_attention import prefix_attention
from .ops.prefix_attention_varlen import prefix_attention_varlen
from .ops.prompt_embedding import prompt_embedding, virtual_token_embedding
from .integrations import patch, unpatch

__version__ = "0.1.0"

__all__ = ["prefix_attention", "prefix_attention_varlen", "prompt_embedding", "virtual_token_embedding", "patch", "unpatch", "__version__"]

"""ptkernels: fused Triton kernels for prefix-tuning and prompt-tuning training.

Public API (see README.md and DESIGN.md for the full contract):

    prefix_attention(q, k, v, prefix_k, prefix_v, *, key_padding_mask=None, causal=False,
                     scale=None, dropout_p=0.0, prefix_index=None, prefix_lengths=None,
                     prefix_dropout_p=0.0, softcap=None, sinks=None, window=None,
                     relative_bias_table=None, relative_bias_buckets=None, alibi_slopes=None, backend="auto")
    relative_position_buckets(max_position, *, num_buckets=32, max_distance=128, bidirectional=True)
        (T5's bucket of every relative position, the relative_bias_buckets of prefix_attention)
    prefix_attention_varlen(q, k, v, prefix_k, prefix_v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                            max_seqlen_k, *, causal=False, scale=None, dropout_p=0.0, prefix_index=None,
                            prefix_lengths=None, prefix_dropout_p=0.0, backend="auto")
    prompt_embedding(input_ids, weight, prompt, *, backend="auto")
    virtual_token_embedding(token_ids, weight, prompt, *, backend="auto")
    patch(model, *, backend="auto", shift_positions=True, prefix_dropout=0.0, seq2seq_prefix="peft") / unpatch(model)
        (patched PEFT models also take ``adapter_names=[...]`` in forward and generate)
    LayerPrefix(prefix, *, index=None, lengths=None, dropout_p=0.0, cross=None, shapes=None)   # model(..., ptkernels_prefix=...)
    use_prefix(model, prefix, *, index=None, lengths=None, dropout_p=0.0)   # context manager

Per-layer prefixes for your own models (P-Tuning v2 style, no PEFT): patch the Hugging Face model
once, then hand it every layer's prefix K/V, L layers, Hkv key/value heads, P prefix tokens, head
dim D, batch B, bank of A entries:

    prefix: (2L, Hkv, P, D) shared; (B, 2L, Hkv, P, D) per example; (A, 2L, Hkv, P, D) with
            index (B,); or a list of L (key, value) pairs of (Hkv, P, D) / (B or A, Hkv, P, D).
            Layer l's key is entry 2l, its value 2l + 1.
    lengths: (A,) / (B,) / (1,) ints: only the first lengths[a] prefix keys of an entry attend.
    dropout_p: dropout on the prefix K/V per example (training mode only).

    ptkernels.patch(hf_model)
    out = hf_model(input_ids, attention_mask=mask, ptkernels_prefix=ptkernels.LayerPrefix(prefix))
    with ptkernels.use_prefix(hf_model, prefix):
        out = hf_model(input_ids, attention_mask=mask)

See examples/ptuning_v2/ for P-Tuning v2's RobertaPrefixForTokenClassification rebuilt on it.
"""

from .ops.prefix_attention import prefix_attention
from .ops.prefix_attention.relative_bias import relative_position_buckets
from .ops.prefix_attention_varlen import prefix_attention_varlen
from .ops.prompt_embedding import prompt_embedding, virtual_token_embedding
from .integrations import patch, unpatch
from .integrations.transformers import LayerPrefix, use_prefix

__version__ = "0.1.0"

__all__ = ["prefix_attention", "relative_position_buckets",
           "prefix_attention_varlen", "prompt_embedding", "virtual_token_embedding", "patch",
           "unpatch", "LayerPrefix", "use_prefix", "__version__"]

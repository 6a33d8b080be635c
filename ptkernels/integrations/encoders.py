"""Prefix and prompt encoders, evaluated ONCE per forward and shared by the whole batch.

PEFT 0.21 expands the virtual-token indices to the batch *before* its prefix encoder
(``PeftModel.get_prompt``), so for prefix tuning the embedding lookup and, with
``prefix_projection=True``, the two-layer MLP run B times on identical input and B copies of
every layer's prefix K/V are materialised. (For P-Tuning and prompt tuning PEFT already evaluates
the encoder on one row and then ``repeat``s the result B times.)

Design choice. ``ptkernels.patch`` does NOT replace PEFT's encoder modules: it calls PEFT's own
``PrefixEncoder`` / ``PromptEncoder`` / ``PromptEmbedding`` on the un-expanded indices (a batch of
one) through :func:`prefix_key_values` and :func:`prompt_embeddings` below. The parameters that
get trained are therefore PEFT's parameters themselves: optimizers built before patching keep
working, ``save_pretrained`` / ``from_pretrained`` are untouched, and ``unpatch`` has nothing to
copy back. The batch sharing is where the saving is, and it comes from the call, not the module.

Sharded training. The encoder is always evaluated as a module call, ``encoder(indices)``, never
through ``.forward`` or by reading its weights: FSDP2 (``fully_shard`` on the encoder) unshards its
parameters in a forward pre-hook and re-gathers them for backward from hooks on the output, and
DeepSpeed ZeRO-3 gathers partitioned parameters in its module hooks; both only see module calls.
(The one exception is ``inference_mode``, where PEFT stores the projected prefix in
``embedding.weight`` and reads the weight itself, as PEFT does.)

For use without PEFT, :class:`PrefixEncoder` and :class:`PromptEncoder` are small standalone
modules with the same parameter names and shapes as PEFT's classes, so a PEFT adapter's encoder
state dict loads into them unchanged (``load_state_dict(peft_model.prompt_encoder["default"]
.state_dict())``).

Layouts (they match ``PeftModel.get_prompt`` row for row):

* prefix tuning: the encoder output for the P virtual tokens is (P, L * 2 * Hkv * D), read as
  (P, 2L, Hkv, D); layer ``l`` uses key ``[2l]`` and value ``[2l + 1]``, each (Hkv, P, D).
  ``Hkv`` is the model's number of key/value heads (PEFT provisions the prefix for GQA models with
  ``num_key_value_heads``) and ``D`` the head dim.
* P-Tuning / prompt tuning: the encoder output is (P, E), the virtual-token embeddings that are
  placed in front of the word embeddings of the real tokens.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "PrefixEncoder",
    "PromptEncoder",
    "prefix_key_values",
    "prompt_embeddings",
    "split_prefix_key_values",
]


def _indices(num_tokens: int, weight: Tensor) -> Tensor:
    return torch.arange(num_tokens, device=weight.device).unsqueeze(0)  # (1, P): one row, not B


def split_prefix_key_values(flat: Tensor, num_layers: int, num_kv_heads: int, head_dim: int) -> Tensor:
    """(P, L * 2 * Hkv * D) encoder output -> (2L, Hkv, P, D), contiguous; [2l] is layer l's key, [2l+1] its value."""
    if flat.dim() == 3:  # (1, P, ...) from a batch-of-one encoder call
        flat = flat[0]
    num_tokens = flat.shape[0]
    want = num_layers * 2 * num_kv_heads * head_dim
    if flat.shape[-1] != want:
        raise ValueError(
            f"prefix encoder output has {flat.shape[-1]} features per virtual token, expected "
            f"num_layers * 2 * num_kv_heads * head_dim = {num_layers} * 2 * {num_kv_heads} * {head_dim} = {want}"
        )
    return flat.view(num_tokens, 2 * num_layers, num_kv_heads, head_dim).permute(1, 2, 0, 3).contiguous()


def prefix_key_values(
    encoder: nn.Module,
    num_virtual_tokens: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    *,
    inference_mode: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Evaluate a prefix-tuning encoder once and return every layer's prefix K/V: (2L, Hkv, P, D).

    ``encoder`` is PEFT's ``PrefixEncoder`` or :class:`PrefixEncoder` (anything with ``embedding``
    and a ``forward(indices)`` giving (1, P, L * 2 * Hkv * D) for (1, P) indices); it is called as a
    module, so FSDP2 / ZeRO-3 hooks fire. With ``inference_mode`` (an adapter loaded for inference) the
    encoder holds the already-projected prefix in ``embedding.weight``, as PEFT reads it.
    ``dtype`` casts the result (PEFT casts the prefix to the base model's dtype).
    """
    weight = encoder.embedding.weight
    if inference_mode:
        flat = weight
    else:
        flat = encoder(_indices(num_virtual_tokens, weight))  # a module call: sharding hooks fire
    if dtype is not None:
        flat = flat.to(dtype)
    return split_prefix_key_values(flat, num_layers, num_kv_heads, head_dim)


def prompt_embeddings(
    encoder: nn.Module,
    num_virtual_tokens: int,
    *,
    inference_mode: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Evaluate a prompt-tuning / P-Tuning encoder once: the (P, E) virtual-token embeddings.

    ``encoder`` is PEFT's ``PromptEmbedding`` / ``PromptEncoder`` or :class:`PromptEncoder`. The
    bidirectional LSTM of P-Tuning runs over the P virtual tokens of one row, which is exactly what
    PEFT computes before repeating it for the batch. Called as a module (``encoder(indices)``), so
    FSDP2 / ZeRO-3 hooks fire.
    """
    weight = encoder.embedding.weight
    if inference_mode:
        out = weight[:num_virtual_tokens]
    else:
        out = encoder(_indices(num_virtual_tokens, weight))[0]
    if dtype is not None:
        out = out.to(dtype)
    return out


class PrefixEncoder(nn.Module):
    """Prefix-tuning encoder: per-layer (k, v) prefixes of shape (Hkv, P, D), computed once per call.

    Parameter names and shapes are PEFT's ``PrefixEncoder``'s: ``embedding`` (P, L*2*Hkv*D) when
    ``prefix_projection`` is False; otherwise ``embedding`` (P, E) followed by ``transform`` =
    Linear(E, H) -> Tanh -> Linear(H, L*2*Hkv*D) (the MLP reparameterisation of P-Tuning v2).

    ``forward()`` returns the stacked (2L, Hkv, P, D) tensor; :meth:`layer` picks one layer.
    ``forward(indices)`` with (N, P) indices is PEFT's forward: (N, P, L * 2 * Hkv * D).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        prefix_projection: bool = False,
        token_dim: Optional[int] = None,
        encoder_hidden_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.prefix_projection = prefix_projection
        out_dim = num_layers * 2 * num_kv_heads * head_dim
        if prefix_projection:
            token_dim = num_kv_heads * head_dim if token_dim is None else token_dim
            hidden = token_dim if encoder_hidden_size is None else encoder_hidden_size
            self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out_dim)

    def forward(self, indices: Optional[Tensor] = None) -> Tensor:
        """None -> (2L, Hkv, P, D) shared by the batch; (N, P) indices -> (N, P, L*2*Hkv*D) (PEFT's forward)."""
        flat = self.embedding(_indices(self.num_virtual_tokens, self.embedding.weight) if indices is None else indices)
        if self.prefix_projection:
            flat = self.transform(flat)
        if indices is not None:
            return flat
        return split_prefix_key_values(flat, self.num_layers, self.num_kv_heads, self.head_dim)

    @staticmethod
    def layer(stacked: Tensor, layer_idx: int) -> tuple[Tensor, Tensor]:
        """(k, v) of one layer, each (Hkv, P, D), from the output of :meth:`forward`."""
        return stacked[2 * layer_idx], stacked[2 * layer_idx + 1]


class PromptEncoder(nn.Module):
    """P-Tuning (v1) prompt encoder: (P, E) virtual-token embeddings, computed once per call.

    Parameter names and shapes are PEFT's ``PromptEncoder``'s: ``embedding`` (P, E) then either
    ``mlp_head`` = Linear(E, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, E) (``"MLP"``), or
    ``lstm_head`` = bidirectional LSTM(E, H, num_layers) followed by ``mlp_head`` = Linear(2H, 2H)
    -> ReLU -> Linear(2H, E) (``"LSTM"``). With ``encoder_type=None`` it is plain prompt tuning
    (PEFT's ``PromptEmbedding``: ``embedding`` only).

    ``forward()`` returns the (P, E) prompt; ``forward(indices)`` with (N, P) indices is PEFT's
    forward: (N, P, E).
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        *,
        encoder_type: Optional[str] = "MLP",
        encoder_hidden_size: Optional[int] = None,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        encoder_type = getattr(encoder_type, "value", encoder_type)
        if encoder_type not in (None, "MLP", "LSTM"):
            raise ValueError(f"encoder_type must be 'MLP', 'LSTM' or None, got {encoder_type!r}")
        self.encoder_type = encoder_type
        hidden = token_dim if encoder_hidden_size is None else encoder_hidden_size
        self.embedding = nn.Embedding(num_virtual_tokens, token_dim)
        if encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(
                input_size=token_dim, hidden_size=hidden, num_layers=encoder_num_layers,
                dropout=encoder_dropout, bidirectional=True, batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, token_dim))
        elif encoder_type == "MLP":
            self.mlp_head = nn.Sequential(
                nn.Linear(token_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, token_dim)
            )

    def forward(self, indices: Optional[Tensor] = None) -> Tensor:
        """None -> (P, E); (N, P) indices -> (N, P, E) (PEFT's forward)."""
        x = self.embedding(_indices(self.num_virtual_tokens, self.embedding.weight) if indices is None else indices)
        if self.encoder_type == "LSTM":
            x = self.mlp_head(self.lstm_head(x)[0])
        elif self.encoder_type == "MLP":
            x = self.mlp_head(x)
        return x[0] if indices is None else x

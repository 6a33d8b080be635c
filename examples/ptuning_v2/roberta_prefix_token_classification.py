"""P-Tuning v2's ``RobertaPrefixForTokenClassification``, rebuilt on ptkernels' per-layer prefix API.

The original (THUDM/P-tuning-v2, ``model/token_classification.py``) keeps RoBERTa frozen and trains a
prefix encoder plus a token-classification head. Each step it

1. expands the P prefix-token indices to the batch and runs its ``PrefixEncoder`` on B identical
   rows (an embedding of (P, 2L * H * D), or an embedding of (P, hidden) followed by the MLP
   reparameterisation ``Linear -> Tanh -> Linear`` to 2L * H * D),
2. applies ``nn.Dropout`` to the (B, P, 2L, H, D) result (a different mask per example),
3. hands the B copies to RoBERTa as ``past_key_values`` with a (B, P + S) attention mask, so every
   layer concatenates them to its keys and values.

Here the encoder runs once on one row, giving one (2L, H, P, D) prefix; it reaches the patched RoBERTa
as ``ptkernels_prefix=ptkernels.LayerPrefix(prefix, dropout_p=p)``; the dropout is
``prefix_attention``'s per-example prefix dropout (the same distribution as ``nn.Dropout`` on the B
copies, in training mode only, never materialised); the mask stays (B, S).

Positions: the original's cache counts the prefix as P past tokens, so RoBERTa numbers the real
tokens from ``padding_idx + 1 + P``. ``forward`` passes those positions explicitly (set
``shift_positions=False`` to number them from ``padding_idx + 1``, as RoBERTa without a prefix).

Run ``python examples/ptuning_v2/roberta_prefix_token_classification.py``: a tiny random RoBERTa, a
few training steps on CPU. tests/test_custom_prefix.py checks this model against RoBERTa's eager
attention over the explicitly concatenated prefix (a ``DynamicCache``, as the original) in float64.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from torch import nn
from transformers import RobertaConfig, RobertaModel
from transformers.modeling_outputs import TokenClassifierOutput

import ptkernels


class PrefixEncoder(nn.Module):
    """P-Tuning v2's prefix encoder: (N, P) prefix-token indices -> (N, P, 2L * H * D)."""

    def __init__(self, config, pre_seq_len: int, prefix_projection: bool, prefix_hidden_size: int) -> None:
        super().__init__()
        self.prefix_projection = prefix_projection
        out_dim = config.num_hidden_layers * 2 * config.hidden_size
        if prefix_projection:
            self.embedding = nn.Embedding(pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, prefix_hidden_size), nn.Tanh(), nn.Linear(prefix_hidden_size, out_dim)
            )
        else:
            self.embedding = nn.Embedding(pre_seq_len, out_dim)

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        if self.prefix_projection:
            return self.trans(self.embedding(prefix))
        return self.embedding(prefix)


class RobertaPrefixForTokenClassification(nn.Module):
    """Frozen RoBERTa + a trained prefix (P-Tuning v2) + a token-classification head.

    ``config`` is a ``RobertaConfig`` with ``num_labels``; ``pre_seq_len`` the prefix length P;
    ``prefix_projection`` the MLP reparameterisation (hidden ``prefix_hidden_size``). The prefix
    dropout (and the dropout before the head) is ``config.hidden_dropout_prob``, as in the original.
    """

    def __init__(self, config: RobertaConfig, *, pre_seq_len: int = 8, prefix_projection: bool = False,
                 prefix_hidden_size: int = 512, backend: str = "auto", shift_positions: bool = True) -> None:
        super().__init__()
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config, add_pooling_layer=False)
        ptkernels.patch(self.roberta, backend=backend)  # attention through ptkernels.prefix_attention
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        for param in self.roberta.parameters():
            param.requires_grad = False
        self.pre_seq_len = pre_seq_len
        self.n_layer = config.num_hidden_layers
        self.n_head = config.num_attention_heads
        self.n_embd = config.hidden_size // config.num_attention_heads
        self.shift_positions = shift_positions
        self.register_buffer("prefix_tokens", torch.arange(pre_seq_len).long(), persistent=False)
        self.prefix_encoder = PrefixEncoder(config, pre_seq_len, prefix_projection, prefix_hidden_size)

    def get_prompt(self) -> torch.Tensor:
        """Every layer's prefix, (2L, H, P, D): the encoder on ONE row (the original: B rows)."""
        flat = self.prefix_encoder(self.prefix_tokens.unsqueeze(0))[0]  # (P, 2L * H * D)
        return flat.view(self.pre_seq_len, 2 * self.n_layer, self.n_head, self.n_embd).permute(1, 2, 0, 3)

    def position_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """RoBERTa's padding-aware positions, counting the prefix as P past tokens (the original's)."""
        pad = self.roberta.config.pad_token_id
        mask = input_ids.ne(pad).long()
        past = self.pre_seq_len if self.shift_positions else 0
        return (torch.cumsum(mask, dim=1) + past) * mask + pad

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None):
        prefix = ptkernels.LayerPrefix(self.get_prompt(), dropout_p=self.dropout.p)
        outputs = self.roberta(
            input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
            position_ids=self.position_ids(input_ids), ptkernels_prefix=prefix,
        )
        logits = self.classifier(self.dropout(outputs[0]))
        loss = None
        if labels is not None:
            loss_fct = nn.CrossEntropyLoss()
            if attention_mask is not None:
                active = attention_mask.reshape(-1) == 1
                active_labels = torch.where(active, labels.reshape(-1), torch.tensor(loss_fct.ignore_index).type_as(labels))
                loss = loss_fct(logits.reshape(-1, self.num_labels), active_labels)
            else:
                loss = loss_fct(logits.reshape(-1, self.num_labels), labels.reshape(-1))
        return TokenClassifierOutput(loss=loss, logits=logits)


def tiny_config(**overrides) -> RobertaConfig:
    """A small random RoBERTa (no download)."""
    kwargs = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, pad_token_id=1, num_labels=5, hidden_dropout_prob=0.1,
                  attention_probs_dropout_prob=0.0)
    kwargs.update(overrides)
    return RobertaConfig(**kwargs)


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--prefix-projection", action="store_true")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = RobertaPrefixForTokenClassification(tiny_config(), pre_seq_len=4, prefix_projection=args.prefix_projection,
                                                prefix_hidden_size=24, backend=args.backend)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 100, (8, 12), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[4:, 8:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 1)
    labels = torch.randint(0, 5, (8, 12), generator=g)
    model.train()
    losses = []
    for step in range(args.steps):
        loss = model(input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        print(f"step {step:3d}  loss {losses[-1]:.4f}")
    return losses


if __name__ == "__main__":
    main()

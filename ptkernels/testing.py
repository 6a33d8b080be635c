"""Oracles for checking a patched model, used by the tests, ``ptkernels verify`` and the benchmarks.

* :func:`with_peft_oracle_shim`: unpatched PEFT prefix tuning made to run again on transformers
  >= 5.24 (which renamed the models' ``past_key_values`` argument to ``cache``; PEFT 0.21.2 looks for
  the old name and refuses or crashes), so that PEFT's own code path stays the reference.
* :func:`greedy_by_full_forwards`: what ``generate()`` must produce: each row alone, decoded greedily
  by full forwards (no KV cache). :func:`greedy_seq2seq_by_full_forwards`: the same for an
  encoder-decoder model (the decoder input grown token by token from ``decoder_start_token_id``).
* The FlashAttention tolerance rule (:func:`flash_attention_bound`): in float16 / bfloat16 a kernel's
  error against an fp32 / fp64 reference may be at most 2x (outputs) or 3x (gradients) the error of
  plain PyTorch in the same precision, plus a slack. ``ptkernels verify`` and the tests use it.

Nothing here changes a patched model; ``ptkernels.patch`` needs no shim.
"""

from __future__ import annotations

import inspect

import torch

__all__ = [
    "peft_needs_oracle_shim", "with_peft_oracle_shim", "without_peft_oracle_shim", "greedy_by_full_forwards",
    "greedy_seq2seq_by_full_forwards",
    "FWD_FACTOR", "GRAD_FACTOR", "max_abs_err", "flash_attention_bound", "output_rounding",
]

FWD_FACTOR = 2.0  # outputs: at most 2x the same-precision PyTorch error
GRAD_FACTOR = 3.0  # gradients: at most 3x


def max_abs_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| in float64 (inf when NaN appears, 0 for empty tensors)."""
    if x.numel() == 0:
        return 0.0
    diff = (x.detach().to(torch.float64) - ref.detach().to(torch.float64)).abs()
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max())


def flash_attention_bound(same_precision_err: float, *, is_grad: bool, slack: float) -> float:
    """The largest error the FlashAttention rule allows: FWD_FACTOR (outputs) or GRAD_FACTOR
    (gradients) times the error of plain PyTorch in the same low precision, plus ``slack``."""
    return (GRAD_FACTOR if is_grad else FWD_FACTOR) * same_precision_err + slack


def output_rounding(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """One rounding of the output in ``dtype``: eps / 2 * max(1, max |ref|)."""
    scale = max(1.0, float(ref.detach().abs().max()) if ref.numel() else 1.0)
    return torch.finfo(dtype).eps / 2 * scale

_SHIM = "_ptkernels_test_oracle_shim"


def assert_matches_fp64(out: torch.Tensor, leaves, want: torch.Tensor, leaves64, names, *, out_tol: float,
                        grad_tol: float) -> tuple:
    """An op's output ``out`` and its gradients w.r.t. ``leaves`` against an fp64 oracle ``want``
    computed from ``leaves64`` (fp64 CPU copies of the leaves, in the same order; ``names`` label
    them): outputs within ``out_tol``, gradients (for a fixed random grad_out, seed 1) within
    ``grad_tol`` (absolute and relative); a leaf the oracle does not use must get a zero gradient.
    Returns the oracle's gradients (None for an unused leaf)."""
    torch.testing.assert_close(out.detach().cpu().double(), want, atol=out_tol, rtol=out_tol)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, list(leaves), grad_out.to(out.device))
    wanted = torch.autograd.grad(want, list(leaves64), grad_out.double(), allow_unused=True)
    for name, g, w in zip(names, got, wanted):
        w = torch.zeros_like(g, dtype=torch.float64) if w is None else w
        torch.testing.assert_close(g.detach().cpu().double(), w, atol=grad_tol, rtol=grad_tol, msg=name)
    return wanted


def peft_needs_oracle_shim(model) -> bool:
    """True when unpatched PEFT prefix tuning cannot run this model as it is.

    transformers 5.24 renamed the models' ``past_key_values`` argument to ``cache`` (the old name
    stays a deprecated alias until 5.40). PEFT 0.21.2 looks for ``past_key_values`` in the forward
    signature: BERT-family models are refused ("Model does not support past key values ..."), and
    decoders used for classification go down PEFT's encoder path and crash in the classifier.
    """
    base = model.get_base_model()
    params = inspect.signature(type(base).forward).parameters
    return "past_key_values" not in params and "cache" in _all_cache_params(base)


def _all_cache_params(base) -> set:
    names = set(inspect.signature(type(base).forward).parameters)
    backbone = getattr(base, "base_model", None)
    if backbone is not None and backbone is not base:
        names |= set(inspect.signature(type(backbone).forward).parameters)
    return names


def with_peft_oracle_shim(model):
    """Give the base model of an UNPATCHED PEFT model an instance ``forward`` whose signature shows
    ``past_key_values`` and hands it on as ``cache``, so that PEFT's own prefix-tuning path (prefix
    in a DynamicCache, concatenated in every layer, 4D mask) runs as it did on transformers <= 5.23.

    Only the tests' oracle gets this: ``ptkernels.patch`` needs no such help (its forward does not go
    through PEFT's signature check); the tests prove that by removing the shim before patching.
    A no-op where PEFT runs as it is (older transformers).
    """
    base = model.get_base_model()
    if base.__dict__.get(_SHIM) or not peft_needs_oracle_shim(model):
        return model
    original = base.forward

    def forward(*args, past_key_values=None, **kwargs):
        if past_key_values is not None:
            kwargs["cache"] = past_key_values
        return original(*args, **kwargs)

    signature = inspect.signature(original)
    params = list(signature.parameters.values())
    extra = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    forward.__signature__ = signature.replace(parameters=params[:at] + [extra] + params[at:])
    base.forward = forward
    setattr(base, _SHIM, True)
    return model


def without_peft_oracle_shim(model):
    """Undo :func:`with_peft_oracle_shim` (the model is as ``get_peft_model`` made it)."""
    base = model.get_base_model()
    if base.__dict__.pop(_SHIM, False):
        del base.forward
    return model


def greedy_by_full_forwards(model, ids, mask, max_new_tokens=6, pad_token_id=0):
    """The generate() oracle: each row alone (its padding removed), decoded greedily by full forwards
    of ``model`` (no KV cache), laid out as generate() lays it out (left padding kept, rows that
    reach EOS padded with ``pad_token_id``)."""
    eos = model.get_base_model().generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    rows = []
    model.eval()
    with torch.no_grad():
        for b in range(ids.shape[0]):
            seq = ids[b][mask[b].bool()][None]
            new, done = [], False
            for _ in range(max_new_tokens):
                if done:
                    new.append(pad_token_id)
                    continue
                logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits
                token = int(logits[0, -1].argmax())
                new.append(token)
                done = token in eos
                seq = torch.cat([seq, seq.new_tensor([[token]])], dim=1)
            rows.append(torch.cat([ids[b], ids.new_tensor(new)]))
    return torch.stack(rows)


def greedy_seq2seq_by_full_forwards(model, ids, mask, max_new_tokens=6):
    """The generate() oracle of an encoder-decoder model: each row alone, decoded greedily by full
    forwards of ``model`` (encoder and decoder re-run on the whole decoder input, no cache),
    starting from ``decoder_start_token_id``; laid out as generate() lays it out
    ((B, 1 + max_new_tokens), rows that reach EOS padded with ``pad_token_id``). The row's encoder
    input keeps its padding and mask: BART-family encoders number positions from the first slot,
    padding included, so removing left padding would change the encoder's output."""
    gen = model.get_base_model().generation_config
    eos = gen.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos]))
    start, pad = gen.decoder_start_token_id, gen.pad_token_id
    rows = []
    model.eval()
    with torch.no_grad():
        for b in range(ids.shape[0]):
            src, src_mask = ids[b:b + 1], mask[b:b + 1]
            out, done = [start], False
            for _ in range(max_new_tokens):
                if done:
                    out.append(pad)
                    continue
                logits = model(input_ids=src, attention_mask=src_mask, decoder_input_ids=ids.new_tensor([out])).logits
                token = int(logits[0, -1].argmax())
                out.append(token)
                done = token in eos
            rows.append(ids.new_tensor(out))
    return torch.stack(rows)

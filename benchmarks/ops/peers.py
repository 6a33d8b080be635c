"""The implementations ``ptkernels bench`` compares, all computing the same prefix attention.

Each peer is built once per case by ``make_attention_peers`` into a closure over prepared inputs;
everything a real model builds once per forward and shares across layers (the 4D mask, Flex's block
mask) is built outside the timed call.

    naive    torch.cat of the batch-expanded prefix, repeat_kv, matmul + additive mask + fp32 softmax
             + matmul: transformers' eager attention path under PEFT prefix tuning
    peft     torch.cat + repeat_kv + dense (B, 1, S, P+S) bool mask + scaled_dot_product_attention:
             what PEFT prefix tuning runs with attn_implementation="sdpa" (no flash backend possible)
    sdpa     torch.cat + SDPA with no mask (enable_gqa where torch has it): SDPA's best case, only
             legal without padding and without causal masking (or P = 0 with Sq == Sk)
    flex     FlexAttention (torch.compile'd) on the concatenated K/V with a block mask (GPU only)
    ptk-torch ptkernels.prefix_attention(backend="torch"), the fast PyTorch path
    ptk-triton  ptkernels.prefix_attention(backend="triton") (GPU only)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ptkernels import prompt_embedding

from .. import env

PEER_ORDER = ["naive", "peft", "sdpa", "flex", "ptk-torch", "ptk-triton"]
PEER_LABELS = {
    "naive": "naive cat+eager",
    "peft": "PEFT cat+4Dmask+SDPA",
    "sdpa": "cat+SDPA no mask",
    "flex": "FlexAttention",
    "ptk-torch": "ptkernels torch",
    "ptk-triton": "ptkernels triton",
}


@dataclass
class AttentionInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    prefix_k: torch.Tensor  # (Hkv, P, D): the shared prefix parameters
    prefix_v: torch.Tensor
    key_padding_mask: Optional[torch.Tensor]
    causal: bool
    scale: float
    grad_out: torch.Tensor

    @property
    def leaves(self):
        return [self.q, self.k, self.v, self.prefix_k, self.prefix_v]


def make_attention_inputs(case: dict, dtype: torch.dtype, device: torch.device, seed: int = 0) -> AttentionInputs:
    g = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    B, Hq, Hkv, S, P, D = (case[x] for x in ("B", "Hq", "Hkv", "S", "P", "D"))
    kpm = None
    if case.get("padding", "none") == "random":
        lengths = torch.randint(max(1, S // 2), S + 1, (B,), generator=g)
        kpm = (torch.arange(S)[None, :] < lengths[:, None]).to(device)
    grad_out = torch.randn(B, Hq, S, D, generator=g).to(device=device, dtype=dtype)
    return AttentionInputs(rnd(B, Hq, S, D), rnd(B, Hkv, S, D), rnd(B, Hkv, S, D), rnd(Hkv, P, D), rnd(Hkv, P, D),
                           kpm, bool(case.get("causal", False)), D**-0.5, grad_out)


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """transformers' repeat_kv: (B, Hkv, S, D) -> (B, Hkv * group, S, D), a copy."""
    if group == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def _cat_prefix(inp: AttentionInputs):
    B = inp.q.shape[0]
    pk = inp.prefix_k.unsqueeze(0).expand(B, -1, -1, -1)
    pv = inp.prefix_v.unsqueeze(0).expand(B, -1, -1, -1)
    return torch.cat([pk, inp.k], dim=2), torch.cat([pv, inp.v], dim=2)


def _visible(inp: AttentionInputs) -> Optional[torch.Tensor]:
    """(B, 1, S, P+S) bool, or None when every key is visible."""
    if inp.key_padding_mask is None and not inp.causal:
        return None
    from ptkernels.ops.prefix_attention.reference import visible_keys_mask

    B, _, Sq, _ = inp.q.shape
    return visible_keys_mask(B, Sq, inp.prefix_k.shape[1], inp.k.shape[2], inp.key_padding_mask, inp.causal,
                             inp.q.device)


@functools.lru_cache(maxsize=None)
def sdpa_has_gqa() -> bool:
    """torch >= 2.5: scaled_dot_product_attention(..., enable_gqa=True)."""
    try:
        q = torch.zeros(1, 2, 1, 8)
        k = torch.zeros(1, 1, 1, 8)
        F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        return True
    except Exception:
        return False


@functools.lru_cache(maxsize=None)
def _compiled_flex():
    import torch._dynamo
    from torch.nn.attention.flex_attention import flex_attention

    for name in ("recompile_limit", "cache_size_limit"):
        try:
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
        except Exception:
            pass
    return torch.compile(flex_attention, dynamic=False)


def make_attention_peers(inp: AttentionInputs, device: torch.device, peers=None) -> Dict[str, object]:
    """name -> forward callable (returning the output), or name -> str (why it does not run here)."""
    from ptkernels import prefix_attention

    peers = peers or PEER_ORDER
    B, Hq, Sq, D = inp.q.shape
    Hkv = inp.k.shape[1]
    P = inp.prefix_k.shape[1]
    group = Hq // Hkv
    visible = _visible(inp)
    out: Dict[str, object] = {}

    if "naive" in peers:
        additive = None
        if visible is not None:
            additive = torch.zeros(visible.shape, dtype=inp.q.dtype, device=device)
            additive.masked_fill_(~visible, torch.finfo(inp.q.dtype).min)

        def naive():
            keys, values = _cat_prefix(inp)
            keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
            scores = torch.matmul(inp.q, keys.transpose(2, 3)) * inp.scale
            if additive is not None:
                scores = scores + additive
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(inp.q.dtype)
            return torch.matmul(probs, values)

        out["naive"] = naive

    if "peft" in peers:
        mask4d = visible if visible is not None else torch.ones(B, 1, Sq, P + inp.k.shape[2], dtype=torch.bool,
                                                                device=device)

        def peft():
            keys, values = _cat_prefix(inp)
            keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
            return F.scaled_dot_product_attention(inp.q, keys, values, attn_mask=mask4d, scale=inp.scale)

        out["peft"] = peft

    if "sdpa" in peers:
        legal = inp.key_padding_mask is None and (not inp.causal or (P == 0 and Sq == inp.k.shape[2]))
        if not legal:
            out["sdpa"] = "n/a: needs a mask (padding or causal with a prefix)"
        else:
            gqa = group > 1 and sdpa_has_gqa()

            def sdpa():
                keys, values = _cat_prefix(inp)
                if group > 1 and not gqa:
                    keys, values = _repeat_kv(keys, group), _repeat_kv(values, group)
                kw = {"enable_gqa": True} if gqa else {}
                return F.scaled_dot_product_attention(inp.q, keys, values, is_causal=inp.causal, scale=inp.scale, **kw)

            out["sdpa"] = sdpa

    if "flex" in peers:
        why = env.flex_attention_status(device)
        if why:
            out["flex"] = why
        else:
            out["flex"] = _make_flex(inp, device)

    if "ptk-torch" in peers:
        def ptk_torch():
            return prefix_attention(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v,
                                    key_padding_mask=inp.key_padding_mask, causal=inp.causal, backend="torch")

        out["ptk-torch"] = ptk_torch

    if "ptk-triton" in peers:
        if device.type != "cuda":
            out["ptk-triton"] = "GPU only (the CPU interpreter is not a benchmark)"
        else:
            why = env.triton_status(device)
            if why:
                out["ptk-triton"] = why
            else:
                def ptk_triton():
                    return prefix_attention(inp.q, inp.k, inp.v, inp.prefix_k, inp.prefix_v,
                                            key_padding_mask=inp.key_padding_mask, causal=inp.causal,
                                            backend="triton")

                out["ptk-triton"] = ptk_triton
    return out


def _make_flex(inp: AttentionInputs, device: torch.device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask

        B, Hq, Sq, D = inp.q.shape
        Hkv, Sk = inp.k.shape[1], inp.k.shape[2]
        P = inp.prefix_k.shape[1]
        flex = _compiled_flex()
        block_mask = None
        if inp.key_padding_mask is not None or inp.causal:
            kpm = inp.key_padding_mask
            if kpm is None:
                kpm = torch.ones(B, Sk, dtype=torch.bool, device=device)
            keep = torch.cat([torch.ones(B, P, dtype=torch.bool, device=device), kpm], dim=1)
            offset = Sk - Sq
            causal = inp.causal

            def mask_mod(b, h, q_idx, kv_idx):
                ok = keep[b, kv_idx]
                if causal:
                    ok = ok & ((kv_idx < P) | (kv_idx - P <= q_idx + offset))
                return ok

            block_mask = create_block_mask(mask_mod, B, None, Sq, P + Sk, device=device)
        gqa = Hq != Hkv

        def flex_fn():
            keys, values = _cat_prefix(inp)
            return flex(inp.q, keys, values, block_mask=block_mask, scale=inp.scale, enable_gqa=gqa)

        return flex_fn
    except Exception as exc:  # pragma: no cover - GPU only
        return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def with_backward(fwd: Callable[[], torch.Tensor], inp: AttentionInputs) -> Callable[[], object]:
    """forward + backward to every input (q, k, v and the prefix parameters)."""
    leaves = inp.leaves

    def step():
        out = fwd()
        return torch.autograd.grad(out, leaves, inp.grad_out)

    return step


# ----------------------------------------------------------------------------- prompt embedding


def make_embedding_peers(case: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """Returns (peers, grad_fn_factory): peers is name -> callable or reason."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    V, E, B, S, P = (case[x] for x in ("V", "E", "B", "S", "P"))
    weight = (torch.randn(V, E, generator=g) * 0.02).to(device=device, dtype=dtype)  # frozen, as in prompt tuning
    prompt = (torch.randn(P, E, generator=g) * 0.02).to(device=device, dtype=dtype).requires_grad_(True)
    ids = torch.randint(0, V, (B, S), generator=g).to(device)
    grad_out = torch.randn(B, P + S, E, generator=g).to(device=device, dtype=dtype)

    peers: Dict[str, object] = {}

    def cat():
        return torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), F.embedding(ids, weight)], dim=1)

    peers["cat"] = cat
    peers["ptk-torch"] = lambda: prompt_embedding(ids, weight, prompt, backend="torch")
    if device.type != "cuda":
        peers["ptk-triton"] = "GPU only (the CPU interpreter is not a benchmark)"
    else:
        why = env.triton_status(device)
        peers["ptk-triton"] = why or (lambda: prompt_embedding(ids, weight, prompt, backend="triton"))

    def backward(fwd):
        def step():
            return torch.autograd.grad(fwd(), [prompt], grad_out)

        return step

    return peers, backward


EMBEDDING_PEER_ORDER = ["cat", "ptk-torch", "ptk-triton"]
EMBEDDING_PEER_LABELS = {"cat": "cat(prompt, F.embedding)", "ptk-torch": "ptkernels torch",
                         "ptk-triton": "ptkernels triton"}

"""The shapes: verify grids and the embedded bench configs.

A bench config is a plain JSON-able dict (``ptkernels bench --print-config`` shows one; ``--config
FILE.json`` runs your own):

    {"name": ..., "dtype": "float32" | "float16" | "bfloat16" | "auto",
     "timing": {"min_run_time": float}   (seconds of calls per measurement),
     "attention": [{"family", "B", "Hq", "Hkv", "S", "P", "D", "causal", "padding"}, ...],
     "prompt_embedding": [{"family", "V", "E", "B", "S", "P"}, ...]}

``padding`` is "none" or "random" (right padding, every example keeps at least half its tokens).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ----------------------------------------------------------------------------- verify


@dataclass(frozen=True)
class VerifyCase:
    B: int
    Hq: int
    Hkv: int
    Sq: int
    Sk: int
    P: int
    D: int
    prefix: str  # "none" | "shared" | "per_example" | "bank" (3 entries of lengths P, P/2, 1 read by index)
    padding: str  # "none" | "random" | "one" (every example keeps a single real key)
    causal: bool
    features: tuple = ()  # of "softcap" (2.0), "sinks" (per-head sink logits), "window" (a sliding window of 7),
    # "relative_bias" (T5's bucketed relative position bias, 32 buckets, causal buckets when causal)

    @property
    def name(self) -> str:
        heads = f"H{self.Hq}" if self.Hq == self.Hkv else f"H{self.Hq}/{self.Hkv}"
        seq = f"S{self.Sq}" if self.Sq == self.Sk else f"S{self.Sq}x{self.Sk}"
        kind = {"shared": "s", "per_example": "b", "bank": "bank"}.get(self.prefix, "")
        prefix = "P0" if self.prefix == "none" else f"P{self.P}{kind}"
        parts = [f"B{self.B}", heads, seq, prefix, f"D{self.D}"] + list(self.features)
        if self.padding != "none":
            parts.append(f"pad:{self.padding}")
        if self.causal:
            parts.append("causal")
        return " ".join(parts)


# Small grid for CI under Triton's interpreter: every feature at least once, tiny sizes.
_SMALL = [
    VerifyCase(2, 2, 2, 17, 17, 5, 16, "shared", "none", False),
    VerifyCase(2, 4, 2, 17, 17, 0, 16, "none", "random", True),
    VerifyCase(2, 4, 2, 9, 17, 3, 16, "per_example", "random", False),
    VerifyCase(1, 2, 2, 5, 19, 8, 40, "shared", "none", True),
    VerifyCase(2, 2, 1, 1, 1, 1, 16, "shared", "one", False),
    VerifyCase(2, 4, 1, 33, 33, 16, 32, "per_example", "random", True),
    VerifyCase(3, 4, 2, 17, 17, 9, 16, "bank", "random", True),
    VerifyCase(2, 4, 2, 19, 19, 5, 16, "shared", "random", True, ("softcap", "sinks", "window")),
    VerifyCase(2, 4, 2, 21, 21, 6, 16, "shared", "random", True, ("relative_bias",)),
    VerifyCase(2, 2, 2, 13, 13, 0, 16, "none", "random", False, ("relative_bias",)),
]


def _factorial(sizes):
    cases = []
    combos = itertools.product(("none", "shared", "per_example"), ("none", "random"), (False, True), (False, True))
    for i, (prefix, padding, causal, gqa) in enumerate(combos):
        S, P, D = sizes[i % len(sizes)]
        Hkv = 2
        Hq = 4 if gqa else 2
        cases.append(VerifyCase(2, Hq, Hkv, S, S, 0 if prefix == "none" else P, D, prefix, padding, causal))
    return cases


_DEFAULT = _SMALL + _factorial([(17, 1, 16), (33, 5, 40), (97, 16, 64), (113, 7, 32)])

_FULL = _DEFAULT + [
    VerifyCase(4, 8, 2, 256, 256, 128, 128, "shared", "random", True),
    VerifyCase(3, 6, 6, 113, 113, 64, 80, "per_example", "random", False),
    VerifyCase(2, 4, 4, 97, 200, 33, 64, "shared", "one", True),
    VerifyCase(2, 8, 1, 1, 300, 20, 128, "shared", "random", True),
    VerifyCase(2, 12, 12, 512, 512, 128, 64, "shared", "none", False),
    VerifyCase(1, 4, 4, 64, 64, 256, 96, "shared", "none", True),
]

VERIFY_GRIDS = {"small": _SMALL, "default": _DEFAULT, "full": _FULL}


@dataclass(frozen=True)
class EmbeddingCase:
    V: int
    E: int
    B: int
    S: int
    P: int
    prompt: str  # "shared" (P, E) | "per_example" (B, P, E)
    weight_grad: bool
    op: str = "prompt_embedding"  # or "virtual_token_embedding"

    @property
    def name(self) -> str:
        grad = "+dW" if self.weight_grad else ""
        return f"V{self.V} E{self.E} B{self.B} S{self.S} P{self.P}{'s' if self.prompt == 'shared' else 'b'}{grad}"


EMBEDDING_GRIDS = {
    "small": [
        EmbeddingCase(50, 16, 2, 7, 3, "shared", False),
        EmbeddingCase(50, 24, 2, 5, 4, "per_example", True),
        EmbeddingCase(50, 16, 2, 9, 3, "shared", True, op="virtual_token_embedding"),
    ],
}
EMBEDDING_GRIDS["default"] = EMBEDDING_GRIDS["small"] + [
    EmbeddingCase(1000, 96, 3, 33, 16, "shared", True),
    EmbeddingCase(1000, 80, 2, 1, 1, "per_example", False),
    EmbeddingCase(1000, 64, 4, 40, 12, "per_example", True, op="virtual_token_embedding"),
]
EMBEDDING_GRIDS["full"] = EMBEDDING_GRIDS["default"] + [
    EmbeddingCase(30522, 768, 8, 128, 20, "shared", False),
    EmbeddingCase(50257, 768, 4, 256, 64, "per_example", True),
]


# ----------------------------------------------------------------------------- bench configs


def _grid(family, H, D, seqs, prefixes, *, tokens=None, batch=None, causal, Hkv=None, padding="none"):
    rows = []
    for S in seqs:
        for P in prefixes:
            B = batch if batch is not None else max(1, tokens // S)
            rows.append(dict(family=family, B=B, Hq=H, Hkv=Hkv or H, S=S, P=P, D=D, causal=causal, padding=padding))
    return rows


CPU_DEFAULT = {
    # the op rows that follow the end-to-end headline of `ptkernels bench` on a CPU machine
    "name": "cpu-default",
    "dtype": "float32",
    "timing": {"min_run_time": 0.3},
    "attention": [
        dict(family="bert", B=8, Hq=12, Hkv=12, S=256, P=64, D=64, causal=False, padding="none"),
        dict(family="bert-padded", B=8, Hq=12, Hkv=12, S=256, P=64, D=64, causal=False, padding="random"),
        dict(family="gpt2-padded", B=8, Hq=12, Hkv=12, S=256, P=32, D=64, causal=True, padding="random"),
        dict(family="llama-gqa", B=4, Hq=16, Hkv=4, S=256, P=32, D=64, causal=True, padding="none"),
    ],
    "prompt_embedding": [
        dict(family="gpt2", V=50257, E=768, B=4, S=256, P=64),
    ],
}

GPU_DEFAULT = {
    "name": "gpu-default",
    "dtype": "auto",  # bfloat16 where supported, else float16
    "timing": {"min_run_time": 0.5},
    # BERT-base / GPT-2-small attention: H=12, D=64; B fills the GPU (B*S = 32k tokens).
    "attention": (
        _grid("bert", 12, 64, [128, 256, 512, 1024], [16, 64, 128, 256], tokens=32768, causal=False)
        + _grid("gpt2", 12, 64, [128, 256, 512, 1024], [16, 64, 128, 256], tokens=32768, causal=True)
        + _grid("bert-padded", 12, 64, [512], [64], tokens=32768, causal=False, padding="random")
        # Llama-style GQA (Llama-3-8B heads): Hq=32, Hkv=8, D=128.
        + _grid("llama-gqa", 32, 128, [512, 1024, 2048], [16, 256], tokens=16384, causal=True, Hkv=8)
    ),
    "prompt_embedding": [
        dict(family="bert", V=30522, E=768, B=64, S=512, P=20),
        dict(family="gpt2", V=50257, E=768, B=32, S=1024, P=64),
        dict(family="llama", V=128256, E=4096, B=8, S=2048, P=64),
    ],
}

# Issue 14's headline shape first (BERT-base heads, B=32, S=512, P=128: Triton against SDPA's flash
# backend on the concatenated keys without a mask), then the same with causal and padding, and one
# Llama-style GQA row: the op rows `benchmarks/gpu_check.sh` times inside its budget.
TARGET = {
    "name": "target",
    "dtype": "auto",
    "timing": {"min_run_time": 0.5},
    "attention": (
        _grid("bert", 12, 64, [512], [128], batch=32, causal=False)
        + _grid("gpt2", 12, 64, [512], [128], batch=32, causal=True)
        + _grid("bert-padded", 12, 64, [512], [128], batch=32, causal=False, padding="random")
        + _grid("llama-gqa", 32, 128, [1024], [256], batch=8, causal=True, Hkv=8)
    ),
    "prompt_embedding": [dict(family="bert", V=30522, E=768, B=32, S=512, P=20)],
}

QUICK = {
    "name": "quick",
    "dtype": "float32",
    "timing": {"min_run_time": 0.1},
    "attention": (
        _grid("bert", 2, 16, [16, 32], [4, 8], batch=2, causal=False)
        + [dict(family="gqa", B=1, Hq=4, Hkv=2, S=32, P=4, D=16, causal=True, padding="random")]
    ),
    "prompt_embedding": [dict(family="tiny", V=100, E=32, B=2, S=16, P=4)],
}

# Head dims 80 (Phi-2) and 96 (Phi-3-mini), which the kernels split as 64 + 16 / 32 channels
# (launch.split_head_dim): benchmarks/gpu_check.sh times them as they are and with
# PTKERNELS_SPLIT_HEAD_DIM=0 (padded to 128), side by side.
HEAD_DIM_SPLIT = {
    "name": "head-dim-split",
    "dtype": "auto",
    "timing": {"min_run_time": 0.3},
    "attention": (
        _grid("phi3", 32, 96, [1024], [64], batch=8, causal=True)
        + _grid("phi2", 32, 80, [1024], [64], batch=8, causal=True)
    ),
    "prompt_embedding": [],
}

CONFIGS = {"cpu": CPU_DEFAULT, "gpu": GPU_DEFAULT, "target": TARGET, "quick": QUICK, "split": HEAD_DIM_SPLIT}


def default_config(device: torch.device, quick: bool = False) -> dict:
    if quick:
        return QUICK
    return GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, **DTYPES}[name]


def attention_case_name(c: dict) -> str:
    heads = f"H{c['Hq']}" if c["Hq"] == c["Hkv"] else f"H{c['Hq']}/{c['Hkv']}"
    name = f"{c['family']} B{c['B']} {heads} S{c['S']} P{c['P']} D{c['D']}"
    if c.get("causal"):
        name += " causal"
    if c.get("padding", "none") != "none":
        name += " pad"
    return name


def embedding_case_name(c: dict) -> str:
    return f"{c['family']} V{c['V']} E{c['E']} B{c['B']} S{c['S']} P{c['P']}"


def describe_config(cfg: dict) -> str:
    n_att = len(cfg.get("attention", []))
    n_emb = len(cfg.get("prompt_embedding", []))
    return f"config {cfg.get('name', '?')}: {n_att} attention cases, {n_emb} prompt-embedding cases"


def config_from_env(device: torch.device) -> dict:
    """The config for the pytest-benchmark suite: $PTKERNELS_BENCH_CONFIG (cpu|gpu|quick|file.json) or the default."""
    import json
    import os

    name = os.environ.get("PTKERNELS_BENCH_CONFIG")
    if not name:
        return default_config(device)
    if name in CONFIGS:
        return CONFIGS[name]
    with open(name) as f:
        return json.load(f)

"""``ptkernels bench --model bert|gpt2|llama``: one PEFT prefix-tuning training step, unpatched vs patched.

A randomly initialised model (BERT-base, GPT-2-small, a small Llama; or tiny versions with --small,
the default on CPU) wrapped in a PEFT PREFIX_TUNING adapter. One step = forward, backward, AdamW step
on the trainable (prefix) parameters. Variants, on the same model object one after the other:

    peft          unpatched PEFT (transformers' default attention, sdpa)
    ptkernels     after ptkernels.patch(model)
    ptkernels+gc  patched, with gradient checkpointing (PEFT alone refuses this for prefix tuning)
"""

from __future__ import annotations

from typing import List

import torch

from . import env
from .timing import peak_memory_mib, time_fn

SIZES = {
    # model: (full-size shape on GPU, shape on CPU / --small)
    "bert": {"full": dict(B=32, S=256, P=32), "small": dict(B=4, S=64, P=8)},
    "gpt2": {"full": dict(B=16, S=512, P=32), "small": dict(B=4, S=64, P=8)},
    "llama": {"full": dict(B=8, S=1024, P=32), "small": dict(B=2, S=64, P=8)},
}


def build_model(name: str, size: str):
    import transformers as tf

    small = size == "small"
    if name == "bert":
        cfg = tf.BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                            vocab_size=2000) if small else tf.BertConfig()  # BERT-base
        return tf.BertForSequenceClassification(cfg), "SEQ_CLS", cfg
    if name == "gpt2":
        cfg = (tf.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=2000, bos_token_id=0, eos_token_id=0)
               if small else tf.GPT2Config())  # GPT-2 small
        return tf.GPT2LMHeadModel(cfg), "CAUSAL_LM", cfg
    if name == "llama":
        if small:
            cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=2000, max_position_embeddings=2048)
        else:  # a small Llama: 8 layers, GQA 16/4 heads of 64, 32k vocab
            cfg = tf.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                 max_position_embeddings=4096)
        return tf.LlamaForCausalLM(cfg), "CAUSAL_LM", cfg
    raise ValueError(f"unknown model {name!r}; choose bert, gpt2 or llama")


def run_e2e(name: str, device: torch.device, size: str = "auto", steps: int = 0, backend: str = "auto",
            progress: bool = True, shape: dict = None) -> List[dict]:
    try:
        import peft
    except Exception as exc:
        print(f"note: end-to-end mode skipped: peft is not importable ({exc})")
        return []
    patch, unpatch, why = env.integrations_module()
    size = ("full" if device.type == "cuda" else "small") if size == "auto" else size
    shape = dict(shape or SIZES[name][size])
    B, S, P = shape["B"], shape["S"], shape["P"]
    steps = steps or (20 if device.type == "cuda" else 3)
    torch.manual_seed(0)
    model, task, cfg = build_model(name, size)
    model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    model.to(device).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones(B, S, dtype=torch.long, device=device)}
    batch["labels"] = torch.randint(0, 2, (B,), generator=g).to(device) if task == "SEQ_CLS" else ids
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    amp = device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    def step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    n_params = sum(p.numel() for p in model.parameters())
    base = dict(section="e2e", model=name, family=name, B=B, S=S, P=P, size=size,
                dtype=str(amp_dtype).replace("torch.", "") + " autocast" if amp else "float32",
                params_millions=round(n_params / 1e6, 1), mode="train step")
    variants = [("peft", None), ("ptkernels", "patch"), ("ptkernels+gc", "gc")]
    records = []
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm
            import sys

            bar = tqdm(total=len(variants), desc=f"e2e {name}", unit="variant", file=sys.stderr, leave=False,
                       disable=None)
        except Exception:
            bar = None
    for variant, action in variants:
        rec = dict(base, variant=variant, peer=variant, status="ok", note="", median_ms=None, peak_mem_mib=None,
                   steps_per_s=None, tokens_per_s=None)
        try:
            if action is not None and patch is None:
                raise RuntimeError(why)
            if action == "patch":
                patch(model, backend=backend)
            elif action == "gc":
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            t = time_fn(step, device, warmup=2, reps=steps, min_reps=min(steps, 3), max_time_s=60.0)
            rec.update(median_ms=t.median_ms, steps_per_s=1000.0 / t.median_ms,
                       tokens_per_s=B * S * 1000.0 / t.median_ms, reps=t.reps,
                       peak_mem_mib=peak_memory_mib(step, device))
        except Exception as exc:
            rec.update(status="error" if patch is not None else "n/a",
                       note=(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")[:160])
            opt.zero_grad(set_to_none=True)
        records.append(rec)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    ref = records[0]
    for r in records:
        r["vs"] = "peft"
        r["speedup"] = (ref["median_ms"] / r["median_ms"]) if (r["status"] == "ok" and ref["status"] == "ok") else None
    try:
        if unpatch is not None:
            unpatch(model)
    except Exception:
        pass
    return records

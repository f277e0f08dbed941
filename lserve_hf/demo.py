"""`lserve-hf demo`: passkey retrieval on the embedded model, dense vs LServe side by side."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .heads import find_shipped_pattern
from .config import LServeConfig
from .embedded import load_embedded_model
from .passkey import answer_matches, passkey_prompt
from .patch import patch_model, unpatch_model


def dense_kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers
               for t in (layer.keys, layer.values) if t is not None)


def _run(model, tok, prompt, max_new_tokens):
    x = tok(prompt.text, return_tensors="pt", add_special_tokens=False).to(model.device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**x, max_new_tokens=max_new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    seconds = time.perf_counter() - t0
    answer = tok.decode(out.sequences[0, x.input_ids.shape[1]:], skip_special_tokens=True)
    cache = out.past_key_values
    kv = cache.kv_bytes() if hasattr(cache, "kv_bytes") else dense_kv_bytes(cache)
    return answer.strip(), seconds, kv


def demo_config(model) -> tuple[LServeConfig, str]:
    """Settings scaled to a 135M model with an 8K context: budget 512 instead of 4096, so that a
    ~3.5K prompt really runs the sparse paths."""
    small = dict(token_budget=512, prefill_local=1024, decode_local=256)
    if find_shipped_pattern(model.config) is not None:
        return LServeConfig(streaming_sparsity=0.5, **small), "50% streaming heads (shipped pattern)"
    return LServeConfig(streaming_sparsity=0.0, **small), "page selection only (no head pattern shipped yet)"


def run_demo(n_tokens: int = 3500, depths=(0.3, 0.5, 0.7), max_new_tokens: int = 8, device=None) -> bool:
    model, tok = load_embedded_model(device=device)
    config, what = demo_config(model)
    prompts = [passkey_prompt(tok, n_tokens, d, chat=False) for d in depths]
    print(f"Passkey retrieval, SmolLM2-135M-Instruct, ~{prompts[0].n_tokens} tokens, "
          f"LServe: {what}, budget {config.token_budget}, sink {config.decode_sink}, local "
          f"{config.prefill_local} (prefill) / {config.decode_local} (decode)")
    rows = []
    for p in tqdm(prompts, desc="passkey prompts"):
        unpatch_model(model)
        dense = _run(model, tok, p, max_new_tokens)
        patch_model(model, config)
        sparse = _run(model, tok, p, max_new_tokens)
        rows.append((p, dense, sparse))
    unpatch_model(model)
    print(f"\n{'depth':>5} {'passkey':>7} | {'dense answer':<22} {'s':>5} {'KV MiB':>7} | "
          f"{'LServe answer':<22} {'s':>5} {'KV MiB':>7}")
    ok = True
    for p, d, s in rows:
        mark = lambda a: ("✓ " if answer_matches(a, p.passkey) else "✗ ") + a[:20]  # noqa: E731
        print(f"{p.depth:>5.2f} {p.passkey:>7} | {mark(d[0]):<22} {d[1]:>5.1f} {d[2] / 2**20:>7.1f} | "
              f"{mark(s[0]):<22} {s[1]:>5.1f} {s[2] / 2**20:>7.1f}")
        ok &= answer_matches(d[0], p.passkey) == answer_matches(s[0], p.passkey)
    dense_kv = sum(r[1][2] for r in rows) / len(rows)
    sparse_kv = sum(r[2][2] for r in rows) / len(rows)
    print(f"\nKV cache: LServe holds {sparse_kv / dense_kv:.0%} of the dense cache's bytes. "
          f"Same answers as dense: {'yes' if ok else 'NO'}")
    return ok

"""`lserve-hf demo`: passkey retrieval on the embedded model, dense vs LServe side by side: the
answers, prefill time, decode speed and KV memory, and a plot of the last two against context
length."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .cache import LServeCache
from .embedded import load_embedded_model
from .memory import kv_bytes
from .passkey import PasskeyPrompt, answer_matches, passkey_prompt
from .patch import patch_model, unpatch_model

MiB = 2**20


@dataclass
class Run:
    """One prompt through one method."""

    prompt: PasskeyPrompt
    method: str                  # "dense" or "LServe"
    answer: str
    prefill_s: float
    decode_tok_s: float          # 1 / the median decode step
    kv_bytes: int                # the tokens the cache stores (lserve_hf.kv_bytes)
    peak_bytes: int | None       # peak GPU memory allocated during the run; None on CPU

    @property
    def correct(self) -> bool:
        return answer_matches(self.answer, self.prompt.passkey)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model, tok, prompt: PasskeyPrompt, new_tokens: int) -> tuple[str, float, float, int, int | None]:
    """Greedy answer, prefill seconds, decode tokens/s, KV bytes and peak GPU bytes of one prompt.

    The prefill (one forward over the prompt) and the decode steps (one token each) are timed
    apart, as ``generate()`` runs them: prefill time grows with the prompt, decode time is what
    each further token costs. Decode speed is taken from the median step, so that the eager step
    and the CUDA-graph captures of the first steps do not count."""
    device = model.device
    x = tok(prompt.text, return_tensors="pt", add_special_tokens=False).to(device)
    n = x.input_ids.shape[1]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # as generate() does: a patched model's cache is sized for prompt + new tokens up front, so
    # that no store grows while decoding
    extra = {"past_key_values": LServeCache(model, max_length=n + new_tokens)} \
        if getattr(model, "_lserve", None) is not None else {}
    _sync(device)
    t0 = time.perf_counter()
    out = model(**x, use_cache=True, logits_to_keep=1, **extra)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        steps.append(time.perf_counter() - t0)
        tokens.append(token)
    answer = tok.decode(torch.cat(tokens, dim=1)[0], skip_special_tokens=True).strip()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return answer, prefill, 1.0 / statistics.median(steps), kv_bytes(cache), peak


def run_demo(n_tokens: int = 6000, depths=(0.25, 0.75), plot_lengths=(2000, 4000), new_tokens: int = 8,
             plot: str | None = "lserve_demo.png", device=None, model=None, tokenizer=None) -> list[Run]:
    """Passkey prompts through the dense and the patched model, printed as they run and then side by
    side; returns every run. ``n_tokens`` at each of ``depths`` is the long prompt;
    ``plot_lengths`` (depth 0.5) add the shorter points of the plot against context length.
    ``model``/``tokenizer``: an embedded model already loaded (default: load it)."""
    if model is None:
        print("Loading the embedded SmolLM2-135M-Instruct (de-quantising its GGUF)...", flush=True)
        model, tokenizer = load_embedded_model(device=device)
    patch_model(model)       # its defaults for this model, said below
    cfg, pattern = model._lserve.config, model._lserve.streaming
    unpatch_model(model)
    if cfg.selector == "drift":
        kept = (f"each query head choosing them afresh when its query drifts (cosine under {cfg.selector_drift:g}) "
                f"and at least every {cfg.selector_max_age} steps")
    else:
        kept = f"chosen afresh every {cfg.selector_interval} steps"
    print(f"LServe: patch_model(model) with its defaults for a model of {model.config.max_position_embeddings} "
          f"tokens: {int(pattern.sum())} of {pattern.numel()} KV heads stream (streaming_sparsity="
          f"{cfg.streaming_sparsity:g}, the shipped head pattern), sink/local {cfg.prefill_sink}/"
          f"{cfg.prefill_local} at prefill and {cfg.decode_sink}/{cfg.decode_local} at decode; the "
          f"others read {cfg.token_budget} tokens of pages per step (token_budget), {kept} "
          f"(selector={cfg.selector!r}).", flush=True)
    prompts = [sized_prompt(tokenizer, L, 0.5) for L in plot_lengths]
    prompts = sorted(prompts + [sized_prompt(tokenizer, n_tokens, d) for d in depths],
                     key=lambda p: (p.n_tokens, p.depth))
    # an untimed run per method first: first calls allocate, and on a GPU compile the kernels and
    # capture both decode graphs (a step that selects every head afresh, one that may keep
    # selections); the shortest prompt that reaches the sparse paths suffices
    warm = sized_prompt(tokenizer, cfg.prefill_sink + cfg.prefill_local + cfg.page_size, 0.5)
    for method in tqdm(("dense", "LServe"), desc="warm-up", unit="run", dynamic_ncols=True):
        _set(model, method)
        measure(model, tokenizer, warm, cfg.refresh_interval + 2)
    runs = []
    bar = tqdm([(p, m) for p in prompts for m in ("dense", "LServe")], desc="demo", unit="run",
               dynamic_ncols=True)
    for p, method in bar:
        bar.set_postfix_str(f"{method}, {p.n_tokens} tokens, pass key at depth {p.depth:g}")
        _set(model, method)
        runs.append(Run(p, method, *measure(model, tokenizer, p, new_tokens)))
        r = runs[-1]
        bar.write(f"  {method:<6} {p.n_tokens:>5} tokens, depth {p.depth:<4g}: {'✓' if r.correct else '✗'} "
                  f"{r.answer[:24]!r}, prefill {r.prefill_s:.1f} s, decode {r.decode_tok_s:.1f} tokens/s")
    unpatch_model(model)
    bar.close()
    report(runs, model.device)
    if plot:
        write_plot(runs, plot, model.device)
    return runs


def sized_prompt(tok, n_tokens: int, depth: float) -> PasskeyPrompt:
    """A passkey prompt of about ``n_tokens`` tokens: ``passkey_prompt`` sizes its filler by one
    repetition's tokens, which run a few percent long (repetitions share tokens at their seams),
    so ask again for the tokens it fell short by."""
    p = passkey_prompt(tok, n_tokens, depth, chat=False)
    return passkey_prompt(tok, 2 * n_tokens - p.n_tokens, depth, chat=False)


def _set(model, method):
    if method == "dense":
        unpatch_model(model)
    elif getattr(model, "_lserve", None) is None:
        patch_model(model)


def report(runs: list[Run], device) -> None:
    gpu = device.type == "cuda"
    peak = f"{'peak GPU MiB':>13}" if gpu else ""
    print(f"\n{'tokens':>6} {'depth':>5} {'pass key':>8}  {'method':<6} {'answer':<26} {'prefill s':>9} "
          f"{'decode tok/s':>12} {'KV MiB':>7}{peak}")
    for r in runs:
        mark = ("✓ " if r.correct else "✗ ") + r.answer[:24]
        first = r.method == "dense"
        print(f"{r.prompt.n_tokens if first else '':>6} {f'{r.prompt.depth:g}' if first else '':>5} "
              f"{r.prompt.passkey if first else '':>8}  {r.method:<6} {mark:<26} {r.prefill_s:>9.2f} "
              f"{r.decode_tok_s:>12.1f} {r.kv_bytes / MiB:>7.1f}"
              + (f"{r.peak_bytes / MiB:>13.0f}" if gpu else ""))
    longest = max(r.prompt.n_tokens for r in runs)
    dense, lserve = ([r for r in runs if r.method == m and r.prompt.n_tokens == longest]
                     for m in ("dense", "LServe"))

    def mean(rs, key):
        return statistics.mean(getattr(r, key) for r in rs)

    kv_d, kv_s = mean(dense, "kv_bytes"), mean(lserve, "kv_bytes")
    print(f"\nAt {longest} tokens: LServe's KV cache holds {kv_s / MiB:.0f} MiB, dense {kv_d / MiB:.0f} MiB "
          f"({1 - kv_s / kv_d:.0%} less; KV bytes of the tokens stored, lserve_hf.kv_bytes).")
    pre_d, pre_s = mean(dense, "prefill_s"), mean(lserve, "prefill_s")
    dec_d, dec_s = mean(dense, "decode_tok_s"), mean(lserve, "decode_tok_s")
    if gpu:
        print(f"Speed-up on {torch.cuda.get_device_name(device)}: prefill {pre_d / pre_s:.2f}x "
              f"({pre_s:.2f} s vs {pre_d:.2f} s), decode {dec_s / dec_d:.2f}x ({dec_s:.0f} vs {dec_d:.0f} "
              f"tokens/s); peak GPU memory {mean(lserve, 'peak_bytes') / MiB:.0f} MiB vs "
              f"{mean(dense, 'peak_bytes') / MiB:.0f} MiB.")
    else:
        print(f"Times on this CPU ({_threads()}), LServe vs dense: prefill {pre_s:.1f} s "
              f"vs {pre_d:.1f} s, decode {dec_s:.1f} vs {dec_d:.1f} tokens/s. On CPU LServe runs its torch "
              "reference, not its Triton kernels (they need a GPU), so these times say little about its "
              "speed: what it saves here is memory. Its speed-ups are measured on GPUs (BENCHMARKS.md; "
              "lserve-hf demo --device cuda).")
        print("Peak memory is not measured on CPU (tracemalloc does not see torch's allocations): "
              "KV MiB is the cache's bytes alone.")
    found = {m: sum(r.correct for r in runs if r.method == m) for m in ("dense", "LServe")}
    print(f"Pass keys found: dense {found['dense']} of {len(runs) // 2}, LServe {found['LServe']} of "
          f"{len(runs) // 2} (a few prompts: `lserve-hf eval` measures accuracy over many, EVAL.md).")


def _threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' * (n > 1)}"


def write_plot(runs: list[Run], path: str, device) -> None:
    """KV memory and decode time per token against context length, dense and LServe."""
    from .plotting import new_figure

    try:
        fig = new_figure("the plot", figsize=(9, 3.6))
    except ImportError as e:
        print(f"No plot: {e}.")
        return
    axes = fig.subplots(1, 2)
    for method, style in (("dense", dict(color="0.4", linestyle="--")), ("LServe", dict(color="tab:blue"))):
        by_length = {}
        for r in runs:
            if r.method == method:
                by_length.setdefault(r.prompt.n_tokens, []).append(r)
        x = sorted(by_length)
        kv = [statistics.mean(r.kv_bytes for r in by_length[n]) / MiB for n in x]
        ms = [1e3 / statistics.mean(r.decode_tok_s for r in by_length[n]) for n in x]
        axes[0].plot(x, kv, marker="o", label=method, **style)
        axes[1].plot(x, ms, marker="o", label=method, **style)
    axes[0].set_ylabel("KV cache (MiB)")
    axes[1].set_ylabel("decode time per token (ms)")
    for ax in axes:
        ax.set_xlabel("context length (tokens)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {_threads()}, torch reference"
    fig.suptitle(f"SmolLM2-135M-Instruct, dense vs LServe ({where})", fontsize=10)
    fig.savefig(path, dpi=110)
    print(f"Plot: {os.path.abspath(path)}")

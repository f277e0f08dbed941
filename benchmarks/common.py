"""Helpers shared by the kernel benchmark scripts (bench_kernels, tune_kernels, profile_decode,
profile_prefill): the Llama-3-8B attention shapes, the GPU check, timing (``do_bench`` medians
and CUDA-graph replays), the error metric, and the decode inputs and calls.

Shapes: 32 query heads, 8 KV heads, D=128, bf16, batch 1; decode with a token budget of 4096,
pages of 64 tokens, logical pages of 16, a selector interval of 4.
"""

from __future__ import annotations

import datetime
import json
import math
import sys

import torch

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
DTYPE = torch.bfloat16
PREFILL_SINK = 128
DECODE_SINK, DECODE_LOCAL = 128, 256
PAGE, LOGICAL, BUDGET, INTERVAL = 64, 16, 4096, 4
N_SELECT = BUDGET // PAGE
SCALE = D ** -0.5
DEVICE = "cuda"
ROTATE = 4  # decode input sets cycled through (distinct "layers")


def gpu_missing(prog: str) -> bool:
    """True (after saying so in one line on stderr) when there is no CUDA GPU to run ``prog``;
    the caller then exits with status 2."""
    if torch.cuda.is_available():
        return False
    print(f"{prog} needs a CUDA GPU (none found); nothing was run", file=sys.stderr)
    return True


def bench(fn, rep=100):
    """Median ms of ``fn`` (``triton.testing.do_bench``)."""
    import triton.testing
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_time(fn, n_inner):
    """Median ms of one of the n_inner calls that ``fn`` makes, replayed from a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    return bench(g.replay) / n_inner


def environment():
    """What a benchmark's JSON records about the run: GPU, date, torch and Triton versions."""
    import triton

    return {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now().isoformat(),
            "torch": torch.__version__, "triton": triton.__version__}


def print_checks(checks):
    print("\nchecks:")
    for c in checks:
        print("  ", json.dumps(c))


def save_json(path, result):
    """Write ``result`` to ``path`` (``--out``), NaN figures as null; no path: nothing."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1,
                      default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)


def rel(a, b):
    """(relative norm error, max abs error) of a against b."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item(), (a - b).abs().max().item()


def streaming_mask(frac, hkv=HKV):
    """KV heads that stream: round(hkv * frac) of them, alternating with retrieval heads (what
    the calibrated patterns look like)."""
    n = round(hkv * frac)
    s = torch.zeros(hkv, dtype=torch.bool)
    s[torch.linspace(0, hkv - 1, n).round().long()] = True if n else False
    return s


def prefill_inputs(n, device, hq=None, hkv=None):
    """Random q ``[1, hq, n, D]``, k, v ``[1, hkv, n, D]`` (default: all HQ / HKV heads) and an
    output buffer like q."""
    hq, hkv = hq or HQ, hkv or HKV
    q = torch.randn(1, hq, n, D, device=device, dtype=DTYPE)
    k = torch.randn(1, hkv, n, D, device=device, dtype=DTYPE)
    v = torch.randn(1, hkv, n, D, device=device, dtype=DTYPE)
    return q, k, v, torch.empty_like(q)


def decode_sets(n, frac, device):
    """ROTATE independent layers of decode inputs for a context of n tokens."""
    from lserve_hf.kernels import build_page_summaries

    streaming = streaming_mask(frac)
    hs = int(streaming.sum())
    hr = HKV - hs
    T = -(-n // PAGE) * PAGE
    sets = []
    for _ in range(ROTATE):
        k = torch.randn(1, HKV, T, D, device=device, dtype=DTYPE)
        v = torch.randn(1, HKV, T, D, device=device, dtype=DTYPE)
        q = torch.randn(1, HKV, G, D, device=device, dtype=DTYPE)
        lengths = torch.full((1,), n, device=device, dtype=torch.int32)
        pool_k, pool_v = k[:, hs:], v[:, hs:]          # retrieval heads: the full cache
        kmax, kmin = build_page_summaries(pool_k, lengths, LOGICAL)
        sets.append(dict(
            k=k, v=v, q_full=q.reshape(1, HQ, 1, D), lengths=lengths,
            q_stream=q[:, :hs].contiguous(), q_retr=q[:, hs:].contiguous(),
            sink_k=torch.randn(1, hs, DECODE_SINK, D, device=device, dtype=DTYPE),
            sink_v=torch.randn(1, hs, DECODE_SINK, D, device=device, dtype=DTYPE),
            ring_k=torch.randn(1, hs, DECODE_LOCAL, D, device=device, dtype=DTYPE),
            ring_v=torch.randn(1, hs, DECODE_LOCAL, D, device=device, dtype=DTYPE),
            pool_k=pool_k, pool_v=pool_v, kmax=kmax, kmin=kmin,
            pages=torch.zeros(1, hr, G, N_SELECT, device=device, dtype=torch.int64),
            out_s=torch.empty(1, hs, G, D, device=device, dtype=DTYPE),
            out_r=torch.empty(1, hr, G, D, device=device, dtype=DTYPE),
            new_k=torch.randn(1, hr, D, device=device, dtype=DTYPE),
            pos=torch.full((1,), n - 1, device=device, dtype=torch.int64)))
    return sets


def select(s, plan=None, n_select=None):
    """The page selection (``n_select`` pages, default the budget's) of decode input set ``s``."""
    from lserve_hf.kernels import select_pages

    return select_pages(s["q_retr"], s["kmax"], s["kmin"], s["lengths"], PAGE, LOGICAL,
                        n_select or N_SELECT, plan=plan)


def decode(s, pages=None, plan=None, into_buffers=True):
    """The sparse decode of decode input set ``s`` over ``pages`` (default: ``s["pages"]``),
    written into the set's output buffers unless ``into_buffers`` is False."""
    from lserve_hf.kernels import sparse_paged_decode

    out = dict(out_stream=s["out_s"], out_retr=s["out_r"]) if into_buffers else {}
    return sparse_paged_decode(s["q_stream"], s["sink_k"], s["sink_v"], s["ring_k"], s["ring_v"],
                               s["q_retr"], s["pool_k"], s["pool_v"],
                               s["pages"] if pages is None else pages, s["lengths"], DECODE_SINK,
                               DECODE_LOCAL, PAGE, SCALE, plan=plan, **out)

"""The torch reference against brute force written from the spec, element by element."""

import math

import pytest
import torch

from lserve_hf import reference
from lserve_hf.streaming import fill_sink_and_ring


def brute_prefill(q, k, v, streaming, sink, local, q_offset, kv_start, scale, window=None):
    B, Hq, S, D = q.shape
    Hkv, N = k.shape[1], k.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, S, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            kh = h // G
            for i in range(S):
                qp = q_offset + i
                keys = [j for j in range(N) if kv_start[b] <= j <= qp and
                        (window is None or qp - j < window) and
                        (not streaming[kh] or j - kv_start[b] < sink or qp - j < local)]
                if not keys:
                    continue
                s = torch.stack([q[b, h, i].double() @ k[b, kh, j].double() * scale for j in keys])
                p = torch.softmax(s, 0)
                out[b, h, i] = sum(p[n] * v[b, kh, j].double() for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("G", [1, 4])
def test_prefill_matches_brute_force(G):
    g = torch.Generator().manual_seed(G)
    B, Hkv, S, N, D = 2, 2, 7, 19, 8
    q = torch.randn(B, Hkv * G, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    streaming = torch.tensor([True, False])
    kv_start = torch.tensor([0, 3])
    out = reference.prefill_attention(q, k, v, streaming, sink=3, local=4, q_offset=N - S,
                                      kv_start=kv_start, scale=0.3, query_block=3)
    ref = brute_prefill(q, k, v, streaming, 3, 4, N - S, kv_start, 0.3)
    assert torch.allclose(out, ref, atol=1e-12)


def brute_select(q, kmax, kmin, lengths, page, lpage, n_select):
    B, Hkv, G, D = q.shape
    out = torch.empty(B, Hkv, G, n_select, dtype=torch.long)
    for b in range(B):
        n_pages = math.ceil(int(lengths[b]) / page)
        n_logical = math.ceil(int(lengths[b]) / lpage)
        for h in range(Hkv):
            for gq in range(G):
                logical = [sum(max(float(q[b, h, gq, c] * kmax[b, h, j, c]), float(q[b, h, gq, c] * kmin[b, h, j, c]))
                               for c in range(D)) for j in range(n_logical)]
                phys = [max(logical[p * (page // lpage):(p + 1) * (page // lpage)]) for p in range(n_pages)]
                ranked = sorted(range(n_pages - 1), key=lambda p: (-phys[p], p))
                chosen = [n_pages - 1] + ranked[:min(n_select, n_pages) - 1]
                chosen += list(range(n_pages, n_pages + n_select - len(chosen)))
                out[b, h, gq] = torch.tensor(chosen)
    return out


def test_selection_matches_brute_force_with_partial_last_page_and_ties():
    g = torch.Generator().manual_seed(3)
    B, Hkv, G, D, page, lpage, T = 2, 2, 3, 4, 8, 2, 64
    lengths = torch.tensor([61, 29])                  # partial last pages, different per row
    # small integers: exact sums, so equal scores really tie
    keys = torch.randint(-2, 3, (B, Hkv, T, D), generator=g).double()
    q = torch.randint(-1, 2, (B, Hkv, G, D), generator=g).double()
    kmax, kmin = reference.page_summaries(keys, lengths, lpage)
    for n_select in (3, 5, 9):
        got = reference.select_pages(q, kmax, kmin, lengths, page, lpage, n_select)
        assert torch.equal(got, brute_select(q, kmax, kmin, lengths, page, lpage, n_select))


def test_summaries_ignore_tokens_past_the_length():
    keys = torch.randn(1, 1, 16, 3, dtype=torch.float64)
    kmax, kmin = reference.page_summaries(keys, torch.tensor([6]), 4)
    assert torch.equal(kmax[0, 0, 0], keys[0, 0, :4].amax(0)) and torch.equal(kmin[0, 0, 1], keys[0, 0, 4:6].amin(0))
    assert torch.isinf(kmax[0, 0, 2:]).all() and (kmax[0, 0, 2:] < 0).all() and (kmin[0, 0, 2:] > 0).all()


@pytest.mark.parametrize("length", [3, 9, 23])
def test_streaming_decode_reads_sink_and_local_window(length):
    g = torch.Generator().manual_seed(length)
    sink, local, D, G = 4, 6, 8, 2
    keys = torch.randn(1, 1, length, D, generator=g, dtype=torch.float64)
    vals = torch.randn(1, 1, length, D, generator=g, dtype=torch.float64)
    q = torch.randn(1, 1, G, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([length])
    sk, rk = fill_sink_and_ring(keys, lengths, sink, local)
    sv, rv = fill_sink_and_ring(vals, lengths, sink, local)
    out = reference.streaming_decode(q, sk, sv, rk, rv, lengths, sink, local, 0.5)
    seen = sorted(set(range(min(sink, length))) | set(range(max(0, length - local), length)))
    s = torch.einsum("gd,nd->gn", q[0, 0], keys[0, 0, seen]) * 0.5
    ref = torch.softmax(s, -1) @ vals[0, 0, seen]
    assert torch.allclose(out[0, 0], ref, atol=1e-12)


def test_paged_decode_reads_only_listed_pages():
    g = torch.Generator().manual_seed(5)
    page, D = 4, 8
    pool_k = torch.randn(1, 1, 24, D, generator=g, dtype=torch.float64)
    pool_v = torch.randn(1, 1, 24, D, generator=g, dtype=torch.float64)
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)
    lengths = torch.tensor([22])
    pages = torch.tensor([[[[5, 1, -1, 9]]]])          # -1 and 9 (past the pool) are empty slots
    poisoned_k, poisoned_v = pool_k.clone(), pool_v.clone()
    for p in (0, 2, 3, 4):
        poisoned_k[..., p * page:(p + 1) * page, :] = float("nan")
        poisoned_v[..., p * page:(p + 1) * page, :] = float("nan")
    poisoned_k[..., 22:, :] = float("nan")             # past the length inside the last page
    out = reference.paged_decode(q, poisoned_k, poisoned_v, pages, lengths, page, 0.25)
    seen = list(range(20, 22)) + list(range(4, 8))
    s = q[0, 0, 0] @ pool_k[0, 0, seen].T * 0.25
    assert torch.allclose(out[0, 0, 0], torch.softmax(s, -1) @ pool_v[0, 0, seen], atol=1e-12)


@pytest.mark.parametrize("G, streaming, kv_start, q_offset, window, N", [
    (1, [True, False], None, 0, None, 29),     # dense heads: one causal SDPA call
    (4, [False, False], None, 0, None, 29),
    (4, [True, True], [0, 5], 0, None, 29),
    (2, [True, False], [2, 0], 6, 7, 29),       # a chunk at an offset, Mistral's window
    (2, [True, True], [0, 3], 20, None, 61),    # sink and local band far apart: two key slices
])
def test_prefill_regimes_match_brute_force(G, streaming, kv_start, q_offset, window, N):
    """The reference's block-wise prefill (each query block against the keys it can reach) in
    every regime the serving path sends it, element for element against brute force."""
    g = torch.Generator().manual_seed(G + N)
    B, Hkv, D = 2, 2, 16
    S = N - q_offset
    q = torch.randn(B, Hkv * G, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
    streams = torch.tensor(streaming)
    ks = torch.tensor(kv_start) if kv_start else torch.zeros(B, dtype=torch.long)
    got = reference.prefill_attention(q, k, v, streams, 3, 5, q_offset=q_offset,
                                      kv_start=ks if kv_start else None, scale=0.2,
                                      sliding_window=window, query_block=8)
    want = brute_prefill(q, k, v, streams, 3, 5, q_offset, ks, 0.2, window)
    assert torch.allclose(got, want, atol=1e-10)


@pytest.mark.parametrize("q_offset", [0, 9])
def test_prefill_masks_shared_through_the_memo_match_brute_force(q_offset):
    """Two layers through one forward's memo: streaming blocks past the sink share one mask per
    block length (kept additive), heads of a kind that do not sit side by side are gathered; each
    layer still equals brute force."""
    g = torch.Generator().manual_seed(q_offset)
    B, Hkv, G, D, N = 1, 3, 2, 16, 61
    S = N - q_offset
    streams = torch.tensor([True, False, True])
    memo = {}
    for layer in range(2):
        q = torch.randn(B, Hkv * G, S, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
        v = torch.randn(B, Hkv, N, D, generator=g, dtype=torch.float64)
        got = reference.prefill_attention(q, k, v, streams, 3, 5, q_offset=q_offset, scale=0.2,
                                          query_block=8, memo=memo)
        want = brute_prefill(q, k, v, streams, 3, 5, q_offset, torch.zeros(B, dtype=torch.long), 0.2)
        assert torch.allclose(got, want, atol=1e-10), layer
    assert any(key[0] == "band" for key in memo)     # the shared masks were used

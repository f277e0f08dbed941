"""A prompt of a new length must not stall on a Triton compile: every kernel argument that changes
with the context length or the batch is a runtime value, neither a constexpr nor specialised."""

import inspect

import pytest
import torch

pytest.importorskip("triton")

import importlib  # noqa: E402

# the modules (the package re-exports functions of the same names)
MODULES = tuple(importlib.import_module(f"lserve_hf.kernels.{m}")
                for m in ("block_sparse_prefill", "page_selector", "page_summary", "sparse_decode",
                          "rms_norm", "swiglu"))


def _jit_parts(fn):
    """(python function, do_not_specialize names) of a Triton kernel, compiled or interpreted."""
    if hasattr(fn, "kwargs"):                       # the CPU interpreter's InterpretedFunction
        names = fn.kwargs.get("do_not_specialize") or []
        return fn.fn, [fn.arg_names[i] if isinstance(i, int) else i for i in names]
    return fn.fn, [fn.arg_names[i] if isinstance(i, int) else i for i in fn.do_not_specialize]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_length_arguments_are_runtime_values(module):
    assert module.LENGTH_ARGS, module.__name__
    for name, args in module.LENGTH_ARGS.items():
        py, unspecialised = _jit_parts(getattr(module, name))
        params = inspect.signature(py).parameters
        for a in args:
            assert a in params, (name, a)
            assert "constexpr" not in str(params[a].annotation), (name, a)
            assert a in unspecialised, (name, a)


def test_every_length_like_kernel_argument_is_listed():
    """The kernels' integer arguments named like a length, a count of pages or a row stride of a
    tensor whose size follows the context are all in LENGTH_ARGS."""
    length_like = ("Sq", "Skv", "q_offset", "n_pool_pages", "NL", "P", "n_keys", "B")
    for module in MODULES:
        for name in module.LENGTH_ARGS:
            py, unspecialised = _jit_parts(getattr(module, name))
            for a in inspect.signature(py).parameters:
                if a in length_like:
                    assert a in unspecialised, (module.__name__, name, a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_three_prompt_lengths_compile_each_kernel_once():
    """generate() at three prompt lengths of different residues mod 16 (and a batch of 2) compiles
    each kernel of the decode path and the prefill once."""
    from conftest import tiny_llama
    from lserve_hf import LServeConfig, patch_model

    model = tiny_llama(layers=2, heads=8, kv_heads=2, head_dim=64, vocab=500).cuda()
    patch_model(model, LServeConfig(streaming_sparsity=0.5, token_budget=256, prefill_local=256,
                                    decode_local=128, decode_sink=32, prefill_sink=32),
                head_pattern=torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    counts = []
    for n in (1000, 1333, 1601):
        ids = torch.randint(1, 500, (1, n), device="cuda")
        with torch.no_grad():
            model.generate(ids, max_new_tokens=12, do_sample=False)
        counts.append({(m.__name__, k): sum(len(c[0]) for c in getattr(m, k).device_caches.values())
                       for m in MODULES for k in m.LENGTH_ARGS})
    assert counts[1] == counts[2] == counts[0], counts


def _compiled() -> dict:
    """Compiled variants of every Triton kernel of the package, by (module, kernel)."""
    mods = MODULES + tuple(importlib.import_module(f"lserve_hf.kernels.{m}") for m in ("page_cache", "prefill_blocks"))
    return {(m.__name__, k): sum(len(c[0]) for c in f.device_caches.values())
            for m in mods for k, f in vars(m).items() if hasattr(f, "device_caches")}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_longer_prompts_past_one_selection_chunk_compile_nothing_new():
    """After a 20K-token generate() (chunked prefill, selection in one top-k round), prompts whose
    page counts take two and three rounds of the selection's top-k (40K, 70K; chunk of 512 pages,
    plan.chunk) and one more length compile no kernel."""
    from conftest import tiny_llama
    from lserve_hf import LServeConfig, patch_model
    from lserve_hf.kernels.page_selector import DEFAULT_SELECT_PLAN

    model = tiny_llama(layers=2, heads=8, kv_heads=2, head_dim=128, vocab=500).cuda()
    model.config.max_position_embeddings = 1 << 17
    patch_model(model, LServeConfig(streaming_sparsity=0.5, token_budget=1024, prefill_chunk_size=8192),
                head_pattern=torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    counts = []
    lengths = (20000, 40000, 70000, 70001)
    assert 40000 // 64 > DEFAULT_SELECT_PLAN.chunk and 70000 // 64 > 2 * DEFAULT_SELECT_PLAN.chunk
    for n in lengths:
        ids = torch.randint(1, 500, (1, n), device="cuda")
        with torch.no_grad():
            model.generate(ids, max_new_tokens=6, do_sample=False)
        counts.append(_compiled())
    grew = [{k: (a.get(k, 0), b[k]) for k in b if a.get(k, 0) != b[k]} for a, b in zip(counts, counts[1:])]
    assert not any(grew), dict(zip(lengths[1:], grew))

"""One configuration of the end-to-end benchmark, in a process of its own (``bench_e2e.py`` starts
one per method, batch and length, so that none inherits another's allocator, compile caches or
warm state). It builds the model, warms it up, times ``generate()`` and plain forwards, and prints
one JSON line: the figures, or ``"status": "oom"`` with the phase that ran out of memory.

The sequence, with ``synchronize()`` around every timed call:
1. warm-up: ``generate()`` of a few tokens on a short prompt (kernels compile, graphs capture);
2. first call at the requested length: ``generate()`` of a few tokens (what a new length costs
   once: a code path the short prompt did not take, allocator growth), kept apart so that the
   measured calls below are all warm;
3. TTFT: ``generate(max_new_tokens=1)``; TPOT: ``(t(generate(N + 1)) - TTFT) / N``, with the peak
   memory and the KV bytes of that call;
4. forward-only: one prefill forward, then up to 32 single-token forwards on its cache (their
   median) with the inputs ``generate()`` would pass, through the forward ``generate()`` uses
   (compiled, for static-compile);
5. a length never seen before (odd): the first call and the second, ``generate(max_new_tokens=1)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch

METHODS = ("sdpa", "sdpa-cudnn", "static-compile", "lserve", "lserve-eager")
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                 max_position_embeddings=1048576)
# --dry-run: the same code paths on a model that runs in seconds on a CPU
TINY_LLAMA = dict(LLAMA3_8B, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=256, max_position_embeddings=4096)
# forward-only decode steps: a median of this many synchronised steps is steady already
FORWARD_STEPS = 32
# both LServe decode graphs (a step that selects pages, a step that reuses them) are captured at
# the second step of their kind: 2 selector intervals + 2 tokens cover both
FEW_TOKENS = 10


def main(spec: dict) -> int:
    """Run the configuration ``spec`` (made by ``bench_e2e.child_spec``) and print its JSON line."""
    print(json.dumps(run(spec)), flush=True)
    return 0


def run(spec: dict) -> dict:
    """The configuration's figures (status "ok"), or status "oom" and the phase that ran out."""
    result = dict(status="ok", phase="setup", compiles={})
    threads = torch.get_num_threads()
    try:
        measure(spec, result)
    except torch.OutOfMemoryError as exc:
        # an OOM is a result of the configuration, not a crash of the benchmark
        result.update(status="oom", message=str(exc).splitlines()[0][:300])
    finally:
        # what measure() changed for the process (a run in the parent's process leaves it as it was)
        gc.unfreeze()
        torch.set_num_threads(threads)
    result.pop("_since", None)
    return result


def enter(result: dict, phase: str) -> None:
    """Start a phase of the sequence: an OOM names the phase it happened in, and the compiles of
    each phase are counted (``result["compiles"]``: after the warm-up, all zeros is the claim)."""
    count = compiled_count()
    if "_since" in result:
        result["compiles"][result["phase"]] = count - result["_since"]
    result["phase"], result["_since"] = phase, count


def measure(spec: dict, result: dict) -> None:
    device = torch.device("cpu" if spec["dry_run"] else "cuda")
    if spec["dry_run"]:
        torch.set_num_threads(1)   # a tiny model gains nothing from threads; a loaded CPU loses to them
    if spec["memory_cap_gib"]:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["memory_cap_gib"] * 2**30 / total), device)
    result["env"] = environment(device)
    model = build_model(spec, device)
    runner = Runner(model, spec, device)
    # what exists now (modules, the model) lives to the end: frozen, a collection scans only what
    # the calls make, so the collections before each timed call take milliseconds, not a second
    gc.collect()
    gc.freeze()
    result["method_setup"] = runner.description
    B, L, N = spec["batch"], spec["length"], spec["decode_tokens"]
    ids = runner.prompt(B, L, seed=spec["seed"])

    enter(result, "warm-up")
    warmup = runner.prompt(B, spec["warmup_length"], spec["seed"] + 1)
    result["warmup_s"], out = timed(runner.generation(warmup, FEW_TOKENS), device)
    del out

    if spec.get("ttft_only"):
        enter(result, "first call at the length")
        result["first_call_s"], out = timed(runner.generation(ids, 1), device)
        del out
        enter(result, "TTFT")
        reset_peak(device)
        result["ttft_s"], out = timed(runner.generation(ids, 1), device)
        check_length(out, L + 1)
        result["peak_gib"] = peak_gib(device)
        del out
        enter(result, "done")
        return

    enter(result, "first call at the length")
    result["first_call_s"], out = timed(runner.generation(ids, FEW_TOKENS), device)
    del out

    enter(result, "TTFT")
    result["ttft_s"], out = timed(runner.generation(ids, 1), device)
    check_length(out, L + 1)
    del out

    enter(result, "TPOT")
    reset_peak(device)
    t_n, out = timed(runner.generation(ids, N + 1), device)
    check_length(out, L + N + 1)
    result["tpot_ms"] = 1e3 * (t_n - result["ttft_s"]) / N
    result["tokens_per_s"] = B / (result["tpot_ms"] / 1e3)
    result["peak_gib"] = peak_gib(device)
    from lserve_hf import kv_bytes

    result["kv_gib"] = kv_bytes(out.past_key_values) / 2**30
    result["kv_reserved_gib"] = kv_bytes(out.past_key_values, reserved=True) / 2**30
    result.update(runner.diagnostics(out.past_key_values))
    del out

    enter(result, "forward-only")
    result["fwd_prefill_s"], result["fwd_decode_ms"] = forward_only(runner, ids, min(N, FORWARD_STEPS), device)

    enter(result, "new length")
    new_ids = runner.prompt(B, spec["new_length"], seed=spec["seed"] + 2)
    for key in ("new_length_first_s", "new_length_second_s"):
        result[key], out = timed(runner.generation(new_ids, 1), device)
        del out
    enter(result, "done")


def build_model(spec: dict, device):
    """The random-weight model, built in bf16 on its device; the same weights for every method
    (seeded), so that data-dependent work (LServe's page selection) is the same too."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = dict(TINY_LLAMA if spec["dry_run"] else LLAMA3_8B)
    if spec["layers"]:
        shape["num_hidden_layers"] = spec["layers"]
    torch.manual_seed(spec["seed"])
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape, attn_implementation="sdpa"),
                                                 dtype=torch.bfloat16).eval()
    # random weights emit any token: no EOS, so every call generates exactly the tokens asked for
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


class Runner:
    """How one method runs the model: what wraps each call (``context``), the cache it decodes
    into, and the forward ``generate()`` steps through (``step``)."""

    def __init__(self, model, spec: dict, device):
        self.model, self.method = model, spec["method"]
        self.context = contextlib.nullcontext
        self.static_cache = None
        self.step = model
        if self.method == "sdpa":
            self.description = "unpatched, eager, DynamicCache (HF's default)"
        elif self.method == "sdpa-cudnn":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            # the CPU has no cuDNN: the dry run checks the plumbing with the math backend
            backend = SDPBackend.MATH if spec["dry_run"] else SDPBackend.CUDNN_ATTENTION
            self.context = lambda: sdpa_kernel(backend)
            self.description = f"unpatched, eager, DynamicCache, sdpa_kernel({backend.name} only)"
        elif self.method == "static-compile":
            self._static(spec)
        else:
            self._lserve(spec)

    def _static(self, spec):
        """HF's own fast path: a StaticCache, and generate() compiling the decode step with the
        model's ``generation_config.compile_config`` (the prefill runs eagerly, as HF does). One
        cache sized for the longest call, reset before each call: every call decodes into the same
        addresses, so the compiled CUDA graphs replay and never re-record."""
        from transformers import CompileConfig, StaticCache

        model = self.model
        if spec["dry_run"]:
            # dynamo traces the whole graph (fullgraph holds) without inductor's CPU code generation
            config = CompileConfig(fullgraph=True, mode="reduce-overhead", backend="eager")
            config._compile_all_devices = True
        else:
            config = CompileConfig(fullgraph=True, mode="reduce-overhead")
        model.generation_config.compile_config = config
        longest = max(spec["length"], spec["new_length"], spec["warmup_length"])
        size = longest + max(spec["decode_tokens"] + 1, FEW_TOKENS)
        self.static_cache = StaticCache(config=model.config, max_cache_len=size)
        self.step = model.get_compiled_call(config)
        compile_args = ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items())
        self.description = (f"StaticCache(max_cache_len={size}), generate() compiles the decode step: "
                            f"CompileConfig({compile_args})")

    def _lserve(self, spec):
        from lserve_hf import LServeConfig, patch_model

        knobs = dict(spec["lserve"], cuda_graphs=self.method == "lserve" and spec["lserve"]["cuda_graphs"])
        config = LServeConfig(**knobs, **spec["lserve_extra"])
        layers, heads = self.model.config.num_hidden_layers, self.model.config.num_key_value_heads
        pattern = torch.rand(layers, heads, generator=torch.Generator().manual_seed(0))
        patch_model(self.model, config, head_pattern=pattern)
        self.description = f"patched: {dataclasses.asdict(self.model._lserve.config)}"

    def cache_kwargs(self) -> dict:
        """The cache to pass to a call: static-compile's own (emptied), none for the others (the
        model or generate() makes one)."""
        if self.static_cache is None:
            return {}
        self.static_cache.reset()
        return {"past_key_values": self.static_cache}

    def prompt(self, batch: int, length: int, seed: int):
        """Random token ids from a seeded CPU generator: the same prompts for every method."""
        ids = torch.randint(0, self.model.config.vocab_size, (batch, length),
                            generator=torch.Generator().manual_seed(seed))
        return ids.to(self.model.device)

    def generation(self, ids, new_tokens: int):
        """A greedy generate() of exactly ``new_tokens`` tokens, ready to time (the cache is reset
        here, outside the timed call)."""
        kwargs = self.cache_kwargs()
        gc.collect()    # what the previous call left is freed before this one, not during it

        def call():
            with self.context():
                return self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                           min_new_tokens=new_tokens, do_sample=False,
                                           return_dict_in_generate=True, **kwargs)
        return call

    def diagnostics(self, cache) -> dict:
        """What shows that the method ran as described: graphs torch.compile made (static-compile),
        decode graphs the LServe cache captured."""
        from torch._dynamo.utils import counters

        found = dict(dynamo_graphs=counters["stats"]["unique_graphs"],
                     dynamo_graph_breaks=sum(counters["graph_break"].values()))
        graphs = getattr(cache, "decode_graphs", None)
        if graphs is not None:
            found["lserve_decode_graphs"] = len(graphs.graphs)
        return found


def forward_only(runner: Runner, ids, n: int, device):
    """(prefill s, median decode ms) of plain forwards: the prompt in one call (``logits_to_keep=1``),
    then ``n`` single-token forwards on the returned cache with the inputs generate() would build
    (``prepare_inputs_for_generation``: for a static cache, its 4-D mask), so that the compiled
    step of static-compile is the one generate() compiled."""
    model = runner.model
    B = ids.shape[0]
    kwargs = runner.cache_kwargs()
    gc.collect()
    with torch.no_grad(), runner.context():
        prefill, out = timed(lambda: model(ids, use_cache=True, logits_to_keep=1, **kwargs), device)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        del out
        seq, steps = ids, []
        for _ in range(n):
            seq = torch.cat([seq, tok], dim=1)
            positions = torch.arange(seq.shape[1], device=seq.device).expand(B, -1)
            inputs = model.prepare_inputs_for_generation(seq, next_sequence_length=1, past_key_values=cache,
                                                         attention_mask=torch.ones_like(seq), position_ids=positions,
                                                         use_cache=True, logits_to_keep=1)
            dt, out = timed(lambda: runner.step(**inputs, return_dict=True), device)
            tok = out.logits[:, -1:].argmax(-1)
            steps.append(dt)
        del out, cache
    return prefill, 1e3 * statistics.median(steps)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device):
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def check_length(out, expected: int) -> None:
    """generate() made every token asked for (no early stop): else TPOT would divide wrongly."""
    if out.sequences.shape[1] != expected:
        raise RuntimeError(f"generate() returned {out.sequences.shape[1]} positions, expected {expected}")


def compiled_count() -> int:
    """Graphs torch.compile has made, plus LServe Triton kernels compiled (on CUDA), so far in this
    process: the difference over the measured calls shows whether any of them compiled."""
    from torch._dynamo.utils import counters

    count = counters["stats"]["unique_graphs"]
    if torch.cuda.is_available() and "lserve_hf.kernels" in sys.modules:
        # as tests/test_no_recompile.py counts them: the compiled variants each kernel holds
        from importlib import import_module

        for name in ("block_sparse_prefill", "page_selector", "page_summary", "sparse_decode"):
            module = import_module(f"lserve_hf.kernels.{name}")
            count += sum(len(c[0]) for k in module.LENGTH_ARGS for c in getattr(module, k).device_caches.values())
    return count


def environment(device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    env = dict(torch=torch.__version__, transformers=ver("transformers"), triton=ver("triton"),
               lserve_hf=ver("lserve-hf"), device=str(device))
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    return env

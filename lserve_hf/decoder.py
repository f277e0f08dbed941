"""The patched decoder: the model's own forward, plus what only a loop around it can do. Each
forward gets an ``LServeCache`` (when it caches) and its mask found once; a long prompt is
prefilled in chunks; decode steps replay as CUDA graphs; the cache's host bookkeeping
(``DecodeStep``) runs around every forward, eager or replayed, the same way.

``patch_model`` switches the decoder module (``model.model``) to a subclass of its own class
(``LServe<Class>``, made here) and the causal LM likewise, so a patched model is an ordinary
module: ``copy.deepcopy`` copies it patched and ``torch.save`` pickles it (the subclasses are found
by name in this module). ``unpatch_model`` switches the classes back.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast

from . import segmented
from .cache import LServeCache
from .decode_graph import DecodeGraphs
from .masks import PromptMask, prompt_mask
from .ops import say_once

_ARG_NAMES = ("input_ids", "attention_mask", "position_ids", "past_key_values", "inputs_embeds", "use_cache")
_PATCHED: dict = {}


class LServeDecoderMixin:
    """Mixed in front of a decoder class (``LlamaModel`` & co.) by ``patch_model``."""

    def forward(self, *args, **kwargs):
        kwargs.update(zip(_ARG_NAMES, args))
        state = self._lserve
        with state.running():
            return _decoder_forward(self, state, super().forward, kwargs)


class LServeCausalLMMixin:
    """Mixed in front of a causal LM class: ``generate()`` starts with an ``LServeCache`` sized for
    the whole generation, and says once what it changes about the user's request."""

    def generate(self, *args, **kwargs):
        gen = kwargs.get("generation_config") or self.generation_config
        if kwargs.get("use_cache", getattr(gen, "use_cache", True)) is False:
            say_once("LServe: generate(use_cache=False) recomputes the whole sequence at every step with the "
                     "prefill's attention (retrieval heads dense, streaming heads prefill_sink/prefill_local); "
                     "its tokens can differ from cached decoding, which reads sink + ring and selected pages.")
        if kwargs.get("cache_implementation", getattr(gen, "cache_implementation", None)) not in (None, "dynamic"):
            say_once("LServe: a patched model decodes with its own LServeCache; cache_implementation="
                     f"{kwargs.get('cache_implementation', gen.cache_implementation)!r} is not used.")
        if self._lserve.config.offload:
            from .offload import check_generate
            check_generate(self, args, kwargs)
        return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, *args, **kwargs):
        result = super()._prepare_cache_for_generation(*args, **kwargs)
        bound = inspect.signature(super()._prepare_cache_for_generation).bind_partial(*args, **kwargs).arguments
        model_kwargs, length = bound.get("model_kwargs"), bound.get("max_cache_length")
        pkv = model_kwargs.get("past_key_values") if isinstance(model_kwargs, dict) else None
        if isinstance(pkv, Cache) and not isinstance(pkv, LServeCache) and pkv.get_seq_length() == 0 \
                and not getattr(pkv, "_is_user_defined", False):
            if not isinstance(pkv, DynamicCache):
                say_once(f"LServe: a patched model decodes with its own LServeCache, not a {type(pkv).__name__}.")
            state = self._lserve
            model_kwargs["past_key_values"] = LServeCache(
                plans=state.plans, patch_token=state.token,
                max_length=length + 1 if isinstance(length, int) else None)
        return result


def patched_class(cls: type, mixin: type) -> type:
    """``LServe<cls>``: ``cls`` with ``mixin`` in front, made once per class."""
    if cls not in _PATCHED:
        name = f"LServe{cls.__name__}"
        _PATCHED[cls] = type(name, (mixin, cls), {"__module__": __name__, "__qualname__": name,
                                                  "_lserve_base": cls})
    sub = _PATCHED[cls]
    # Transformers finds which outputs a model can record (output_attentions, output_hidden_states)
    # by the name of its class: the subclass records what its base does.
    from transformers.utils import output_capturing

    registry = output_capturing._CAN_RECORD_REGISTRY
    if dict.get(registry, str(cls)) is not None:
        dict.__setitem__(registry, str(sub), dict.get(registry, str(cls)))
    return sub


def __getattr__(name: str):
    """Pickling: a patched class is found by name (``LServeLlamaModel``) in a fresh process."""
    if name.startswith("LServe"):
        import transformers

        from . import fused_modules

        base_name = name[len("LServe"):]
        fused = fused_modules.transformers_class(base_name)
        if fused is not None:
            return patched_class(fused, fused_modules.mixin_for(fused))
        base = getattr(transformers, base_name, None)
        if isinstance(base, type):
            from transformers import GenerationMixin

            return patched_class(base, LServeCausalLMMixin if issubclass(base, GenerationMixin)
                                 else LServeDecoderMixin)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- one forward --------------------------------------------------------------------------------

def _decoder_forward(base, state, parent, kw):
    ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
    x = ids if ids is not None else embeds
    if x is None:
        raise ValueError("The model needs input_ids or inputs_embeds (got neither).")
    B, S = x.shape[:2]
    if S == 0:
        raise ValueError("The input holds no token (sequence length 0).")
    mask = kw.get("attention_mask")
    if mask is not None and mask.shape[0] != B:
        raise ValueError(f"attention_mask has batch size {mask.shape[0]} but the input has {B}.")
    cache = _cache_for(base, state, kw)
    kw["past_key_values"] = cache
    if not isinstance(cache, LServeCache):
        kw["lserve_mask"] = prompt_mask(mask, kw.get("position_ids"), S, appending=False,
                                        cached=cache is not None)
        return parent(**kw)
    if cache.unusable:
        raise ValueError(cache.unusable)
    appending = cache.step.seen > 0
    if appending and cache.lengths is not None and cache.lengths.shape[0] != B:
        raise ValueError(f"This LServeCache holds {cache.lengths.shape[0]} rows but the input has {B}: "
                         "use a new cache (or none) for another batch.")
    kw["lserve_mask"] = prompt_mask(mask, kw.get("position_ids"), S, appending=appending, cached=True)
    if appending:
        return _append(base, parent, cache, kw, S)
    return _prompt(base, parent, cache, kw, S)


def _cache_for(base, state, kw):
    """The forward's cache: the caller's LServeCache (checked), or a new one in place of none or
    of an empty cache; a non-empty cache of another kind is kept (and said once)."""
    cache = kw.get("past_key_values")
    use_cache = kw.get("use_cache")
    if use_cache is None:
        use_cache = getattr(base.config, "use_cache", True) and not base.training
    if isinstance(cache, LServeCache):
        if cache.patch_token != state.token and not _same_patch(cache, state):
            raise ValueError("This LServeCache was made for another patch of this model (another LServeConfig or "
                             "head pattern), or for another model: make a new one with LServeCache(model), or let "
                             "the model create it.")
        return cache
    if cache is None or (isinstance(cache, Cache) and cache.get_seq_length() == 0):
        if not use_cache:
            return None
        if cache is not None and not isinstance(cache, DynamicCache):
            say_once(f"LServe: a patched model stores its KV in an LServeCache, not the {type(cache).__name__} given.")
        return LServeCache(plans=state.plans, patch_token=state.token)
    return cache


def _same_patch(cache, state) -> bool:
    """A cache made under another patch_model call that set up the same attention."""
    plans = [layer.plan for layer in cache.layers]
    return cache.config == state.config and len(plans) == len(state.plans) and all(
        torch.equal(a.streaming, b.streaming) for a, b in zip(plans, state.plans))


def _run(cache, S, call, prompt: bool):
    """One forward with the cache's host bookkeeping around it."""
    cache.step.begin(S)
    try:
        if not prompt:
            cache.advance_lengths(S)
        out = call()
    except BaseException as exc:
        _failed(cache, prompt, exc)
        raise
    if prompt:
        cache.step.end(*cache.prompt_rows)
    else:
        cache.step.end()
    return out


@contextmanager
def prompt_forward(cache: LServeCache, mask: PromptMask, batch: int, length: int, device):
    """The cache's side of a one-pass prefill of ``length`` positions, for code that runs the
    decoder's layers itself (calibration resumes a prefill at a given layer): inside the block,
    the layers store the prompt as the patched decoder's forward would have them do."""
    cache.begin_prompt(mask, batch, length, device)
    cache.step.begin(length)
    try:
        yield cache
    except BaseException as exc:
        _failed(cache, True, exc)
        raise
    cache.step.end(*cache.prompt_rows)


def _failed(cache, prompt: bool, exc: BaseException) -> None:
    """A forward raised: a prompt's cache starts over; a cache that was being appended to may hold
    part of the step, so it refuses further use (with the reason) instead of answering wrongly."""
    if prompt:
        cache.reset()
        return
    cache.step.abort()
    cache.unusable = (f"LServe: this cache is unusable after a failed forward ({type(exc).__name__}: {exc}); "
                      "start from a new cache.")


def _prompt(base, parent, cache, kw, S):
    mask = kw["lserve_mask"]
    x = kw["input_ids"] if kw.get("input_ids") is not None else kw["inputs_embeds"]
    cache.begin_prompt(mask, x.shape[0], S, x.device)
    chunk = cache.config.prefill_chunk_size
    if chunk is not None and S > chunk and not mask.general:
        if not (kw.get("output_attentions") or kw.get("output_hidden_states")):
            if cache.config.offload and segmented.runs(base):
                return segmented.prefill(base, cache, chunk, kw)    # one layer's KV on the GPU at a time
            return chunked_prefill(parent, cache, chunk, kw)
        say_once("LServe: output_attentions/output_hidden_states need the prompt in one pass; "
                 "this prefill is not chunked.")
    out = _run(cache, S, lambda: parent(**kw), prompt=True)
    if mask.general:
        cache.unusable = (f"LServe: this cache holds a prompt with {mask.why}, which LServe attends but does "
                          "not store for decoding. Generation needs left padding only "
                          "(tokenizer.padding_side='left'), no 4-D mask and no packed sequences.")
    return out


def chunked_prefill(parent, cache: LServeCache, chunk: int, kw: dict):
    """Prefill the prompt ``chunk`` tokens at a time. Every chunk's queries attend to the prompt
    stored so far with the one-pass masks, so the hidden states equal a one-pass prefill's,
    while activations are those of one chunk."""
    ids, embeds = kw.pop("input_ids", None), kw.pop("inputs_embeds", None)
    mask, pos = kw.pop("attention_mask", None), kw.pop("position_ids", None)
    x = ids if ids is not None else embeds
    B, S = x.shape[:2]
    cache.step.announce_prompt(S)
    hidden = None
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        part = dict(kw, input_ids=ids[:, a:b] if ids is not None else None,
                    inputs_embeds=embeds[:, a:b] if embeds is not None else None,
                    attention_mask=mask[:, :b] if mask is not None else None,
                    position_ids=pos[..., a:b] if pos is not None else None)

        def call(part=part, last=b == S):
            out = parent(**part)
            if last:
                cache.finish_prompt()
            return out
        if b < S:
            cache.step.begin(b - a)
            try:
                out = call()
            except BaseException as exc:
                _failed(cache, True, exc)
                raise
            cache.step.end()
        else:
            out = _run(cache, b - a, call, prompt=True)
        h = out.last_hidden_state
        if hidden is None:
            hidden = h.new_empty(B, S, h.shape[-1])
        hidden[:, a:b] = h
    return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)


def _append(base, parent, cache, kw, S):
    """Tokens appended to a stored prompt: a decode step (replayed as a CUDA graph where it can
    be) or an extend."""
    ids, pos = kw.get("input_ids"), kw.get("position_ids")
    if S == 1 and DecodeGraphs.eligible(cache, base.config, ids, kw.get("inputs_embeds"), kw):
        if cache.decode_graphs is None:
            cache.decode_graphs = DecodeGraphs()
        graphs = cache.decode_graphs
        graphs.reserve(cache)

        def device_step(step_ids, step_pos):
            cache.advance_lengths(1)
            return parent(input_ids=step_ids, position_ids=step_pos, past_key_values=cache, use_cache=True,
                          lserve_mask=PromptMask()).last_hidden_state
        fwd = cache.step.begin(1)
        try:
            hidden = graphs.run(cache, fwd, device_step, ids, pos)
            if hidden is None:
                hidden = device_step(ids, pos)
        except BaseException as exc:
            _failed(cache, False, exc)
            raise
        cache.step.end()
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
    return _run(cache, S, lambda: parent(**kw), prompt=False)

"""``patch_model`` / ``unpatch_model``: switch a Transformers causal LM to LServe attention through
the public seams only (``AttentionInterface``, ``AttentionMaskInterface``, ``Cache`` and module
forward pre-hooks), so the model's own code is never forked."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.masking_utils import AttentionMaskInterface

from lserve_hf.calibration import streaming_mask
from lserve_hf.calibration.patterns import load_pattern, validate_scores
from lserve_hf.calibration.shipped import find_shipped_pattern

from . import decoder
from .backend import set_attention_implementation
from .attention import ATTN_NAME, lserve_attention_forward, lserve_mask
from .cache import LayerPlan, LServeCache
from .config import LServeConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

AttentionInterface.register(ATTN_NAME, lserve_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, lserve_mask)


@dataclass
class PatchState:
    config: LServeConfig
    plans: list[LayerPlan]
    streaming: torch.Tensor               # bool [num_layers, num_kv_heads]
    previous_attn: str | None
    handles: list = field(default_factory=list)


def _decoder(model):
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise TypeError(f"patch_model expects a causal LM with a `.model.layers` decoder "
                        f"(e.g. LlamaForCausalLM); got {type(model).__name__}.")
    return base


def resolve_streaming(model, config: LServeConfig, head_pattern) -> torch.Tensor:
    """Bool ``[num_layers, num_kv_heads]``: the streaming heads for this model and config."""
    mcfg = model.config
    shape = (mcfg.num_hidden_layers, mcfg.num_key_value_heads)
    if head_pattern is None:
        if config.streaming_sparsity in (0.0, 1.0):
            # every head has the same kind: the scores cannot matter
            scores = torch.full(shape, 1.0 - config.streaming_sparsity)
        else:
            path = find_shipped_pattern(mcfg)
            if path is None:
                raise ValueError(
                    f"No head pattern is known for this model ({mcfg.model_type}, {shape[0]} layers x "
                    f"{shape[1]} KV heads). Pass head_pattern= a DuoAttention 'full_attention_heads.tsv' "
                    "(or a [num_layers, num_kv_heads] array of scores in [0, 1]), compute one with "
                    "`lserve-hf calibrate`, or use LServeConfig(streaming_sparsity=0) for page selection only.")
            scores = load_pattern(path)
    elif isinstance(head_pattern, (str, os.PathLike)):
        scores = load_pattern(head_pattern)
    else:
        scores = validate_scores(head_pattern)
    if tuple(scores.shape) != shape:
        raise ValueError(
            f"The head pattern has shape {tuple(scores.shape)} but the model has {shape[0]} layers x "
            f"{shape[1]} KV heads: use the pattern computed for this model (`lserve-hf calibrate`).")
    streaming = streaming_mask(scores, config.streaming_sparsity)
    for i in config.dense_layers:
        if i >= shape[0]:
            raise ValueError(f"dense_layers holds {i} but the model has {shape[0]} layers.")
        streaming[i] = False
    return streaming


def patch_model(model, config: LServeConfig | None = None, head_pattern=None):
    """Patch ``model`` in place so that forward passes and ``generate()`` run LServe attention.

    Args:
        model: a Llama, Mistral or Qwen2 causal LM from Transformers.
        config: an ``LServeConfig`` (defaults: 50% streaming heads, budget 4096).
        head_pattern: path to a DuoAttention ``full_attention_heads.tsv`` (or its folder), or a
            ``[num_layers, num_kv_heads]`` tensor/array of scores in [0, 1]. Optional when the
            model has a shipped pattern or ``streaming_sparsity`` is 0 or 1.
    Returns the same model.
    """
    config = config or LServeConfig()
    mtype = getattr(model.config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"LServe does not support model type {mtype!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    if getattr(model, "_lserve", None) is not None:
        unpatch_model(model)
    base = _decoder(model)
    streaming = resolve_streaming(model, config, head_pattern)
    dense = set(config.dense_layers)
    plans = [LayerPlan(i, streaming[i].clone(), i in dense) for i in range(streaming.shape[0])]
    state = PatchState(config, plans, streaming, model.config._attn_implementation)
    for layer in base.layers:
        attn = layer.self_attn
        attn.lserve_plan, attn.lserve_config = plans[attn.layer_idx], config
        state.handles.append(attn.register_forward_pre_hook(_inject_layer, with_kwargs=True))
    state.handles.append(base.register_forward_pre_hook(_ensure_cache, with_kwargs=True))
    decoder.install(base)
    _size_generate_cache(model, state)
    model._lserve = base._lserve = state
    set_attention_implementation(model, ATTN_NAME)
    return model


def unpatch_model(model):
    """Undo ``patch_model``: the model runs exactly as before patching."""
    state = getattr(model, "_lserve", None)
    if state is None:
        return model
    for h in state.handles:
        h.remove()
    base = _decoder(model)
    decoder.uninstall(base)
    if "_prepare_cache_for_generation" in model.__dict__:
        del model._prepare_cache_for_generation
    for layer in base.layers:
        for name in ("lserve_plan", "lserve_config"):
            if hasattr(layer.self_attn, name):
                delattr(layer.self_attn, name)
    set_attention_implementation(model, state.previous_attn)
    del model._lserve
    if hasattr(base, "_lserve"):
        del base._lserve
    return model


def _size_generate_cache(model, state) -> None:
    """Let ``generate()`` start with an ``LServeCache`` whose page pools hold the whole generation
    (prompt + ``max_new_tokens``), so decoding never reallocates them. ``generate()`` tells its
    cache's size to ``_prepare_cache_for_generation``; where that hook is absent or has another
    shape, the cache is created at the first forward instead and grows as it goes."""
    original = getattr(model, "_prepare_cache_for_generation", None)
    if original is None:
        return
    try:
        signature = inspect.signature(original)
    except (TypeError, ValueError):
        return
    if not {"model_kwargs", "max_cache_length"} <= set(signature.parameters):
        return

    def prepare(*args, **kwargs):
        result = original(*args, **kwargs)
        bound = signature.bind_partial(*args, **kwargs).arguments
        model_kwargs, length = bound.get("model_kwargs"), bound.get("max_cache_length")
        pkv = model_kwargs.get("past_key_values") if isinstance(model_kwargs, dict) else None
        if isinstance(pkv, Cache) and not isinstance(pkv, LServeCache) and pkv.get_seq_length() == 0 \
                and not getattr(pkv, "_is_user_defined", False) and isinstance(length, int):
            model_kwargs["past_key_values"] = LServeCache(plans=state.plans, config=state.config,
                                                          max_length=length + 1)
        return result

    model._prepare_cache_for_generation = prepare


def _ensure_cache(module, args, kwargs):
    """Give every cached forward of a patched model an LServeCache: replaces a missing cache, or
    the empty DynamicCache that ``generate()`` creates; a user's non-empty cache is kept."""
    state = module._lserve
    pkv = kwargs.get("past_key_values")
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = getattr(module.config, "use_cache", True) and not module.training
    if not isinstance(pkv, LServeCache):
        empty = pkv is None or (isinstance(pkv, Cache) and pkv.get_seq_length() == 0)
        if use_cache and empty:
            pkv = LServeCache(plans=state.plans, config=state.config)
            kwargs["past_key_values"] = pkv
    if isinstance(pkv, LServeCache):
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if ids is not None else kwargs.get("inputs_embeds")
        pkv.begin_forward(kwargs.get("attention_mask"), x.shape[0], x.shape[1], x.device)
    return args, kwargs


def _inject_layer(module, args, kwargs):
    pkv = kwargs.get("past_key_values")
    kwargs["lserve_layer"] = pkv.layers[module.layer_idx] if isinstance(pkv, LServeCache) else None
    return args, kwargs

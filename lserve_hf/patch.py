"""``patch_model`` / ``unpatch_model``: switch a Transformers causal LM to LServe attention through
the public seams only (``AttentionInterface``, ``AttentionMaskInterface``, ``Cache``, a forward
pre-hook per attention module, and a subclass of the decoder's and the LM's own classes, and of
its RMSNorm and MLP classes for the fused kernels), so the model's code is never forked."""

from __future__ import annotations

import copy
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attention import ATTN_NAME, lserve_attention_forward, lserve_mask
from .cache import LServeCache
from .config import LServeConfig, logger
from .decoder import LServeCausalLMMixin, LServeDecoderMixin, patched_class
from .fused_modules import fuse, unfuse
from .heads import LayerPlan, layer_plans, model_streaming_heads

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

AttentionInterface.register(ATTN_NAME, lserve_attention_forward)
AttentionMaskInterface.register(ATTN_NAME, lserve_mask)


@dataclass
class PatchState:
    """What one ``patch_model`` call set up; ``token`` tells its caches from an earlier patch's."""

    config: LServeConfig
    plans: list[LayerPlan]
    streaming: torch.Tensor               # bool [num_layers, num_kv_heads]
    previous_attn: str | None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    active: int = 0                       # forwards running now (patching under them is refused)

    @contextmanager
    def running(self):
        with _LOCK:
            self.active += 1
        try:
            yield
        finally:
            with _LOCK:
                self.active -= 1

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "active"} | {"active": 0}


_LOCK = threading.Lock()


def _decoder(model):
    base = getattr(model, "model", None)
    if base is None or not hasattr(base, "layers"):
        raise TypeError(f"patch_model expects a causal LM with a `.model.layers` decoder "
                        f"(e.g. LlamaForCausalLM); got {type(model).__name__}.")
    return base


def patch_model(model, config: LServeConfig | None = None, head_pattern=None):
    """Patch ``model`` in place so that forward passes and ``generate()`` run LServe attention (and,
    on CUDA, the decoder's RMSNorms and SwiGLU activation as fused kernels: ``fused_norm_mlp``).

    Args:
        model: a Llama, Mistral or Qwen2 causal LM from Transformers.
        config: an ``LServeConfig`` (defaults: 50% streaming heads; the budget and prefill window
            the published values, scaled down for short-context models and logged).
        head_pattern: path to a DuoAttention ``full_attention_heads.tsv`` (or its folder), or a
            ``[num_layers, num_kv_heads]`` tensor/array of scores in [0, 1]. Optional when the
            model has a shipped pattern or ``streaming_sparsity`` is 0 or 1.
    Returns the same model. Patching a patched model replaces its patch; if the new patch cannot
    be made, the model keeps the old one.
    """
    if config is None:
        config = LServeConfig()
    elif isinstance(config, (str, os.PathLike)):
        raise TypeError(f"patch_model's second argument is the LServeConfig; for a head pattern file pass "
                        f"head_pattern={str(config)!r}.")
    elif not isinstance(config, LServeConfig):
        raise TypeError(f"config must be an LServeConfig, not {type(config).__name__}.")
    mtype = getattr(model.config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"LServe does not support model type {mtype!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    base = _decoder(model)
    old = getattr(model, "_lserve", None)
    if old is not None and old.active:
        raise RuntimeError("patch_model: this model is running a forward (in another thread?); patch it "
                           "before or after generating, not during.")
    # Everything that can fail is resolved before the model is touched.
    config = _resolved(config, model.config)
    streaming = model_streaming_heads(model.config, config.streaming_sparsity, config.dense_layers, head_pattern)
    plans = layer_plans(streaming, config, getattr(getattr(base, "rotary_emb", None), "inv_freq", None))
    if old is not None:
        unpatch_model(model)
    previous = model.config._attn_implementation
    state = PatchState(config, plans, streaming, "sdpa" if previous == ATTN_NAME else previous)
    _own_config(model)
    for layer in base.layers:
        attn = layer.self_attn
        attn.lserve_plan = plans[attn.layer_idx]
        attn.register_forward_pre_hook(_inject_cache, with_kwargs=True)
    if config.fused_norm_mlp and config.backend != "torch":
        fuse(base, mtype)
    base.__class__ = patched_class(type(base), LServeDecoderMixin)
    model.__class__ = patched_class(type(model), LServeCausalLMMixin)
    model._lserve = base._lserve = state
    set_attention_implementation(model, ATTN_NAME)
    return model


def unpatch_model(model):
    """Undo ``patch_model``: the model runs exactly as before patching."""
    state = getattr(model, "_lserve", None)
    if state is None:
        return model
    if state.active:
        raise RuntimeError("unpatch_model: this model is running a forward (in another thread?).")
    base = _decoder(model)
    for layer in base.layers:
        attn = layer.self_attn
        for key in [k for k, fn in attn._forward_pre_hooks.items() if fn is _inject_cache]:
            attn._forward_pre_hooks.pop(key)
            attn._forward_pre_hooks_with_kwargs.pop(key, None)
        if hasattr(attn, "lserve_plan"):
            del attn.lserve_plan
    unfuse(base)
    for module in (base, model):
        if hasattr(type(module), "_lserve_base"):
            module.__class__ = type(module)._lserve_base
        if "_lserve" in module.__dict__:
            del module._lserve
    set_attention_implementation(model, state.previous_attn)
    return model


def _resolved(config: LServeConfig, model_config) -> LServeConfig:
    """The config with the fields left to None filled for this model, said once in the log."""
    unset = config.unresolved_fields()
    context = getattr(model_config, "max_position_embeddings", None)
    config = config.resolved(context)
    if unset:
        chosen = ", ".join(f"{n}={getattr(config, n)}" for n in unset)
        logger.info(f"LServe: for a model of {context or 'unknown'} tokens of context: {chosen} "
                    "(set them in LServeConfig to choose).")
    return config


def _own_config(model) -> None:
    """Give the model a config object of its own, so that switching its attention to "lserve"
    never writes into a config the user (or another model) holds."""
    original = model.config
    mine = copy.deepcopy(original)
    for module in model.modules():
        if getattr(module, "config", None) is original:
            module.config = mine


def set_attention_implementation(model, name) -> None:
    """Switch ``model`` (and its sub-models) to the attention implementation ``name``; models that
    refuse ``set_attn_implementation`` get their configs set directly."""
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):
        for m in model.modules():
            cfg = getattr(m, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name


def _inject_cache(module, args, kwargs):
    """An attention module's forward pre-hook: hand the LServeCache (if the forward has one) to
    the attention function, which the model calls without its cache."""
    pkv = kwargs.get("past_key_values")
    kwargs["lserve_cache"] = pkv if isinstance(pkv, LServeCache) else None
    return args, kwargs

"""A forward resumed at a decoder layer.

The probes that change one layer at a time (the ablation probe streams one KV head; serving
refine patches one more head as streaming) would rerun the layers below it unchanged. Instead a
first forward records every decoder layer's input, and each variant restarts at its own layer
from the recorded input: exact, since the layers below run the same weights on the same input.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class DecoderParts:
    """What a forward resumed at a decoder layer runs: the decoder layers, the final norm and
    the LM head."""

    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module


def decoder_parts(model) -> DecoderParts | None:
    """The parts of a Llama-like causal LM (``model.model.layers``, ``model.model.norm``, the
    output embeddings), or None for a model laid out otherwise (which then cannot be resumed)."""
    base = getattr(model, "model", None)
    layers, norm = getattr(base, "layers", None), getattr(base, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if layers is None or norm is None or head is None or len(layers) != model.config.num_hidden_layers:
        return None
    return DecoderParts(layers, norm, head)


class LayerInputs:
    """Every decoder layer's keyword arguments, and the hidden states entering the layers in
    ``keep`` (all when None), as one forward run inside :meth:`recording` called them.

    The cache is left out of the arguments: a resumed forward brings its own. A layer called
    more than once (a prefill in chunks) has no single input to resume from, so ``complete`` is
    False."""

    def __init__(self, parts: DecoderParts | None, keep=None):
        self.layers = () if parts is None else parts.layers
        self.keep = keep
        self.hidden: dict[int, torch.Tensor] = {}
        self.kwargs: dict[int, dict] = {}
        self.calls = [0] * len(self.layers)

    @property
    def complete(self) -> bool:
        """Every layer was called exactly once: a forward can resume at any of them."""
        return bool(self.calls) and all(n == 1 for n in self.calls)

    def _hook(self, j: int):
        def record(module, args, kwargs):
            self.calls[j] += 1
            self.kwargs[j] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values")}
            if self.keep is None or j in self.keep:
                self.hidden[j] = args[0] if args else kwargs["hidden_states"]
        return record

    @contextmanager
    def recording(self):
        hooks = [layer.register_forward_pre_hook(self._hook(j), with_kwargs=True)
                 for j, layer in enumerate(self.layers)]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()


def run_from(parts: DecoderParts, inputs: LayerInputs, start: int, rows: int, cache=None) -> torch.Tensor:
    """Logits ``[B, rows, vocab]`` of the last ``rows`` positions: the decoder layers from
    ``start`` on, fed the recorded input of layer ``start``, each with its recorded keyword
    arguments (and ``cache`` as its cache)."""
    h = inputs.hidden[start]
    for j in range(start, len(parts.layers)):
        h = parts.layers[j](h, **inputs.kwargs[j], past_key_values=cache)
        if isinstance(h, tuple):
            h = h[0]
    return parts.head(parts.norm(h[:, -rows:]))

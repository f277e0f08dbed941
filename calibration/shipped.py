"""Head patterns shipped with the package, found by model identity."""

from __future__ import annotations

from pathlib import Path

from .patterns import PATTERN_FILE

_HERE = Path(__file__).parent / "shipped_patterns"

# (model_type, layers, hidden, q heads, kv heads, vocab) -> folder under shipped_patterns/
_SHIPPED = {
    ("llama", 30, 576, 9, 3, 49152): "SmolLM2-135M-Instruct",
}


def model_key(config) -> tuple:
    return (config.model_type, config.num_hidden_layers, config.hidden_size,
            config.num_attention_heads, config.num_key_value_heads, config.vocab_size)


def find_shipped_pattern(config) -> Path | None:
    """The shipped pattern's TSV for a model config, or None."""
    name = _SHIPPED.get(model_key(config))
    if name is None:
        return None
    path = _HERE / name / PATTERN_FILE
    return path if path.is_file() else None

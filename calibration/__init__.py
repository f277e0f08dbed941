"""Head identification: which KV heads may stream (DuoAttention-format patterns)."""

from .gates import gate_training_sample, train_gates
from .patterns import PATTERN_FILE, load_pattern, save_pattern, streaming_mask
from .probe import probe_heads
from .serving_refine import served_logprob, serving_refine

__all__ = ["PATTERN_FILE", "load_pattern", "save_pattern", "streaming_mask", "probe_heads",
           "train_gates", "gate_training_sample", "serving_refine", "served_logprob"]

"""Head identification: computes which KV heads may stream and writes DuoAttention-format patterns
(``lserve_hf.heads`` reads and writes them; serving never imports this package)."""

from .gates import gate_training_sample, train_gates
from .probe import probe_heads
from .serving_refine import served_logprob, serving_refine

__all__ = ["probe_heads", "train_gates", "gate_training_sample", "serving_refine", "served_logprob"]

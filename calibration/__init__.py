"""Head identification: computes which KV heads may stream and writes DuoAttention-format patterns
(``lserve_hf.heads`` reads and writes them). This package imports the serving modules; they never
import it.

- ``probe.py``: ``probe_heads``, the training-free probe (``probe_attention.py``: attention
  weights; ``probe_gates.py``: gate gradient and ablation), on ``prompts.py``'s prompts;
- ``gates.py``: ``train_gates``, DuoAttention's gate training, on ``gating.py``'s gates;
- ``serving_refine.py``: re-ranks a pattern's heads near the threshold as the patched model
  serves them;
- ``rerank.py`` (re-ranking by measured drops) and ``resume.py`` (forwards resumed at a decoder
  layer), shared by the probe and serving refine.
"""

from .gates import gate_training_sample, train_gates
from .gating import Gate, gated
from .probe import probe_heads
from .prompts import ProbePrompt, passkey_probe_prompts
from .serving_refine import served_logprob, serving_refine

__all__ = ["Gate", "ProbePrompt", "gate_training_sample", "gated", "passkey_probe_prompts", "probe_heads",
           "served_logprob", "serving_refine", "train_gates"]

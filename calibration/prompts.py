"""The prompts head probes measure on, and the log-prob of the answer they ask for.

A probe prompt is fed in one forward with its answer appended (teacher forcing), so that a
single prefill shows the model *while it retrieves*: the last ``n_query`` positions are the
query rows, each predicting the next token of the answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from lserve_hf.passkey import passkey_prompt


@dataclass
class ProbePrompt:
    """One pre-tokenized probe prompt.

    input_ids: 1-D token ids (prompt followed by the answer, if any).
    n_query: how many final positions are the query rows looked at (e.g. the positions that predict
        the answer's tokens).
    needle: token positions of the needle (a slice, or a sequence of indices), or None when the prompt
        has no needle: then only the ``far`` mass is measured.
    answer: the ``n_query`` token ids the query rows should predict (for ``metric="gradient"``);
        None: the fed tokens after each query row, and the model's own greedy token for the last.
    """

    input_ids: torch.Tensor
    n_query: int = 8
    needle: slice | Sequence[int] | None = None
    answer: Sequence[int] | None = None

    @property
    def rows(self) -> int:
        """Query rows, at least one."""
        return max(1, int(self.n_query))


def answer_logprob(logits: torch.Tensor, prompt: ProbePrompt) -> torch.Tensor:
    """Sum over the query rows of log p(the token each should predict), from the logits of the
    last ``prompt.rows`` positions (``[rows, vocab]``, or ``[1, rows, vocab]``); differentiable.

    Without an answer the targets are the fed tokens that follow each row, and for the last row
    the model's own greedy token (nothing was fed after it)."""
    r = prompt.rows
    logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1])[-r:].float(), dim=-1)   # [r, V]
    if prompt.answer is not None:
        tgt = torch.as_tensor(list(prompt.answer)[-r:], dtype=torch.long, device=logp.device)
    else:
        ids = prompt.input_ids.reshape(-1)
        fed = ids[ids.numel() - r + 1:].to(logp.device)
        tgt = torch.cat([fed, logp[-1:].detach().argmax(-1)])
    return logp.gather(-1, tgt[:, None]).sum()


def passkey_probe_prompts(tokenizer, lengths: Iterable[int], depths: Iterable[float],
                          seeds: Iterable[int] = (0,)) -> list[ProbePrompt]:
    """Passkey prompts (no chat template) with the answer appended; query rows are the positions
    that predict the answer's tokens; needle = the tokens of the sentence holding the passkey."""
    out = []
    for seed in seeds:
        for n in lengths:
            for d in depths:
                p = passkey_prompt(tokenizer, int(n), float(d), seed=int(seed), chat=False)
                prompt_ids = tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)
                answer_ids = tokenizer(" " + p.passkey, add_special_tokens=False).input_ids
                # the rows that predict the answer: the last prompt token and all answer tokens but
                # the last (which predicts nothing of the answer, so it is not fed)
                ids = list(prompt_ids.input_ids) + list(answer_ids[:-1])
                # needle: "The pass key is N. Remember it. N is the pass key." (first two N's)
                c0 = p.text.index(" The pass key is " + p.passkey)
                c1 = p.text.index(p.passkey + " is the pass key", c0) + len(p.passkey + " is the pass key.")
                needle = [i for i, (a, b) in enumerate(prompt_ids.offset_mapping) if b > c0 and a < c1]
                out.append(ProbePrompt(torch.tensor(ids), n_query=len(answer_ids), needle=needle,
                                       answer=list(answer_ids)))
    return out

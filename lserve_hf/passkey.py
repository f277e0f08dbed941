"""Passkey retrieval prompts: a number hidden at a chosen depth of filler text, asked for at the end.

The classic long-context probe (Mohtashami & Jaggi 2023). Generated offline and seeded, sized in
tokens with the model's own tokenizer.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")


@dataclass
class PasskeyPrompt:
    text: str
    passkey: str
    depth: float
    n_tokens: int


def passkey_prompt(tokenizer, n_tokens: int, depth: float, seed: int = 0,
                   chat: bool = True) -> PasskeyPrompt:
    """A prompt of about ``n_tokens`` tokens with a 5-digit passkey at relative ``depth`` (0..1)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1].")
    rng = random.Random(seed * 1000003 + int(depth * 1000) + n_tokens)
    passkey = str(rng.randint(10000, 99999))
    head = ("There is an important info hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about the important information there.\n\n")
    needle = f" The pass key is {passkey}. Remember it. {passkey} is the pass key. "
    question = "\n\nWhat is the pass key? The pass key is"
    per_filler = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    fixed = len(tokenizer(head + needle + question, add_special_tokens=False).input_ids)
    n_fill = max(1, (n_tokens - fixed - (40 if chat else 0)) // per_filler)
    before = int(round(n_fill * depth))
    body = head + FILLER * before + needle + FILLER * (n_fill - before)
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": body + "\n\nWhat is the pass key?"}],
            tokenize=False, add_generation_prompt=True) + "The pass key is"
    else:
        text = body + question
    n = len(tokenizer(text, add_special_tokens=False).input_ids)
    return PasskeyPrompt(text=text, passkey=passkey, depth=depth, n_tokens=n)


def answer_matches(answer: str, passkey: str) -> bool:
    """The passkey appears as a whole number in the answer."""
    return passkey in re.findall(r"\d+", answer)

"""Offline, seeded long-context tasks: passkey retrieval and RULER-style needle-in-a-haystack.

Every generator returns a :class:`Case`: the prompt text (sized in tokens with the model's own
tokenizer, within a few percent of the requested length), the strings the answer must contain,
and where the needles sit (character spans) so that their depth can be checked.

Tasks (names accepted by :func:`make_case`):
    passkey            a 5-digit pass key in filler text (the classic probe, as lserve_hf.passkey)
    niah_single        one "special magic number/uuid for <key>" needle
    niah_multikey      the asked needle surrounded by distractor needles with other keys
    niah_multivalue    one key with several values, all must be returned
    niah_multiquery    several keys asked at once, every value must be returned
    vt                 variable tracking: follow a chain ``VAR X = VAR Y``, name every variable
                       that holds the value
    code               a 5-digit secret code in one sentence (with the ``prose`` haystack: real text)
Haystacks: ``"filler"`` (repeated filler sentences), ``"essay"`` (seeded synthetic prose),
``"prose"`` (real English prose: CPython's reference documentation, ``pydoc_data.topics``, which
ships with Python) or the text of any file (``haystack_file=``).
"""

from __future__ import annotations

import random
import re
import uuid
from dataclasses import asdict, dataclass, field

from ..passkey import FILLER

TASKS = ("passkey", "code", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt")
HAYSTACKS = ("filler", "essay", "prose")

# default tokens to generate per task (answers of the multi-needle tasks are longer)
DEFAULT_NEW_TOKENS = {"passkey": 12, "code": 8, "niah_single": 16, "niah_multikey": 16,
                      "niah_multivalue": 64, "niah_multiquery": 64, "vt": 40}
UUID_EXTRA_TOKENS = 32     # a UUID is ~36 tokens for byte-level tokenizers

_ADJ = ("ancient", "brave", "calm", "dusty", "eager", "fancy", "gentle", "hollow", "icy", "jolly",
        "keen", "lively", "mellow", "noisy", "odd", "proud", "quiet", "rapid", "silent", "tidy",
        "upbeat", "vivid", "wary", "young", "zealous", "bitter", "crisp", "damp", "faint", "grand")
_NOUN = ("anchor", "basket", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island",
         "jacket", "kettle", "ladder", "meadow", "needle", "orchid", "pencil", "quartz", "river",
         "saddle", "tunnel", "umbrella", "violin", "wagon", "yogurt", "zipper", "lantern", "mirror",
         "copper", "feather", "glacier")

# ---------------------------------------------------------------------------------------------
# Haystacks


_TOPICS = ("startups", "cities", "gardening", "mathematics", "old maps", "rivers", "music",
           "libraries", "bridges", "weather", "trains", "languages", "bread", "painting", "chess")
_ESSAY_TEMPLATES = (
    "Most people who think about {t} for long enough notice that the {n} matters more than the {n2}.",
    "When I first started looking at {t}, I assumed the {n} was the hard part, but it was the {n2}.",
    "The surprising thing about {t} is how often a small {n} changes the whole {n2}.",
    "You can learn a lot about {t} by asking why the {n} was built that way in the first place.",
    "In practice, {t} rewards patience: the {n} improves slowly, and then all at once.",
    "A good rule of thumb is to ignore the {n} until the {n2} is working.",
    "Few books about {t} explain the {n}, because the authors took it for granted.",
    "It is easy to overrate the {n} and underrate the {n2}, especially early on.",
    "The best work on {t} tends to come from people who care about the {n} for its own sake.",
    "If you want to understand {t}, follow the {n} and see where it leads.",
    "Over time, the {n} becomes a habit rather than a decision.",
    "There is usually a simpler explanation, and it usually involves the {n2}.",
)
_ESSAY_NOUNS = ("detail", "structure", "habit", "tool", "question", "method", "audience", "budget",
                "schedule", "material", "story", "pattern", "mistake", "routine", "idea")


def split_sentences(text: str) -> list[str]:
    """The sentences of a text, whitespace normalised (the haystack a text file gives)."""
    parts = [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]
    return [s for s in parts if s]


def haystack_sentences(kind: str = "filler", seed: int = 0, haystack_file: str | None = None,
                       n: int = 400) -> list[str]:
    """At least ``n`` sentences of haystack (repeated cyclically when a file is short)."""
    if haystack_file:
        with open(haystack_file, encoding="utf-8", errors="replace") as f:
            base = split_sentences(f.read())
        if not base:
            raise ValueError(f"{haystack_file} holds no text to use as a haystack.")
        return [base[i % len(base)] for i in range(max(n, len(base)))]
    if kind == "filler":
        base = split_sentences(FILLER)
        return [base[i % len(base)] for i in range(n)]
    if kind == "essay":
        rng = random.Random(f"essay-{seed}")
        out = []
        for _ in range(n):
            n1, n2 = rng.sample(_ESSAY_NOUNS, 2)
            out.append(rng.choice(_ESSAY_TEMPLATES).format(t=rng.choice(_TOPICS), n=n1, n2=n2))
        return out
    if kind == "prose":
        topics = prose_by_topic()
        rng = random.Random(f"prose-{seed}")
        names = sorted(topics)
        rng.shuffle(names)
        stream = topics[names[0]][rng.randrange(len(topics[names[0]])):]
        for name in names[1:]:
            if len(stream) >= n:
                break
            stream = stream + topics[name]
        return [stream[i % len(stream)] for i in range(max(n, len(stream)))]
    raise ValueError(f"haystack={kind!r}: use one of {HAYSTACKS} or haystack_file=PATH.")


_PROSE: dict | None = None


def prose_by_topic() -> dict[str, list[str]]:
    """Real English prose that ships with Python: the sentences of CPython's reference
    documentation (``pydoc_data.topics``), topic by topic. Only running text: unindented
    paragraphs (code, grammar and tables are indented), no titles, sentences of five words or
    more that start upper-case, end with . ! or ?, and hold no digit (no number competes with a
    needle's)."""
    global _PROSE
    if _PROSE is None:
        import pydoc_data.topics as pydoc_topics

        out = {}
        for name in sorted(pydoc_topics.topics):
            sents = []
            for para in re.split(r"\n\s*\n", pydoc_topics.topics[name]):
                lines = [ln for ln in para.split("\n") if ln.strip()]
                if not lines or any(ln.startswith(" ") for ln in lines):
                    continue
                if re.fullmatch(r"[*=\-^~\"]+", lines[-1].strip()):
                    continue   # a title and its underline
                joined = " ".join(ln.strip() for ln in lines)
                if "::=" in joined or ">>>" in joined:
                    continue
                sents += [t for t in split_sentences(joined) if len(t.split()) >= 5 and t[0].isupper()
                          and t[-1] in ".!?" and not re.search(r"\d", t)]
            if sents:
                out[name] = sents
        _PROSE = out
    return _PROSE


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    task: str
    length: int                    # requested prompt length (tokens)
    depth: float                   # requested depth of the (first) asked needle, 0..1
    seed: int
    prompt: str
    expected: list[str]
    n_tokens: int                  # measured prompt length (tokens, as the runner tokenizes it)
    haystack_span: tuple[int, int]  # characters of the haystack (needles included) in the prompt
    needle_spans: list[tuple[int, int]] = field(default_factory=list)  # asked needles, in order
    distractor_spans: list[tuple[int, int]] = field(default_factory=list)
    max_new_tokens: int = 16

    def to_dict(self) -> dict:
        return asdict(self)


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text).input_ids)   # special tokens included: exactly what the model sees


def _value(rng: random.Random, value_type: str) -> str:
    if value_type == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    if value_type == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"value_type={value_type!r}: use 'number' or 'uuid'.")


def needle_keys(rng: random.Random, k: int) -> list[str]:
    """``k`` distinct "adjective-noun" keys that needles are stored under."""
    pairs = rng.sample([(a, b) for a in _ADJ for b in _NOUN], k)
    return [f"{a}-{b}" for a, b in pairs]


def _spread(depth: float, k: int, step: float) -> list[float]:
    """``k`` depths from ``depth`` on, ``step`` apart (closer when they would pass the end)."""
    if k > 1:
        step = min(step, (1.0 - depth) / (k - 1))
    return [min(1.0, depth + i * step) for i in range(k)]


def _spec(task: str, rng: random.Random, depth: float, value_type: str, n_multi: int):
    """(head, needles, question, expected). ``needles``: (depth, text, asked) in prompt order."""
    kind = "number" if value_type == "number" else "uuid"
    rhead = (f"Some special magic {kind}s are hidden within the following text. Make sure to memorize "
             f"them. I will quiz you about the {kind}s afterwards.\n\n")

    def needle(key, val):
        return f"One of the special magic {kind}s for {key} is: {val}."

    if task == "passkey":
        pk = str(rng.randint(10000, 99999))
        head = ("There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about the important information there.\n\n")
        return (head, [(depth, f"The pass key is {pk}. Remember it. {pk} is the pass key.", True)],
                "\n\nWhat is the pass key? The pass key is", [pk])
    if task == "code":
        code = str(rng.randint(10000, 99999))
        head = ("The following text is taken from the Python reference documentation. A secret code is "
                "hidden somewhere in it. Find the secret code and remember it; you will be asked for it "
                "at the end.\n\n")
        return (head, [(depth, f"The secret code for the archive is {code}.", True)],
                "\n\nWhat is the secret code for the archive? The secret code for the archive is", [code])
    if task == "niah_single":
        key, val = needle_keys(rng, 1)[0], _value(rng, value_type)
        q = (f"\n\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
             f"The special magic {kind} for {key} mentioned in the provided text is")
        return rhead, [(depth, needle(key, val), True)], q, [val]
    if task == "niah_multikey":
        keys = needle_keys(rng, n_multi)
        vals = [_value(rng, value_type) for _ in keys]
        # distractors on both sides of the asked needle, 5% of the haystack apart
        ask = n_multi // 2
        # distractors 5% of the haystack apart on both sides; mirrored where they would leave [0, 1]
        depths = [depth + (i - ask) * 0.05 for i in range(n_multi)]
        depths = [min(1.0, max(0.0, 2 * depth - d if not 0.0 <= d <= 1.0 else d)) for d in depths]
        needles = [(depths[i], needle(keys[i], vals[i]), i == ask) for i in range(n_multi)]
        q = (f"\n\nWhat is the special magic {kind} for {keys[ask]} mentioned in the provided text? "
             f"The special magic {kind} for {keys[ask]} mentioned in the provided text is")
        return rhead, needles, q, [vals[ask]]
    if task == "niah_multivalue":
        key = needle_keys(rng, 1)[0]
        vals = [_value(rng, value_type) for _ in range(n_multi)]
        needles = [(d, needle(key, v), True) for d, v in zip(_spread(depth, n_multi, 0.05), vals)]
        q = (f"\n\nWhat are all the special magic {kind}s for {key} mentioned in the provided text? "
             f"The special magic {kind}s for {key} mentioned in the provided text are")
        return rhead, needles, q, vals
    if task == "niah_multiquery":
        keys = needle_keys(rng, n_multi)
        vals = [_value(rng, value_type) for _ in keys]
        needles = [(d, needle(k, v), True) for d, k, v in zip(_spread(depth, n_multi, 0.05), keys, vals)]
        ks = ", ".join(keys[:-1]) + f" and {keys[-1]}"
        q = (f"\n\nWhat are all the special magic {kind}s for {ks} mentioned in the provided text? "
             f"The special magic {kind}s for {ks} mentioned in the provided text are")
        return rhead, needles, q, vals
    if task == "vt":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(n_multi + 1)]
        val = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {val}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, len(names))]
        needles = [(d, s, True) for d, s in zip(_spread(depth, len(chain), 0.05), chain)]
        head = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
        q = (f"\n\nFind all variables that are assigned the value {val} in the text above. Answer: "
             f"According to the chain(s) of variable assignment in the text above, {len(names)} variables "
             f"are assigned the value {val}, they are:")
        return head, needles, q, names
    raise ValueError(f"task={task!r}: use one of {', '.join(TASKS)}.")


def make_case(tokenizer, task: str, length: int, depth: float, seed: int = 0, *,
              haystack: str = "filler", haystack_file: str | None = None, value_type: str = "number",
              n_multi: int = 4, chat: bool = False) -> Case:
    """One prompt of about ``length`` tokens for ``task`` with its (first) asked needle at ``depth``.

    Deterministic in (task, length, depth, seed, haystack, value_type). ``n_multi``: needles of the
    multi-needle tasks (keys, values or hops). ``chat``: wrap in the tokenizer's chat template.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1].")
    rng = random.Random(f"{task}|{length}|{depth:.4f}|{seed}|{value_type}")
    head, needles, question, expected = _spec(task, rng, depth, value_type, n_multi)

    def wrap(hay: str) -> tuple[str, int]:
        body = head + hay
        if chat and getattr(tokenizer, "chat_template", None):
            q, prefix = question.rsplit("?", 1)
            text = tokenizer.apply_chat_template([{"role": "user", "content": body + q + "?"}],
                                                 tokenize=False, add_generation_prompt=True)
            start = text.index(body) + len(head)
            return text + prefix.strip(), start
        return body + question, len(head)

    fixed = _count(tokenizer, wrap(" ".join(t for _, t, _ in needles))[0])
    if length <= fixed + 8:
        raise ValueError(f"length={length} tokens is too short for task {task!r} (needs > {fixed + 8}).")
    sentences = haystack_sentences(haystack, seed, haystack_file,
                                   n=max(64, 2 * length // 4))
    sizes = [len(tokenizer(" " + s, add_special_tokens=False).input_ids) for s in sentences]
    # grow the sentence pool if a long request needs more (few tokens per sentence)
    while sum(sizes) < length:
        sentences, sizes = sentences + sentences, sizes + sizes

    def build(n_sent: int):
        sents = sentences[:n_sent]
        cum, tot = [0], 0
        for s in sizes[:n_sent]:
            tot += s
            cum.append(tot)
        # insertion index for each needle: the sentence boundary closest to its token depth
        items = [(min(range(n_sent + 1), key=lambda i: abs(cum[i] - d * tot)), k, t, a)
                 for k, (d, t, a) in enumerate(needles)]
        items.sort()
        pieces, spans, j = [], [], 0
        pos = 0
        for i in range(n_sent + 1):
            while j < len(items) and items[j][0] == i:
                text = items[j][2]
                start = pos + (1 if pieces else 0)
                pieces.append(text)
                spans.append((items[j][1], start, start + len(text), items[j][3]))
                pos = start + len(text)
                j += 1
            if i < n_sent:
                start = pos + (1 if pieces else 0)
                pieces.append(sents[i])
                pos = start + len(sents[i])
        hay = " ".join(pieces)
        prompt, off = wrap(hay)
        return prompt, off, hay, spans

    # first guess from per-sentence counts, then correct with the measured length
    budget = length - fixed
    n_sent = 0
    acc = 0
    while n_sent < len(sizes) and acc + sizes[n_sent] <= budget:
        acc += sizes[n_sent]
        n_sent += 1
    for _ in range(6):
        prompt, off, hay, spans = build(n_sent)
        n = _count(tokenizer, prompt)
        diff = length - n
        if abs(diff) <= max(2, 0.01 * length):
            break
        step = 0
        acc = 0
        if diff > 0:
            while n_sent + step < len(sizes) and acc + sizes[n_sent + step] <= diff:
                acc += sizes[n_sent + step]
                step += 1
            n_sent += max(step, 1) if n_sent + 1 < len(sizes) else 0
        else:
            while n_sent - step > 1 and acc < -diff:
                acc += sizes[n_sent - step - 1]
                step += 1
            n_sent -= max(step, 1)
    spans.sort(key=lambda s: s[0])
    return Case(task=task, length=length, depth=depth, seed=seed, prompt=prompt, expected=list(expected),
                n_tokens=n, haystack_span=(off, off + len(hay)),
                needle_spans=[(off + a, off + b) for _, a, b, asked in spans if asked],
                distractor_spans=[(off + a, off + b) for _, a, b, asked in spans if not asked],
                max_new_tokens=_new_tokens(task, value_type, len(expected)))


def _new_tokens(task: str, value_type: str, n_expected: int) -> int:
    extra = UUID_EXTRA_TOKENS * n_expected if value_type == "uuid" and task.startswith("niah") else 0
    return DEFAULT_NEW_TOKENS[task] + extra


def make_grid(tokenizer, tasks, lengths, depths, seed: int = 0, seeds=None, **kwargs) -> list[Case]:
    """Every (task, length, depth, seed) case, lengths ascending (so partial runs cover all
    methods). ``seeds``: several seeds (haystack text and needle values); default ``(seed,)``."""
    seeds = (seed,) if seeds is None else tuple(seeds)
    return [make_case(tokenizer, t, L, d, s, **kwargs)
            for L in sorted(lengths) for t in tasks for s in seeds for d in depths]

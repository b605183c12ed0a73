"""A synthetic multiple-choice question-answering world standing in for ARC (paper §3, Qwen2-ARC-LoRA).

The world has 18 *sources* (task families with exact answers), each a generator of ARC-style items: a question,
four options, one correct answer letter. Each source has a ``standard`` level and a harder ``challenge`` level
(larger numbers, longer words and lists), like ARC-Easy / ARC-Challenge. Everything is deterministic from integer
seeds (numpy ``default_rng``).

Text format (one line per item, character-level friendly)::

    prompt       "Q: what is 12 + 7?\\nA:"
    continuation " 19"                      (one per option; the answer is the option of highest log-likelihood)

`byte_tokenizer` builds a real ``transformers`` tokenizer (Qwen2's byte-level BPE with no merges: one token per
character) that ``AutoTokenizer.from_pretrained(dir)`` loads offline after ``save_pretrained``.
"""
from __future__ import annotations

import string
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

__all__ = ["QAItem", "SOURCES", "LEVELS", "make_item", "make_split", "make_world", "byte_tokenizer", "CHARSET",
           "prompt_text"]

LEVELS = ("standard", "challenge")
LETTERS = "ABCD"
ALPHABET = string.ascii_lowercase
CHARSET = string.ascii_letters + string.digits + " ?:,.'+-*=()\n"


@dataclass(frozen=True)
class QAItem:
    source: str
    level: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"

    @property
    def answer_index(self) -> int:
        return LETTERS.index(self.answer)

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer_index]

    def to_json(self) -> dict:
        d = asdict(self)
        d["choices"] = list(self.choices)
        return d


def prompt_text(item: QAItem) -> str:
    return f"Q: {item.question}\nA:"


# --- helpers ----------------------------------------------------------------------------------------------------
def _word(rng, lo, hi) -> str:
    n = int(rng.integers(lo, hi + 1))
    return "".join(rng.choice(list(ALPHABET), size=n))


def _options(rng, correct, candidates) -> tuple[tuple[str, ...], str]:
    """Four distinct options: the correct one and three distractors picked from ``candidates`` (in order of
    preference after a shuffle), shuffled; returns (choices, answer letter)."""
    correct = str(correct)
    pool = []
    for c in candidates:
        c = str(c)
        if c != correct and c not in pool:
            pool.append(c)
    while len(pool) < 3:  # a small question space (e.g. repeated digits): mutate one character of the answer
        i = int(rng.integers(0, len(correct)))
        alphabet = string.digits if correct[i].isdigit() else ALPHABET
        c = correct[:i] + str(rng.choice(list(alphabet))) + correct[i + 1:]
        if c != correct and c not in pool:
            pool.append(c)
    order = rng.permutation(len(pool))
    picked = [pool[i] for i in order[:3]]
    pos = int(rng.integers(0, 4))
    choices = picked[:pos] + [correct] + picked[pos:]
    return tuple(choices), LETTERS[pos]


def _near(rng, x, spread=3, lo=0):
    c = [x + d for d in range(-spread, spread + 1) if d and x + d >= lo]
    return c + [x + 10, max(lo, x - 10)]


def _hard(level):
    return level == "challenge"


# --- the sources ------------------------------------------------------------------------------------------------
def _addition(rng, level):
    hi = 99 if _hard(level) else 20
    a, b = (int(v) for v in rng.integers(0, hi + 1, size=2))
    return f"what is {a} + {b}?", a + b, _near(rng, a + b)


def _subtraction(rng, level):
    hi = 99 if _hard(level) else 20
    a, b = sorted(int(v) for v in rng.integers(0, hi + 1, size=2))[::-1]
    return f"what is {a} - {b}?", a - b, _near(rng, a - b)


def _multiplication(rng, level):
    a = int(rng.integers(2, 13 if _hard(level) else 10))
    b = int(rng.integers(2, 13 if _hard(level) else 10))
    return f"what is {a} * {b}?", a * b, _near(rng, a * b) + [a + b, a * (b + 1)]


def _comparison(rng, level):
    hi = 999 if _hard(level) else 50
    a, b = (int(v) for v in rng.choice(hi + 1, size=2, replace=False))
    return f"which is larger, {a} or {b}?", max(a, b), [min(a, b), a + b, abs(a - b), max(a, b) + 1,
                                                                    max(a, b) - 1, min(a, b) + 1, max(a, b) + 10]


def _parity(rng, level):
    n = int(rng.integers(100, 10000) if _hard(level) else rng.integers(0, 100))
    return f"is {n} even or odd?", "even" if n % 2 == 0 else "odd", ["even", "odd", "both", "neither"]


def _count_letter(rng, level):
    w = _word(rng, 9, 12) if _hard(level) else _word(rng, 4, 6)
    ch = str(rng.choice(list(w))) if rng.random() < 0.8 else str(rng.choice(list(ALPHABET)))
    c = w.count(ch)
    return f"how many times does '{ch}' appear in '{w}'?", c, _near(rng, c, 3)


def _word_length(rng, level):
    w = _word(rng, 8, 12) if _hard(level) else _word(rng, 2, 6)
    return f"how many letters are in '{w}'?", len(w), _near(rng, len(w), 3, lo=1)


def _reverse_word(rng, level):
    w = _word(rng, 6, 8) if _hard(level) else _word(rng, 3, 4)
    r = w[::-1]
    cands = [w, r[1:] + r[0], r[-1] + r[:-1], "".join(sorted(w)), "".join(rng.permutation(list(w)))]
    cands += ["".join(rng.permutation(list(w))) for _ in range(6)]
    return f"what is '{w}' reversed?", r, cands


def _shift_letter(rng, level, sign):
    k = int(rng.integers(2, 4)) if _hard(level) else 1
    i = int(rng.integers(k, 26 - k))
    ch = ALPHABET[i]
    ans = ALPHABET[i + sign * k]
    cands = [ALPHABET[i - sign * k], ch] + [ALPHABET[j] for j in (i + sign * (k + 1), i + sign * (k - 1),
                                                                     i - sign * (k + 1)) if 0 <= j < 26]
    where = "after" if sign > 0 else "before"
    return f"which letter is {k} {where} '{ch}'?", ans, cands


def _next_letter(rng, level):
    return _shift_letter(rng, level, +1)


def _previous_letter(rng, level):
    return _shift_letter(rng, level, -1)


def _numbers(rng, level):
    n = int(rng.integers(5, 7)) if _hard(level) else int(rng.integers(3, 5))
    hi = 99 if _hard(level) else 20
    return [int(v) for v in rng.choice(hi + 1, size=n, replace=False)]


def _max_of_list(rng, level):
    xs = _numbers(rng, level)
    return f"what is the largest of {', '.join(map(str, xs))}?", max(xs), xs + [max(xs) + 1, sum(xs)]


def _min_of_list(rng, level):
    xs = _numbers(rng, level)
    return f"what is the smallest of {', '.join(map(str, xs))}?", min(xs), xs + [min(xs) + 1, max(xs) + 2]


def _sort_digits(rng, level):
    n = int(rng.integers(5, 7)) if _hard(level) else int(rng.integers(3, 5))
    ds = [str(int(d)) for d in rng.integers(0, 10, size=n)]
    s = "".join(sorted(ds))
    cands = ["".join(sorted(ds, reverse=True)), "".join(ds)] + ["".join(rng.permutation(ds)) for _ in range(8)]
    return f"sort the digits of {''.join(ds)}", s, cands


def _copy(rng, level):
    w = _word(rng, 8, 11) if _hard(level) else _word(rng, 3, 5)
    cands = [w[:-1], w + w[-1], w[1:], w[::-1], w[:1] + w]
    return f"repeat '{w}'", w, cands


def _alphabetical_first(rng, level):
    n = 5 if _hard(level) else 3
    ws = []
    while len(ws) < n:
        w = _word(rng, 3, 5)
        if w not in ws and all(w[0] != x[0] for x in ws):
            ws.append(w)
    return f"which word comes first in the alphabet: {', '.join(ws)}?", min(ws), ws + [max(ws)[::-1]]


def _last_letter(rng, level):
    w = _word(rng, 8, 12) if _hard(level) else _word(rng, 3, 5)
    return f"what is the last letter of '{w}'?", w[-1], [w[0], w[-2], w[len(w) // 2]] + list(rng.choice(
        list(ALPHABET), size=4))


def _digit_sum(rng, level):
    n = int(rng.integers(100, 100000) if _hard(level) else rng.integers(10, 100))
    s = sum(int(d) for d in str(n))
    return f"what is the sum of the digits of {n}?", s, _near(rng, s)


def _count_vowels(rng, level):
    w = _word(rng, 9, 12) if _hard(level) else _word(rng, 3, 6)
    c = sum(ch in "aeiou" for ch in w)
    return f"how many vowels are in '{w}'?", c, _near(rng, c, 3)


SOURCES: dict[str, Callable] = {
    "addition": _addition, "subtraction": _subtraction, "multiplication": _multiplication,
    "comparison": _comparison, "parity": _parity, "count_letter": _count_letter, "word_length": _word_length,
    "reverse_word": _reverse_word, "next_letter": _next_letter, "previous_letter": _previous_letter,
    "max_of_list": _max_of_list, "min_of_list": _min_of_list, "sort_digits": _sort_digits, "copy": _copy,
    "alphabetical_first": _alphabetical_first, "last_letter": _last_letter, "digit_sum": _digit_sum,
    "count_vowels": _count_vowels,
}


def make_item(source: str, level: str, rng: np.random.Generator) -> QAItem:
    if source not in SOURCES:
        raise KeyError(f"unknown QA source {source!r}; known: {', '.join(SOURCES)}")
    if level not in LEVELS:
        raise KeyError(f"unknown level {level!r}; known: {', '.join(LEVELS)}")
    q, ans, cands = SOURCES[source](rng, level)
    choices, letter = _options(rng, ans, cands)
    return QAItem(source, level, q, choices, letter)


def make_split(n_per_source: int, level: str, seed: int, sources=None, exclude: set[str] | None = None
               ) -> list[QAItem]:
    """``n_per_source`` distinct items of every source (questions in ``exclude`` skipped), deterministic from
    ``(seed, source)``; items are ordered source by source."""
    items = []
    exclude = exclude or set()
    for s_i, src in enumerate(sources or SOURCES):
        rng = np.random.default_rng([int(seed), s_i, LEVELS.index(level)])
        seen = set(exclude)
        got, tries = 0, 0
        while got < n_per_source:
            it = make_item(src, level, rng)
            tries += 1
            if it.question in seen and tries < 50 * n_per_source:
                continue
            seen.add(it.question)
            items.append(it)
            got += 1
    return items


def make_world(seed: int, n_train: int, n_eval: int, n_test: int, n_challenge: int, n_retest: int = 0
               ) -> dict[str, list[QAItem]]:
    """The world's splits, like ARC's: ``test`` (standard level, the base model's per-source accuracy),
    ``challenge`` (the harder level: the held-out test of finetuned models), and per source ``train`` (finetuning
    pools) and ``eval`` (for eval loss), each half standard, half challenge level (as ARC's training set holds Easy
    and Challenge questions). No split shares a question with another (as far as a source's question space allows).

    With ``n_retest`` > 0 the world also holds the *retest* splits that measure how reliable a label is:
    ``challenge_retest`` (``n_challenge`` more challenge items per source) and ``eval_retest`` (``n_eval`` more eval
    items), disjoint from every other split, so a label measured on them is an independent second measurement.
    Without it the splits are exactly those of earlier worlds (same seeds, same items).
    """
    test = make_split(n_test, "standard", seed * 8 + 1)
    challenge = make_split(n_challenge, "challenge", seed * 8 + 2)
    used = {it.question for it in test + challenge}
    out = {"test": test, "challenge": challenge}
    if n_retest:
        out["challenge_retest"] = make_split(n_challenge, "challenge", seed * 8 + 1_000_002, exclude=used)
        used |= {it.question for it in out["challenge_retest"]}
    parts = [("eval", n_eval, 3), ("train", n_train, 5)]
    if n_retest:
        parts.append(("eval_retest", n_eval, 1_000_003))
    for name, n, off in parts:
        st = make_split(n - n // 2, "standard", seed * 8 + off, exclude=used)
        ch = make_split(n // 2, "challenge", seed * 8 + off + 1, exclude=used)
        used |= {it.question for it in st + ch}
        # source by source: standard items then challenge items of that source
        out[name] = [it for src in SOURCES for part in (st, ch) for it in part if it.source == src]
    return out


def byte_tokenizer():
    """A real ``Qwen2Tokenizer`` (byte-level BPE) with no merges: one token per byte, so one per ASCII character.

    Vocabulary: ``<|endoftext|>`` (eos, id 0), ``<|pad|>`` (id 1), then the 256 byte symbols; any text round-trips.
    Being the Qwen2 family's own tokenizer class, ``AutoTokenizer.from_pretrained(dir)`` next to a Qwen2 config
    loads it unchanged (a generic tokenizer there would be silently replaced by Qwen2's pre-tokenizer).
    """
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1}
    for sym in bytes_to_unicode().values():
        vocab[sym] = len(vocab)
    return Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, eos_token="<|endoftext|>", pad_token="<|pad|>",
                          model_max_length=256)

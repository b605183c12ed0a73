"""A real `transformers.CLIPTokenizer` for the zoo's caption language, built offline from generated files.

CLIP's tokenizer is byte-level BPE: ``vocab.json`` maps tokens to ids (the 256 byte symbols, the same with the
end-of-word marker ``</w>``, one token per merge, then ``<|startoftext|>`` and ``<|endoftext|>``) and ``merges.txt``
lists merges in rank order. `build_clip_tokenizer` learns the merges with plain BPE on the caption vocabulary until
every caption word is one token, writes both files in CLIP's format and saves the tokenizer with
``save_pretrained``; ``CLIPTokenizer.from_pretrained(dir)`` then loads it like any CLIP tokenizer. Words outside
the vocabulary still encode (as byte pieces), so any text round-trips.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Iterable

__all__ = ["bytes_to_unicode", "learn_merges", "write_clip_vocab", "build_clip_tokenizer", "caption_vocabulary",
           "MAX_LENGTH"]

MAX_LENGTH = 32  # tokens per caption including <|startoftext|> and <|endoftext|>; captions here use at most ~24
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from bytes to printable unicode symbols."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def caption_vocabulary() -> list[str]:
    """Every word the zoo's captions and prompts use (faces, fashion, DreamBooth instance words)."""
    from .faces import VOCABULARY as FACE_WORDS
    from .fashion import VOCABULARY as FASHION_WORDS

    instance_words = {"celebrity", "person", "thing", "skd", "people", "picture", "portrait", "clothing", "item"}
    return sorted(set(FACE_WORDS) | set(FASHION_WORDS) | instance_words)


def learn_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Plain BPE (most frequent adjacent pair first, ties broken alphabetically) until every word is one symbol.

    Words are byte-encoded and end with ``</w>`` on their last symbol, as in CLIP.
    """
    b2u = bytes_to_unicode()
    seqs = Counter()
    for w in words:
        w = w.strip().lower()
        if not w:
            continue
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] = sym[-1] + "</w>"
        seqs[tuple(sym)] += 1
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter()
        for seq, f in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += f
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        new = Counter()
        for seq, f in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            new[tuple(out)] += f
        seqs = new


def write_clip_vocab(out_dir: Path, words: Iterable[str]) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` in CLIP's format for ``words``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(words)
    symbols = list(bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    vf, mf = out_dir / "vocab.json", out_dir / "merges.txt"
    vf.write_text(json.dumps(vocab, ensure_ascii=False))
    mf.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vf, mf


def build_clip_tokenizer(out_dir: Path, words: Iterable[str] | None = None, max_length: int = MAX_LENGTH):
    """Generate the vocabulary files, load them as a `CLIPTokenizer`, save it with ``save_pretrained`` and return it."""
    from transformers import CLIPTokenizer

    out_dir = Path(out_dir)
    write_clip_vocab(out_dir, caption_vocabulary() if words is None else words)
    tok = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=max_length)
    tok.save_pretrained(str(out_dir))
    return tok

"""Vocabulary: tokenise captions, build from the training split only, encode and decode."""

from collections import Counter
from collections.abc import Iterable

# Captions are split exactly as coco-caption scores them, so generated words are the scorer's tokens.
from .tokenizer import tokenize

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

__all__ = ["Vocab", "tokenize", "SPECIALS"]


class Vocab:
    """Word <-> id table; ids 0..3 are <pad>, <start>, <end>, <unk>."""

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str], max_len: int = 20):
        self.itos: list[str] = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        self.max_len = max_len  # words per caption, <start>/<end> not counted

    @classmethod
    def build(cls, captions: Iterable[str], min_freq: int = 1, max_len: int = 20) -> "Vocab":
        """Build from training captions: words seen at least `min_freq` times, most frequent first."""
        counts = Counter(w for c in captions for w in tokenize(c))
        # Sort by (-count, word) so the same captions always give the same ids.
        words = [w for w, n in sorted(counts.items(), key=lambda x: (-x[1], x[0])) if n >= min_freq]
        return cls(words, max_len=max_len)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, caption: str) -> list[int]:
        """Caption -> [<start>, w1..wn, <end>], truncated to max_len words; unknown words -> <unk>."""
        ids = [self.stoi.get(w, self.unk_id) for w in tokenize(caption)[: self.max_len]]
        return [self.start_id, *ids, self.end_id]

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> caption text, stopping at <end> and skipping <start>/<pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            words.append(self.itos[i])
        return " ".join(words)

    def banned(self, allow_unk: bool = False) -> tuple[int, ...]:
        """Ids a decoder must never generate: <pad>, <start>, and <unk> unless allowed."""
        return (
            (self.pad_id, self.start_id) if allow_unk else (self.pad_id, self.start_id, self.unk_id)
        )

    def to_dict(self) -> dict:
        return {"itos": list(self.itos), "max_len": self.max_len}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        itos = list(d["itos"])
        if tuple(itos[: len(SPECIALS)]) != SPECIALS:
            raise ValueError("vocabulary does not start with the special tokens")
        return cls(itos[len(SPECIALS) :], max_len=int(d["max_len"]))

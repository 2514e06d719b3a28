"""A small text corpus generated on the fly (nothing is downloaded) and byte-level batches.

The corpus is a few thousand short sentences from a fixed grammar: regular enough that a small model
learns it quickly, varied enough that the loss keeps falling for a few hundred steps.
"""

from __future__ import annotations

import random

import torch

_SUBJECTS = ["the cat", "a dog", "the old sailor", "my sister", "the tiny robot", "every farmer", "the river",
             "a quiet child", "the north wind", "our teacher"]
_VERBS = ["sees", "follows", "paints", "remembers", "carries", "finds", "builds", "sings to", "waits for", "forgets"]
_OBJECTS = ["a red boat", "the bright moon", "seven apples", "the wooden bridge", "an empty house", "the last train",
            "a green lantern", "the morning market", "two silver keys", "the mountain road"]
_ENDINGS = ["at dawn", "in the rain", "before supper", "without a word", "every spring", "near the harbour",
            "after the storm", "with great care"]

VOCAB_SIZE = 256  # bytes


def generated_corpus(n_sentences: int = 4000, seed: int = 0) -> str:
    rng = random.Random(seed)
    sentences = []
    for _ in range(n_sentences):
        s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
        if rng.random() < 0.6:
            s += f" {rng.choice(_ENDINGS)}"
        sentences.append(s[0].upper() + s[1:] + ".")
    return " ".join(sentences)


class ByteBatches:
    """Deterministic batches: batch `step` of rank `rank` depends on nothing else, so a resumed run
    sees exactly the batches an uninterrupted one would."""

    def __init__(self, text: str, batch_size: int, seq_len: int, seed: int = 0) -> None:
        self.tokens = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        if self.tokens.numel() <= seq_len + 1:
            raise ValueError(f"corpus of {self.tokens.numel()} bytes is too short for seq_len={seq_len}")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed

    def batch(self, step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * world_size + rank)
        starts = torch.randint(0, self.tokens.numel() - self.seq_len - 1, (self.batch_size,), generator=g)
        chunk = torch.stack([self.tokens[s : s + self.seq_len + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

"""Byte-level tokenizer: every UTF-8 byte is one token, nothing to train or store.

Ids 0..3 are the specials shared with the SentencePiece tokenizer (pad, bos, eos, unk); byte b is
id ``b + 4``, so the vocabulary has 260 ids. Any text round-trips exactly; ``decode`` drops
specials and replaces bytes that do not form valid UTF-8 (e.g. a character cut in half by a
generation limit) with U+FFFD instead of raising.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mtp.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

BYTE_OFFSET = 4
BYTE_VOCAB_SIZE = 256 + BYTE_OFFSET  # 260


class ByteTokenizer:
    """UTF-8 bytes as tokens; ids: pad=0, bos=1, eos=2, unk=3, byte b = b + 4."""

    path = None  # nothing on disk: a workdir marks it with an empty `tokenizer.bytes`
    vocab_size: int = BYTE_VOCAB_SIZE
    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (one per UTF-8 byte), without bos/eos."""
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of `ids`; specials (and ids outside the vocabulary) decode to nothing."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        ids = ids[(ids >= BYTE_OFFSET) & (ids < BYTE_VOCAB_SIZE)]
        return (ids - BYTE_OFFSET).astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size})"

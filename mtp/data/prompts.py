"""Prompts for decoding measurements: held-out snippets of a data config, or a JSONL file.

``heldout_prompts`` is what ``mtp bench decode``/``peers`` and the sweep's tokens/forward decode
from when no ``--prompts`` file is given, and (from the training split) what draft-tree calibration
decodes from; ``read_prompts`` reads a ``{"prompt": "..."}``-per-line file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from mtp.data.corpus import list_files, read_text, split_of
from mtp.data.errors import DataError
from mtp.data.synthetic import is_synthetic, task_examples

DEFINITION_STARTS = ("def ", "class ")  # a code snippet starts at one of these lines
MIN_CHARS, MAX_CHARS = 40, 600  # snippets outside this length are skipped
JSONL_FORMAT = '{"prompt": "..."} per line'


def heldout_prompts(data_cfg, n: int = 8, *, lines: int = 6, seed: int = 0, split: str = "validation") -> list[str]:
    """Up to ``n`` prompts from the ``split`` of a data config (the validation files: text the
    model never trained on), the same ones for the same arguments.

    Text files: each prompt is ``lines`` lines of a different file (files shuffled by ``seed``),
    starting at a random ``def`` or ``class`` line; snippets outside MIN_CHARS..MAX_CHARS are
    skipped. Where no file of the split has such a line (prose), snippets start at the files'
    first lines. ``split='train'``: the same from training files (draft-tree calibration, which
    must not see the benchmark's prompts). Synthetic tasks (``data.source='induction'``, ...): the
    prompts of the split's first ``n`` examples.
    """
    if is_synthetic(str(data_cfg.source)):
        return [e.prompt for e in task_examples(data_cfg, split)[:n]]
    files = list_files(data_cfg)
    paths = [p for p in files.relative_paths if split_of(p, files.val_fraction) == split]
    prompts = _snippets(files.root, paths, n, lines, seed, DEFINITION_STARTS)
    if not prompts:  # no code in this split
        prompts = _snippets(files.root, paths, n, lines, seed, None)
    if not prompts:
        raise DataError(f"No {split} prompts found in data.source={data_cfg.source!r} (no file of that split"
                         f" holds {MIN_CHARS}..{MAX_CHARS} characters in {lines} lines); pass --prompts FILE.jsonl.")
    return prompts


def _snippets(root: Path, paths: list[str], n: int, lines: int, seed: int, starts: tuple[str, ...] | None) -> list[str]:
    """``lines`` lines of each file in ``seed``'s shuffled order, from a random line that begins
    with one of ``starts`` (None: the first line), until ``n`` are found."""
    paths = list(paths)
    rng = random.Random(seed)
    rng.shuffle(paths)
    prompts: list[str] = []
    for rel in paths:
        text = read_text(root / rel)
        if not text:
            continue
        src = text.splitlines(keepends=True)
        candidates = [i for i, line in enumerate(src) if line.lstrip().startswith(starts)] if starts else [0]
        if not candidates:
            continue
        i = rng.choice(candidates)
        prompt = "".join(src[i:i + lines])
        if MIN_CHARS <= len(prompt) <= MAX_CHARS:
            prompts.append(prompt)
        if len(prompts) == n:
            break
    return prompts


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a JSONL file, one ``{"prompt": "..."}`` object per line (blank lines
    skipped). Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; a prompts file holds {JSONL_FORMAT}.")
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg}); expected {JSONL_FORMAT}.") from None
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{path}:{i}: no \"prompt\" field in {line.strip()[:80]}; expected {JSONL_FORMAT}.")
        if not isinstance(row["prompt"], str) or not row["prompt"]:
            raise DataError(f"{path}:{i}: \"prompt\" is {row['prompt']!r:.80}; it must be a non-empty string.")
        prompts.append(row["prompt"])
    if not prompts:
        raise DataError(f"{path} holds no prompts; write {JSONL_FORMAT}.")
    return prompts

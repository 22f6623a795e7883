"""The paper's synthetic tasks, generated locally and deterministically, with their evaluators.

Two tasks (Gloeckle et al. 2024, Section 4 / Appendix: induction and algorithmic reasoning):

* ``induction``: a random pattern of ``data.induction_pattern_len`` characters drawn from the first
  ``data.induction_vocab`` characters of ``ALPHABET``, a ``|``, then the same pattern again:
  ``"qcxhaq|qcxhaq"``. The second occurrence is predictable only by copying the first. With the
  byte tokenizer every character is one token.
* ``polynomial``: arithmetic in F7[X]/(X^5) (coefficients mod 7, powers X^5 and above vanish).
  An expression of 1..5 operations (``+``, ``-``, ``*`` with the usual precedence) over random
  parenthesised polynomials, ``=``, then the value in canonical form:
  ``"(3x^2+1)*(x+4)-(2x)=3x^3+5x^2+6x+4"``. The train split uses the operation counts
  ``data.poly_train_ops``, the validation split ``data.poly_test_ops`` (out of distribution).

An example is a ``prompt`` (everything up to and including ``|`` or ``=``) and an ``answer``; its
training document is ``prompt + answer`` (the pipeline appends eos). Examples depend only on the
task settings and ``data.synthetic_seed`` (not on ``cfg.seed``), so every run and machine sees the
same data; train and validation draw from different streams of that seed.

Evaluation: ``evaluate_task(task, generate_fn, examples)`` calls ``generate_fn(prompts)`` once with
all prompts and scores each completion with ``score_induction`` (fraction of the pattern's
characters right, position by position) or ``score_polynomial`` (1.0 iff the first line of the
completion, stripped, is exactly the canonical answer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from mtp.config import INDUCTION_ALPHABET, POLY_MAX_OPS, SYNTHETIC_SOURCES, check_data_config

INDUCTION, POLYNOMIAL = SYNTHETIC_SOURCES
STORIES = "stories"  # data.source='induction' with data.induction_format='stories' (names repeated in stories)
ALPHABET = INDUCTION_ALPHABET  # induction symbols
SEPARATOR = "|"
MODULUS, DEGREE = 7, 5  # F7[X]/(X^5)
MAX_OPS = POLY_MAX_OPS
OPERATORS = ("+", "-", "*")
_FORMAT_VERSION = 1  # bump when the text of any example changes, so caches are not reused
_SPLIT_STREAMS = {"train": 0, "validation": 1}
_TASK_STREAMS = {INDUCTION: 0, POLYNOMIAL: 1}
SYNTHETIC_KEYS = {
    INDUCTION: ("synthetic_examples", "synthetic_val_examples", "synthetic_seed",
                "induction_pattern_len", "induction_vocab"),
    STORIES: ("synthetic_examples", "synthetic_val_examples", "synthetic_seed", "induction_format",
              "induction_name_len"),
    POLYNOMIAL: ("synthetic_examples", "synthetic_val_examples", "synthetic_seed",
                 "poly_train_ops", "poly_test_ops"),
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One task instance: the model sees `prompt` and should continue with `answer`."""

    task: str
    prompt: str
    answer: str
    n_ops: int = 0  # polynomial: number of operations; induction: 0
    # induction stories: character offsets (into `text`) of the scored tokens -- the second token of
    # every later occurrence of a name -- and of the same token of each name's first occurrence
    # (a control that copying cannot help); empty for the other tasks
    targets: tuple[int, ...] = ()
    controls: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        """The training document (the pipeline ends it with eos)."""
        return self.prompt + self.answer


def is_synthetic(source: str) -> bool:
    return str(source) in SYNTHETIC_SOURCES


# --- induction ----------------------------------------------------------------------------------
def induction_examples(n: int, *, pattern_len: int, vocab: int, seed: int | Sequence[int]) -> list[Example]:
    """`n` examples `pattern|pattern`, patterns i.i.d. uniform over ALPHABET[:vocab]."""
    rng = np.random.default_rng(seed)
    symbols = np.asarray(list(ALPHABET[:vocab]))
    patterns = rng.integers(0, vocab, size=(n, pattern_len))
    out = []
    for row in patterns:
        pattern = "".join(symbols[row])
        out.append(Example(INDUCTION, pattern + SEPARATOR, pattern))
    return out


def score_induction(example: Example, predicted_text: str) -> float:
    """Fraction of the second occurrence's characters predicted right, position by position.

    Only the first len(answer) characters of `predicted_text` count; missing ones are wrong.
    """
    answer = example.answer
    if not answer:
        return 1.0
    return sum(a == b for a, b in zip(answer, predicted_text)) / len(answer)


# --- induction in stories (Gloeckle et al. 2024, section 4.1) -----------------------------------
# Children's-story-like text from templates in which every character's name occurs at least twice.
# With the byte tokenizer a name of `name_len` tokens is `name_len` characters: an upper-case
# initial that starts no other word of the templates, then lower-case letters drawn uniformly. The
# score is the paper's: accuracy on the SECOND token of a name at its later occurrences. That token
# is uniform over 26 letters given everything but the earlier occurrence, so without copying a model
# is right 1/26 of the time; the same token of a name's first occurrence is the control.
NAME_INITIALS = "BDFGHJKMPRSVWZ"  # no template word starts with one of these capitals
NAME_LETTERS = "abcdefghijklmnopqrstuvwxyz"
STORY_ANIMALS = ("cat", "dog", "bird", "frog", "bunny", "fox", "bear", "duck", "mouse", "lion", "pig", "owl")
STORY_ADJECTIVES = ("little", "big", "happy", "kind", "brave", "shy", "funny", "small", "quiet", "silly")
STORY_PLACES = ("park", "garden", "forest", "pond", "house", "hill", "beach", "farm", "school", "river")
STORY_THINGS = ("ball", "kite", "box", "hat", "book", "cake", "toy", "stick", "flower", "shell", "apple")
STORY_FEELINGS = ("happy", "sad", "tired", "excited", "scared", "proud", "hungry", "sleepy", "glad")
# {a} and {b} are two different characters; the other fields are drawn per sentence.
STORY_INTRO = ("Once upon a time, there was a {adj} {animal} named {a}.",
               "One day, a {adj} {animal} named {a} lived near the {place}.",
               "There was a {adj} {animal}. Its name was {a}.")
STORY_MEET = ("{a} had a friend named {b}.", "{a} met a {adj} {animal} named {b}.",
              "Near the {place}, {a} saw a {animal} named {b}.")
STORY_BODY = ("{a} liked to play in the {place}.", "One day, {a} found a {thing} near the {place}.",
              "{a} and {b} went to the {place} together.", "{a} gave the {thing} to {b}.",
              "{a} was very {feeling}.", "\"Look at my {thing}!\" said {a}.", "{b} smiled at {a}.",
              "Then {a} ran to the {place} to see {b}.", "{a} wanted a {thing}, so {b} helped.",
              "\"Can I play too?\" asked {a}.", "{a} and {b} ate a {thing} under a tree.")
STORY_END = ("In the end, {a} was {feeling}.", "{a} said goodbye and went home.",
             "After that day, {a} and {b} were best friends.", "{a} never forgot the {place}.")


def story_names(name_len: int) -> list[str]:
    """Every name of `name_len` characters (tokens with the byte tokenizer): an initial from
    NAME_INITIALS, then name_len-1 lower-case letters (so 14 * 26 names of 2 tokens)."""
    return ["".join(p) for p in itertools.product(NAME_INITIALS, *([NAME_LETTERS] * (name_len - 1)))]


def _story(rng: np.random.Generator, name_len: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    k = int(rng.integers(2, 4))  # characters in the story, with different initials
    initials = rng.choice(len(NAME_INITIALS), size=k, replace=False)
    names = ["".join([NAME_INITIALS[i], *rng.choice(list(NAME_LETTERS), size=name_len - 1)]) for i in initials]

    def fill(template: str, a: int, b: int) -> str:
        pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
        return template.format(a="\0A", b="\0B", adj=pick(STORY_ADJECTIVES), animal=pick(STORY_ANIMALS),
                               place=pick(STORY_PLACES), thing=pick(STORY_THINGS),
                               feeling=pick(STORY_FEELINGS)).replace("\0A", names[a]).replace("\0B", names[b])

    sentences = [fill(STORY_INTRO[int(rng.integers(len(STORY_INTRO)))], 0, 1)]
    for j in range(1, k):  # introduce the others, each met by someone already introduced
        sentences.append(fill(STORY_MEET[int(rng.integers(len(STORY_MEET)))], int(rng.integers(j)), j))
    for _ in range(int(rng.integers(2, 5))):
        a, b = rng.choice(k, size=2, replace=False)
        sentences.append(fill(STORY_BODY[int(rng.integers(len(STORY_BODY)))], int(a), int(b)))
    a, b = rng.choice(k, size=2, replace=False)
    sentences.append(fill(STORY_END[int(rng.integers(len(STORY_END)))], int(a), int(b)))
    text = " ".join(sentences)
    seen = {}
    for name in names:  # every name occurs twice at least: add a sentence for those seen once
        if text.count(name) < 2:
            text += f" {name} was {STORY_FEELINGS[int(rng.integers(len(STORY_FEELINGS)))]}."
    targets, controls = [], []
    for i in range(len(text) - name_len + 1):
        word = text[i:i + name_len]
        if word in names and not text[i - 1].isalpha() and not text[i + name_len:i + name_len + 1].isalpha():
            (targets if word in seen else controls).append(i + 1)  # the name's second token
            seen[word] = True
    return text, tuple(targets), tuple(controls)


def story_examples(n: int, *, name_len: int, seed: int | Sequence[int]) -> list[Example]:
    """`n` stories; each Example's `prompt` is the whole story (`answer` is empty), `targets` and
    `controls` the offsets of the scored tokens (see the section comment above)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text, targets, controls = _story(rng, name_len)
        out.append(Example(INDUCTION, text, "", 0, targets, controls))
    return out


# --- polynomials in F7[X]/(X^5) -----------------------------------------------------------------
Poly = tuple[int, ...]  # DEGREE coefficients, constant first, each in [0, MODULUS)
ZERO: Poly = (0,) * DEGREE


def poly_add(a: Poly, b: Poly) -> Poly:
    return tuple((x + y) % MODULUS for x, y in zip(a, b))


def poly_sub(a: Poly, b: Poly) -> Poly:
    return tuple((x - y) % MODULUS for x, y in zip(a, b))


def poly_mul(a: Poly, b: Poly) -> Poly:
    """Product with every term of degree >= DEGREE dropped (the quotient by X^5)."""
    out = [0] * DEGREE
    for i, x in enumerate(a):
        for j, y in enumerate(b[: DEGREE - i]):
            out[i + j] += x * y
    return tuple(c % MODULUS for c in out)


def format_poly(p: Poly) -> str:
    """Canonical text: nonzero terms by descending degree, '+'-joined, no coefficient 1 on x."""
    terms = []
    for k in range(DEGREE - 1, -1, -1):
        c = p[k] % MODULUS
        if not c:
            continue
        if k == 0:
            terms.append(str(c))
        else:
            terms.append(("" if c == 1 else str(c)) + ("x" if k == 1 else f"x^{k}"))
    return "+".join(terms) or "0"


class _Parser:
    """Recursive descent over `expr := term (('+'|'-') term)*`, `term := factor ('*' factor)*`,
    `factor := '-' factor | '(' expr ')' | [int] 'x' ['^' int] | int` (juxtaposition: 3x^2)."""

    def __init__(self, text: str):
        self.text, self.i = text.replace(" ", ""), 0

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def take(self, char: str) -> bool:
        if self.peek() == char:
            self.i += 1
            return True
        return False

    def error(self, what: str) -> ValueError:
        return ValueError(f"cannot parse {self.text!r} at {self.i}: expected {what}")

    def integer(self) -> int:
        start = self.i
        while self.peek().isdigit():
            self.i += 1
        if start == self.i:
            raise self.error("a number")
        return int(self.text[start: self.i])

    def expr(self) -> Poly:
        value = self.term()
        while True:
            if self.take("+"):
                value = poly_add(value, self.term())
            elif self.take("-"):
                value = poly_sub(value, self.term())
            else:
                return value

    def term(self) -> Poly:
        value = self.factor()
        while self.take("*"):
            value = poly_mul(value, self.factor())
        return value

    def factor(self) -> Poly:
        if self.take("-"):
            return poly_sub(ZERO, self.factor())
        if self.take("("):
            value = self.expr()
            if not self.take(")"):
                raise self.error("')'")
            return value
        coefficient = self.integer() if self.peek().isdigit() else None
        if self.take("x"):
            power = self.integer() if self.take("^") else 1
            out = [0] * DEGREE
            if power < DEGREE:
                out[power] = 1 if coefficient is None else coefficient % MODULUS
            return tuple(out)
        if coefficient is None:
            raise self.error("'(', '-', a number or 'x'")
        return (coefficient % MODULUS,) + (0,) * (DEGREE - 1)


def parse_poly_expression(text: str) -> Poly:
    """Value in F7[X]/(X^5) of an expression such as '(3x^2+1)*(x+4)-(2x)' (a trailing '=' is
    ignored); raises ValueError on anything it cannot parse."""
    text = text.strip()
    text = text[:-1] if text.endswith("=") else text
    parser = _Parser(text)
    value = parser.expr()
    if parser.i != len(parser.text):
        raise parser.error("end of expression")
    return value


def _random_operands(rng: np.random.Generator, n: int) -> np.ndarray:
    """[n, MAX_OPS + 1, DEGREE] coefficients: each operand has 1..3 terms of distinct degrees
    < 5 with nonzero coefficients (short, never zero). Drawn all at once: per-call rng overhead
    would dominate generation."""
    shape = (n, MAX_OPS + 1, DEGREE)
    n_terms = rng.integers(1, 4, size=shape[:2])
    rank = np.argsort(np.argsort(rng.random(shape), axis=-1), axis=-1)  # a random permutation
    coefficients = rng.integers(1, MODULUS, size=shape)
    return np.where(rank < n_terms[..., None], coefficients, 0)


def _evaluate_ops(operands: Sequence[Poly], ops: Sequence[str]) -> Poly:
    """Value with '*' before '+'/'-', left to right: fold each run of products, then sum."""
    terms, signs = [operands[0]], ["+"]
    for op, operand in zip(ops, operands[1:]):
        if op == "*":
            terms[-1] = poly_mul(terms[-1], operand)
        else:
            terms.append(operand)
            signs.append(op)
    value = ZERO
    for sign, term in zip(signs, terms):
        value = (poly_add if sign == "+" else poly_sub)(value, term)
    return value


def polynomial_examples(n: int, *, ops: Sequence[int], seed: int | Sequence[int]) -> list[Example]:
    """`n` expressions, each with a number of operations drawn uniformly from `ops`."""
    rng = np.random.default_rng(seed)
    ops = np.asarray([int(k) for k in ops])
    counts = ops[rng.integers(len(ops), size=n)]
    all_operands = _random_operands(rng, n).tolist()
    all_symbols = rng.integers(len(OPERATORS), size=(n, MAX_OPS)).tolist()
    out = []
    for n_ops, operands, symbols in zip(counts.tolist(), all_operands, all_symbols):
        operands = [tuple(p) for p in operands[: n_ops + 1]]
        symbols = [OPERATORS[k] for k in symbols[:n_ops]]
        prompt = f"({format_poly(operands[0])})"
        for symbol, operand in zip(symbols, operands[1:]):
            prompt += f"{symbol}({format_poly(operand)})"
        out.append(Example(POLYNOMIAL, prompt + "=", format_poly(_evaluate_ops(operands, symbols)), n_ops))
    return out


def score_polynomial(example: Example, predicted_answer_text: str) -> float:
    """1.0 iff the completion's first line, stripped, is exactly the canonical answer."""
    lines = predicted_answer_text.strip().splitlines()
    return float(bool(lines) and lines[0].strip() == example.answer)


# --- configs, splits, corpus ----------------------------------------------------------------------
def task_examples(data_cfg: ml_collections.ConfigDict, split: str) -> list[Example]:
    """The examples of `split` ('train' or 'validation') for a synthetic `data.source`."""
    check_data_config(data_cfg)
    source = str(data_cfg.source)
    if source not in SYNTHETIC_SOURCES:
        raise ValueError(f"data.source={source!r} is not a synthetic task. Fix: use one of"
                         f" {SYNTHETIC_SOURCES}.")
    if split not in _SPLIT_STREAMS:
        raise ValueError(f"split={split!r} is not one of {tuple(_SPLIT_STREAMS)}. Fix: pick one of those.")
    n = int(data_cfg.synthetic_examples if split == "train" else data_cfg.synthetic_val_examples)
    seed = [int(data_cfg.synthetic_seed), _TASK_STREAMS[source], _SPLIT_STREAMS[split]]
    if source == INDUCTION and str(data_cfg.induction_format) == STORIES:
        return story_examples(n, name_len=int(data_cfg.induction_name_len), seed=seed)
    if source == INDUCTION:
        return induction_examples(n, pattern_len=int(data_cfg.induction_pattern_len),
                                  vocab=int(data_cfg.induction_vocab), seed=seed)
    ops = data_cfg.poly_train_ops if split == "train" else data_cfg.poly_test_ops
    return polynomial_examples(n, ops=tuple(ops), seed=seed)


def corpus_name(data_cfg: ml_collections.ConfigDict) -> str:
    """`<task>-<fingerprint>`: the fingerprint covers every setting that changes an example."""
    source = str(data_cfg.source)
    kind = STORIES if source == INDUCTION and str(data_cfg.induction_format) == STORIES else source
    settings = [(k, tuple(v) if isinstance(v, (list, tuple)) else v)
                for k, v in ((k, data_cfg[k]) for k in SYNTHETIC_KEYS[kind])]
    digest = hashlib.sha1(repr((source, _FORMAT_VERSION, settings)).encode()).hexdigest()[:16]
    return f"{source}-{digest}"


def synthetic_corpus(data_cfg: ml_collections.ConfigDict) -> tuple[str, dict[str, list[dict[str, Any]]]]:
    """(corpus name, split -> documents `{'path': bytes, 'text': bytes}`), like the TFDS corpus."""
    check_data_config(data_cfg)
    sources = {}
    for split in _SPLIT_STREAMS:
        sources[split] = [{"path": f"{split}/{i:07d}".encode(), "text": example.text.encode("utf-8")}
                          for i, example in enumerate(task_examples(data_cfg, split))]
    return corpus_name(data_cfg), sources


# --- evaluation -----------------------------------------------------------------------------------
SCORERS: Mapping[str, Callable[[Example, str], float]] = {
    INDUCTION: score_induction, POLYNOMIAL: score_polynomial,
}


def evaluate_task(task: str, generate_fn: Callable[[list[str]], list[str]],
                  examples: Sequence[Example]) -> dict[str, float | int]:
    """Mean score of `generate_fn`'s completions of the examples' prompts.

    `generate_fn(prompts)` gets every prompt at once and returns one completion (the generated
    text after the prompt) per prompt. Returns {'accuracy': mean score in [0, 1], 'n': count}.
    """
    if task not in SCORERS:
        raise ValueError(f"task={task!r} has no evaluator. Fix: use one of {tuple(SCORERS)}.")
    wrong = {e.task for e in examples} - {task}
    if wrong:
        raise ValueError(f"evaluate_task({task!r}) got examples of task(s) {sorted(wrong)}.")
    if not examples:
        return {"accuracy": 0.0, "n": 0}
    completions = list(generate_fn([e.prompt for e in examples]))
    if len(completions) != len(examples):
        raise ValueError(f"generate_fn returned {len(completions)} completions for"
                         f" {len(examples)} prompts; it must return one per prompt.")
    scores = [SCORERS[task](e, c) for e, c in zip(examples, completions)]
    return {"accuracy": float(np.mean(scores)), "n": len(scores)}


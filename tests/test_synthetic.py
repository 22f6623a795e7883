"""Synthetic tasks (induction, F7[X]/(X^5) polynomials), their evaluators, the byte tokenizer and
their path through prepare_data -> make_dataset -> `mtp train`. Tiny sizes throughout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mtp.config import ConfigError, base_config, load_config, validate
from mtp.data import synthetic as syn
from mtp.data.byte_tokenizer import ByteTokenizer
from mtp.data.pipeline import make_dataset
from mtp.data.prepare import prepare_data


def data_config(source: str, tmp_path, **overrides):
    d = base_config().data
    d.source = source
    d.tokenizer = "bytes"
    d.vocab_size = 260
    d.cache_dir = str(tmp_path / "cache")
    d.synthetic_examples, d.synthetic_val_examples = 200, 40
    d.update(overrides)
    return d


# --- determinism ----------------------------------------------------------------------------------
@pytest.mark.parametrize("source", syn.SYNTHETIC_SOURCES)
def test_examples_are_deterministic_for_a_seed(source, tmp_path):
    cfg = data_config(source, tmp_path)
    first, again = syn.task_examples(cfg, "train"), syn.task_examples(cfg, "train")
    assert len(first) == 200 and first == again
    other_seed = syn.task_examples(data_config(source, tmp_path, synthetic_seed=1), "train")
    assert len(other_seed) == 200 and [e.text for e in other_seed] != [e.text for e in first]
    validation = syn.task_examples(cfg, "validation")
    assert len(validation) == 40
    assert not {e.text for e in validation} & {e.text for e in first}  # different streams
    # the corpus name changes with any setting that changes the examples, and only then
    assert syn.corpus_name(cfg) == syn.corpus_name(data_config(source, tmp_path))
    assert syn.corpus_name(cfg) != syn.corpus_name(data_config(source, tmp_path, synthetic_seed=1))
    assert syn.corpus_name(cfg) != syn.corpus_name(data_config(source, tmp_path, synthetic_examples=201))


def test_induction_examples_shape():
    examples = syn.induction_examples(50, pattern_len=7, vocab=3, seed=5)
    for e in examples:
        pattern, rest = e.prompt[:-1], e.prompt[-1]
        assert rest == syn.SEPARATOR and e.answer == pattern and len(pattern) == 7
        assert set(pattern) <= set("abc") and e.text == f"{pattern}|{pattern}"
    assert len({e.answer for e in examples}) > 40  # random, not one pattern repeated


def test_polynomial_splits_use_their_operation_counts(tmp_path):
    cfg = data_config("polynomial", tmp_path, poly_train_ops=(1, 2), poly_test_ops=(5,))
    train, validation = syn.task_examples(cfg, "train"), syn.task_examples(cfg, "validation")
    assert {e.n_ops for e in train} == {1, 2} and {e.n_ops for e in validation} == {5}
    for e in train + validation:  # the text shows exactly n_ops operators between operands
        assert sum(e.prompt.count(f"){op}(") for op in "+-*") == e.n_ops and e.prompt.endswith("=")


# --- polynomial arithmetic ------------------------------------------------------------------------
@pytest.mark.parametrize("expression, expected", [
    ("(x^4)*(x)", "0"),                       # X^5 = 0
    ("(6)+(1)", "0"),                         # 7 = 0
    ("(x^2)*(x^2)", "x^4"),
    ("(x^3+x)*(x^2+1)", "2x^3+x"),            # x^5 dropped: x^5 + 2x^3 + x
    ("(0)-(1)", "6"),
    ("(3x^2+1)*(x+4)-(2x)", "3x^3+5x^2+6x+4"),
    ("(2x)+(3)*(4)", "2x+5"),                 # * before +: 2x + 12
    ("(2x)-(3)*(4)-(1)", "2x+1"),             # 2x - 12 - 1 = 2x - 13
    ("(x+1)*(x+1)*(x+1)*(x+1)*(x+1)", "5x^4+3x^3+3x^2+5x+1"),  # binomial(5, k) mod 7, k < 5
    ("(6x^4+6x^3+6x^2+6x+6)+(x^4+x^3+x^2+x+1)=", "0"),
    ("(x^2+3)-(x^2+3)", "0"),
    ("(5x^4)*(3)", "x^4"),                     # 15 = 1
])
def test_polynomial_hand_cases(expression, expected):
    assert syn.format_poly(syn.parse_poly_expression(expression)) == expected


def test_polynomial_operations_and_format():
    assert syn.poly_mul((0, 0, 0, 0, 1), (0, 1, 0, 0, 0)) == syn.ZERO
    assert syn.poly_add((6, 0, 0, 0, 0), (1, 0, 0, 0, 0)) == syn.ZERO
    assert syn.poly_sub(syn.ZERO, (1, 2, 0, 0, 0)) == (6, 5, 0, 0, 0)
    assert syn.format_poly((1, 1, 0, 0, 2)) == "2x^4+x+1"
    assert syn.format_poly(syn.ZERO) == "0"
    with pytest.raises(ValueError, match="cannot parse"):
        syn.parse_poly_expression("(x+1")
    with pytest.raises(ValueError, match="cannot parse"):
        syn.parse_poly_expression("(x)(x)")


def test_generated_answers_agree_with_the_parser():
    # the generator folds the operand list itself; the parser reads the text: two independent paths
    examples = syn.polynomial_examples(300, ops=(1, 2, 3, 4, 5), seed=3)
    assert {e.n_ops for e in examples} == {1, 2, 3, 4, 5}
    for e in examples:
        assert syn.format_poly(syn.parse_poly_expression(e.prompt)) == e.answer, e.text
        # the canonical form is a fixed point of parse + format
        assert syn.format_poly(syn.parse_poly_expression(e.answer)) == e.answer


# --- evaluators -----------------------------------------------------------------------------------
def _wrong_induction(answer: str) -> str:
    return "".join("b" if ch == "a" else "a" for ch in answer)


def test_induction_scores():
    examples = syn.induction_examples(10, pattern_len=8, vocab=5, seed=0)
    e = examples[0]
    assert syn.score_induction(e, e.answer) == 1.0
    assert syn.score_induction(e, e.answer + "trailing text") == 1.0
    assert syn.score_induction(e, _wrong_induction(e.answer)) == 0.0
    assert syn.score_induction(e, "") == 0.0
    assert syn.score_induction(e, e.answer[:4] + _wrong_induction(e.answer[4:])) == 0.5
    answers = {x.prompt: x.answer for x in examples}
    perfect = syn.evaluate_task("induction", lambda ps: [answers[p] for p in ps], examples)
    assert perfect == {"accuracy": 1.0, "n": 10}
    wrong = syn.evaluate_task("induction", lambda ps: [_wrong_induction(answers[p]) for p in ps], examples)
    assert wrong == {"accuracy": 0.0, "n": 10}


def test_polynomial_scores():
    examples = syn.polynomial_examples(12, ops=(1, 2), seed=0)
    e = examples[0]
    assert syn.score_polynomial(e, e.answer) == 1.0
    assert syn.score_polynomial(e, f" {e.answer}\n(x)+(1)=x+1") == 1.0  # first line only
    assert syn.score_polynomial(e, e.answer + "+1") == 0.0
    assert syn.score_polynomial(e, "") == 0.0
    answers = {x.prompt: x.answer for x in examples}
    assert syn.evaluate_task("polynomial", lambda ps: [answers[p] for p in ps], examples) == {
        "accuracy": 1.0, "n": 12}
    wrong = syn.evaluate_task("polynomial", lambda ps: [answers[p] + "x" for p in ps], examples)
    assert wrong == {"accuracy": 0.0, "n": 12}
    with pytest.raises(ValueError, match="one per prompt"):
        syn.evaluate_task("polynomial", lambda ps: ps[:-1], examples)
    with pytest.raises(ValueError, match="task"):
        syn.evaluate_task("induction", lambda ps: ps, examples)


# --- byte tokenizer and config --------------------------------------------------------------------
def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.path) == (260, 0, 1, 2, None)
    texts = ["", "def f(x):\n\treturn x  # ünïcödé ✓\r\n", "日本語 🙂 \x00\x7f",
             "\U0010ffff\u200b mixed\ttabs\n\n", "x = 'café'" * 50]
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text.encode("utf-8")) and all(4 <= i < 260 for i in ids)
        assert tok.decode(ids) == text
        assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text  # specials dropped
    assert tok.encode("A") == [ord("A") + 4]
    assert tok.encode_batch(["ab", "ü"]) == [[101, 102], [0xC3 + 4, 0xBC + 4]]
    assert tok.decode(tok.encode("ü")[:1]) == "\ufffd"  # half a character: replaced, no error
    assert tok.decode(np.asarray(tok.encode("np"), np.int32)) == "np"


def test_bytes_tokenizer_needs_vocab_260():
    cfg = base_config()
    cfg.data.tokenizer = "bytes"
    with pytest.raises(ConfigError, match=r"model\.vocab_size=4096.*vocab_size=260"):
        validate(cfg, n_devices=1)
    cfg.model.vocab_size = cfg.data.vocab_size = 260
    validate(cfg, n_devices=1)
    cfg.data.tokenizer = "words"
    with pytest.raises(ConfigError, match="data.tokenizer"):
        validate(cfg, n_devices=1)


def test_synthetic_settings_are_validated():
    cfg = base_config()
    cfg.data.source, cfg.data.tokenizer = "polynomial", "bytes"
    cfg.model.vocab_size = cfg.data.vocab_size = 260
    cfg.data.poly_test_ops = (6,)
    with pytest.raises(ConfigError, match="poly_test_ops"):
        validate(cfg, n_devices=1)
    cfg.data.source, cfg.data.induction_vocab = "induction", 99
    with pytest.raises(ConfigError, match="induction_vocab"):
        validate(cfg, n_devices=1)


@pytest.mark.parametrize("name", ["induction", "polynomial", "bytes_n8"])
def test_shipped_configs_validate(name):
    cfg = load_config(f"configs/{name}.py")
    validate(cfg, n_devices=1)
    assert cfg.data.tokenizer == "bytes" and cfg.model.vocab_size == 260
    assert cfg.model.n_future == (8 if name == "bytes_n8" else 2)


# --- end to end through the data pipeline ---------------------------------------------------------
@pytest.mark.parametrize("source", syn.SYNTHETIC_SOURCES)
def test_prepare_data_and_a_batch(source, tmp_path):
    cfg = data_config(source, tmp_path)
    data = prepare_data(cfg)
    assert isinstance(data.tokenizer, ByteTokenizer)
    assert data.stats["train"]["files"] == 200 and data.stats["validation"]["files"] == 40
    examples = syn.task_examples(cfg, "train")
    assert data.sources["train"][3]["text"].decode() == examples[3].text
    assert data.tokenizer.decode(data.tokens["train"][3]) == examples[3].text
    assert data.tokens["train"][3][-1] == data.tokenizer.eos_id
    batch = next(iter(make_dataset(cfg, "train", data.tokenizer, seq_len=32, batch_size=4, seed=0,
                                   source=data.tokens["train"])))
    assert batch["tokens"].shape == batch["segment_ids"].shape == (4, 32)
    assert batch["tokens"].max() < 260 and (batch["segment_ids"] > 0).all()
    # without `source`, make_dataset reads the same cached split
    again = next(iter(make_dataset(cfg, "train", data.tokenizer, seq_len=32, batch_size=4, seed=0)))
    np.testing.assert_array_equal(again["tokens"], batch["tokens"])
    # a second prepare reuses the cache (same corpus name and arrays)
    assert prepare_data(cfg).corpus_name == data.corpus_name == syn.corpus_name(cfg)


def test_sentencepiece_also_works_on_induction(tmp_path):
    cfg = data_config("induction", tmp_path, tokenizer="sentencepiece", vocab_size=300)
    data = prepare_data(cfg)
    assert data.tokenizer.vocab_size == 300 and data.tokenizer.path is not None
    example = syn.task_examples(cfg, "validation")[0]
    assert data.tokenizer.decode(data.tokens["validation"][0]) == example.text
    # polynomials have too few characters for a SentencePiece vocab >= 300: say so up front
    with pytest.raises(ValueError, match="data.tokenizer='sentencepiece'.*'bytes'"):
        prepare_data(data_config("polynomial", tmp_path, tokenizer="sentencepiece", vocab_size=300))


def test_short_training_run_on_induction(tmp_path, monkeypatch, capsys):
    from mtp.train.loop import train

    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config("configs/induction.py")
    cfg.workdir = str(tmp_path / "w")
    cfg.data.synthetic_examples, cfg.data.synthetic_val_examples = 300, 40
    cfg.model.update(d_model=32, n_layers=1, max_seq_len=64)
    cfg.train.update(steps=2, batch_size=8, seq_len=32, log_every=1, checkpoint_every=2,
                     eval_batches=1, tensorboard=False)
    cfg.loss.chunk_size = 16
    result = train(cfg).evaluation
    w = tmp_path / "w"
    assert (w / "tokenizer.bytes").exists() and not (w / "tokenizer.model").exists()
    assert json.loads((w / "config.json").read_text())["data"]["tokenizer"] == "bytes"
    assert len(result["loss"]) == 2 and all(np.isfinite(result["loss"]))

    from mtp.workdir import load_model, load_tokenizer

    assert isinstance(load_tokenizer(w), ByteTokenizer)

    from mtp.evals.task_eval import evaluate_task_accuracy  # mtp eval --task

    loaded = load_model(w)
    scored = evaluate_task_accuracy(loaded, n_examples=4, batch_size=4)
    assert scored["task"] == "induction" and scored["n"] == 4 and 0.0 <= scored["accuracy"] <= 1.0
    loaded.cfg.data.source = "stdlib"
    with pytest.raises(ValueError, match="not a synthetic task"):
        evaluate_task_accuracy(loaded)

    import argparse

    from mtp.evals.cli import add_parsers  # mtp eval --task-scores: the sweeps' teacher-forced scores

    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    args = parser.parse_args(["eval", "--workdir", str(w), "--task-scores", "--step", "2", "--json"])
    capsys.readouterr()  # the training run's output
    assert args.func(args, []) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["step"] == 2 and 0.0 <= scores["copy"] <= 1.0


# --- induction in stories (the paper's induction task) ----------------------------------------------
@pytest.mark.parametrize("name_len", [2, 3])
def test_stories_names_are_name_len_tokens_and_repeat(name_len, tmp_path):
    import re

    cfg = data_config("induction", tmp_path, induction_format="stories", induction_name_len=name_len)
    examples = syn.task_examples(cfg, "train")
    assert examples == syn.task_examples(cfg, "train") and len(examples) == 200
    assert syn.corpus_name(cfg) != syn.corpus_name(data_config("induction", tmp_path))
    tok = ByteTokenizer()
    templates = " ".join(syn.STORY_INTRO + syn.STORY_MEET + syn.STORY_BODY + syn.STORY_END)
    assert not {w[0] for w in re.findall(r"\b[A-Z]\w*", templates)} & set(syn.NAME_INITIALS)
    for e in examples:
        names = [e.text[o - 1:o - 1 + name_len] for o in e.controls]  # one first occurrence per name
        assert len(set(names)) == len(names) >= 2 and e.answer == ""
        for name in names:
            assert len(tok.encode(name)) == name_len and name[0] in syn.NAME_INITIALS
            assert len(re.findall(rf"\b{name}\b", e.text)) >= 2
        # the targets are the second token of every later occurrence, after its first occurrence
        later = [e.text[o - 1:o - 1 + name_len] for o in e.targets]
        assert set(later) == set(names) and len(later) + len(names) == sum(
            len(re.findall(rf"\b{n}\b", e.text)) for n in names)
        first = {n: o for n, o in zip(names, e.controls)}
        assert all(o > first[n] for n, o in zip(later, e.targets))


def test_teacher_forced_scores_on_a_hand_made_story():
    from mtp.evals.task_eval import teacher_forced_correct

    text = "Once upon a time, there was a cat named Kb. Kb met a dog named Fa. Fa saw Kb."
    e = syn.Example(syn.INDUCTION, text, "", 0, targets=(text.index("Kb.") + 1, text.index("Fa saw") + 1,
                                                          text.rindex("Kb") + 1),
                    controls=(text.index("Kb") + 1, text.index("Fa") + 1))
    loaded = type("L", (), {"tokenizer": ByteTokenizer(), "spec": type("S", (), {"max_seq_len": 128})()})()

    def oracle(tokens, segments):  # predicts every next token right
        return np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)

    def says_b(tokens, segments):  # always predicts "b": right only where a name's second token is b
        return np.full_like(tokens, ord("b") + 4)

    assert teacher_forced_correct(loaded, [text], [e.targets], argmax_fn=oracle)[0].tolist() == [True] * 3
    assert teacher_forced_correct(loaded, [text], [e.targets], argmax_fn=says_b)[0].tolist() == [True, False, True]
    assert teacher_forced_correct(loaded, [text], [e.controls], argmax_fn=says_b)[0].tolist() == [True, False]
    # offset len(text) is the closing eos (polynomial exact match needs it)
    assert teacher_forced_correct(loaded, [text], [[len(text)]], argmax_fn=oracle)[0].tolist() == [True]


def test_names_copied_counts_any_earlier_name_but_not_later_ones():
    """``induction_any_name``: a prediction counts when it is the second token of a name introduced
    before the scored occurrence (the right name or another one), not of a name introduced later."""
    from mtp.evals.task_eval import names_copied, teacher_forced_argmax

    text = "Once upon a time, there was a cat named Kb. Kb met a dog named Fa. Fa saw Kb."
    story = syn.Example(syn.INDUCTION, text, "", 0,
                        targets=(text.index("Kb met") + 1, text.index("Fa saw") + 1, text.rindex("Kb") + 1),
                        controls=(text.index("Kb") + 1, text.index("Fa") + 1))
    loaded = type("L", (), {"tokenizer": ByteTokenizer(), "spec": type("S", (), {"max_seq_len": 128})()})()

    def says(letter):
        return lambda tokens, segments: np.full_like(tokens, ord(letter) + 4)

    def copied(argmax_fn):
        later = teacher_forced_argmax(loaded, [text], [story.targets], argmax_fn=argmax_fn)
        first = teacher_forced_argmax(loaded, [text], [story.controls], argmax_fn=argmax_fn)
        return names_copied([story], later, first)

    assert copied(says("a")) == [False, True, True]  # Fa's "a" is not yet introduced at "Kb met"
    assert copied(says("b")) == [True, True, True]
    assert copied(says("z")) == [False, False, False]

"""mtp.data.prompts: held-out prompt snippets of a data config, and JSONL prompt files."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections
import pytest

from mtp.config import load_config
from mtp.data import synthetic
from mtp.data.corpus import split_of
from mtp.data.prompts import MAX_CHARS, MIN_CHARS, heldout_prompts, read_prompts

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def files_config(root: Path, glob: str) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"source": str(root), "glob": glob, "max_files": 0, "val_fraction": 0.5})


def write_files(root: Path, n: int, text) -> None:
    root.mkdir()
    for i in range(n):
        (root / f"f{i}.txt").write_text(text(i))


def test_code_prompts_are_definitions_of_distinct_files_of_the_split(tmp_path):
    write_files(tmp_path / "code", 30, lambda i: f"import os\n\n\ndef f{i}(x):\n    y = x + {i}\n    return y\n\n"
                                                 f"class C{i}:\n    pass\n")
    cfg = files_config(tmp_path / "code", "*.txt")
    val = heldout_prompts(cfg, n=4)
    assert len(val) == 4 and val == heldout_prompts(cfg, n=4)  # deterministic
    assert all(p.startswith(("def ", "class ")) and MIN_CHARS <= len(p) <= MAX_CHARS for p in val)
    names = [p.split()[1].split("(")[0].rstrip(":") for p in val]
    assert len({n[1:] for n in names}) == 4  # four different files
    assert all(split_of(f"f{n[1:]}.txt", 0.5) == "validation" for n in names)
    train = heldout_prompts(cfg, n=4, seed=1, split="train")
    assert all(split_of(f"f{p.split()[1].split('(')[0].rstrip(':')[1:]}.txt", 0.5) == "train" for p in train)
    assert heldout_prompts(cfg, n=4, seed=2) != val


def test_prose_prompts_start_at_the_top_of_files(tmp_path):
    write_files(tmp_path / "prose", 10, lambda i: f"# Title {i}\n\nSome text about item number {i}.\nMore.\n")
    prompts = heldout_prompts(files_config(tmp_path / "prose", "*.txt"), n=3)
    assert prompts and all(p.startswith("# Title") for p in prompts)


def test_no_usable_file_is_an_error_that_says_what_to_do(tmp_path):
    write_files(tmp_path / "short", 6, lambda i: "x\n")
    with pytest.raises(ValueError, match="--prompts FILE.jsonl"):
        heldout_prompts(files_config(tmp_path / "short", "*.txt"))


def test_synthetic_task_prompts_are_its_validation_prompts():
    cfg = load_config(str(CONFIGS / "induction.py"))
    cfg.data.synthetic_val_examples = 5
    prompts = heldout_prompts(cfg.data, n=3)
    assert prompts == [e.prompt for e in synthetic.task_examples(cfg.data, "validation")[:3]]
    assert all(p.endswith("|") for p in prompts)


def test_read_prompts_and_its_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "def f(x):"}) + "\n\n" + json.dumps({"prompt": "a = [1,", "id": 3}) + "\n")
    assert read_prompts(good) == ["def f(x):", "a = [1,"]
    cases = {
        '{"prompt": "ok"}\n{"text": "no prompt key"}\n': r"bad.jsonl:2: no \"prompt\" field",
        '{"prompt": "ok"}\nnot json\n': r"bad.jsonl:2: not JSON",
        '{"prompt": ""}\n': r"bad.jsonl:1: \"prompt\" is ''",
        '{"prompt": 3}\n': r"bad.jsonl:1: \"prompt\" is 3",
        "\n\n": "holds no prompts",
    }
    bad = tmp_path / "bad.jsonl"
    for text, message in cases.items():
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_prompts(bad)
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        read_prompts(tmp_path / "missing.jsonl")

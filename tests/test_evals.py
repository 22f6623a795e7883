"""Evaluations: unbiased pass@k, the sandbox (timeouts, memory, file writes, processes, network),
the HumanEval harness on real problems, and the per-head eval (loss, top-k, exact acceptance)."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_tokens, tiny_config, tiny_model

from mtp.config import DecodeSettings
from mtp.evals.cli import add_parsers
from mtp.evals.heads_eval import batch_sums_jit, evaluate_batches, greedy_continuations_jit, validation_batches
from mtp.evals.humaneval import (
    ChatTemplateError,
    ProblemsError,
    build_chat_program,
    canonical_generate_fn,
    chat_completion,
    chat_formatter,
    chat_request,
    defines_function,
    evaluate_completions,
    extract_code,
    load_problems,
    run_humaneval,
    truncate_completion,
)
from mtp.evals.passk import estimate_pass_at_k, mean_pass_at_k, pass_at_k
from mtp.evals.sandbox import run_program, unshare_available
from mtp.losses import head_targets, loss_vmap

# ----------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (5, 2, 4), (10, 3, 5),
                                   (20, 0, 10), (20, 20, 10), (200, 7, 1), (200, 7, 10), (200, 7, 100)])
def test_pass_at_k_matches_closed_form(n, c, k):
    expected = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_pass_at_k_hand_counts_and_mean():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c / n
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    assert pass_at_k(4, 3, 2) == 1.0  # any 2 of 4 include a correct one
    per = estimate_pass_at_k([4, 4, 10], [1, 0, 10], 2)
    np.testing.assert_allclose(per, [0.5, 0.0, 1.0])
    assert mean_pass_at_k([4, 4, 10], [1, 0, 10], (1, 2, 5)) == pytest.approx(
        {"pass@1": (0.25 + 0 + 1) / 3, "pass@2": 0.5})  # k=5 > n=4 is left out
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(3, 4, 1)


# ----------------------------------------------------------------------------- sandbox


def test_sandbox_passes_and_fails():
    ok = run_program("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('ok')\n")
    assert ok.passed and ok.status == "passed", ok
    bad = run_program("def f(x):\n    return x\nassert f(1) == 2\n")
    assert not bad.passed and bad.status == "failed" and "AssertionError" in bad.stderr_tail
    syntax = run_program("def f(:\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.stderr_tail


def test_sandbox_kills_an_infinite_loop_within_the_limit():
    start = time.perf_counter()
    r = run_program("while True:\n    pass\n", timeout_s=1.0)
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - start < 5.0
    r = run_program("import time\ntime.sleep(60)\n", timeout_s=1.0)  # no CPU use: the wall limit
    assert r.status == "timeout" and r.elapsed_s < 5.0


@pytest.mark.parametrize("program", [
    "x = [0] * (4 * 10**9 // 8)\n",  # 4 GB at once
    "x = []\nwhile True:\n    x.append(bytearray(50 * 2**20))\n",  # growing until the limit
])
def test_sandbox_stops_a_memory_bomb(program):
    start = time.perf_counter()
    r = run_program(program, timeout_s=20.0, memory_mb=512)
    assert r.status == "memory" and not r.passed, r
    assert time.perf_counter() - start < 20.0


def test_sandbox_blocks_writes_outside_its_temp_dir(tmp_path):
    target = tmp_path / "outside.txt"
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
        f"import os; os.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
        f"import os; os.symlink({str(tmp_path)!r}, 'link'); open('link/outside.txt', 'w')",
        f"import os; os.remove({str(keep)!r})",
        f"import os; os.rename({str(keep)!r}, 'stolen.txt')",
        f"open({str(keep)!r}, 'a').write('more')",
        f"import os; fd = os.open({str(tmp_path)!r}, os.O_RDONLY); os.unlink('keep.txt', dir_fd=fd)",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
    ]
    for program in attempts:
        r = run_program(program)
        assert r.status == "failed" and "sandbox" in r.stderr_tail, (program, r)
    assert not target.exists()
    assert keep.read_text() == "precious"


def test_sandbox_allows_writes_inside_its_temp_dir():
    program = (
        "import os, tempfile\n"
        "open('a.txt', 'w').write('hello')\n"
        "os.makedirs('d/e')\n"
        "os.rename('a.txt', 'd/e/b.txt')\n"
        "assert open('d/e/b.txt').read() == 'hello'\n"
        "with tempfile.NamedTemporaryFile('w') as f:\n"
        "    f.write('tmp')\n"
        "os.remove('d/e/b.txt')\n"
    )
    r = run_program(program)
    assert r.passed, r


@pytest.mark.parametrize("network", ["auto", "hook"])
def test_sandbox_refuses_processes_and_network(network):
    for program in ["import subprocess; subprocess.run(['true'])", "import os; os.system('true')",
                    "import os; os.fork()",
                    "import socket; socket.create_connection(('127.0.0.1', 9), timeout=1)"]:
        r = run_program(program, network=network)
        assert r.status == "failed", (program, r)


@pytest.mark.skipif(not unshare_available(), reason="no unprivileged user namespaces here")
def test_sandbox_network_namespace_has_only_loopback():
    program = ("names = [line.split(':')[0].strip() for line in open('/proc/net/dev').readlines()[2:]]\n"
               "assert names == ['lo'], names\n")
    assert run_program(program, network="unshare").passed


# ----------------------------------------------------------------------------- HumanEval


@pytest.fixture(scope="module")
def he_problems():
    return load_problems(limit=10)


def test_canonical_solutions_of_real_problems_pass(he_problems):
    assert len(he_problems) == 10 and he_problems[0]["task_id"] == "HumanEval/0"
    summary = run_humaneval(canonical_generate_fn(he_problems), he_problems, 1, (1,), workers=2)
    assert summary["pass@1"] == 1.0 and summary["status_counts"] == {"passed": 10}, summary


def test_broken_solutions_fail_and_pass_at_k_counts(he_problems, tmp_path):
    problems = he_problems[:2]
    good = [p["canonical_solution"] for p in problems]
    # problem 0: 1 of 3 samples right; problem 1: 2 of 3 right
    completions = [[good[0], "    return None\n", "    while True:\n        pass\n"],
                   [good[1], good[1], "    return []\n"]]
    out = tmp_path / "results.jsonl"
    summary = evaluate_completions(problems, completions, (1, 2, 5), out_path=out, timeout_s=2.0)
    assert summary["pass@1"] == pytest.approx((1 / 3 + 2 / 3) / 2)
    assert summary["pass@2"] == pytest.approx(((1 - 1 / 3) + 1.0) / 2)
    assert "pass@5" not in summary  # k > n
    assert summary["status_counts"] == {"failed": 2, "passed": 3, "timeout": 1}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in records] == [1, 2]
    assert [s["status"] for s in records[0]["samples"]] == ["passed", "failed", "timeout"]


def test_generate_fn_is_called_once_with_prompts_and_n(he_problems):
    calls = []

    def fake(prompts, n):
        calls.append((len(prompts), n))
        return [["    return 42\n" + "\ndef extra():\n    pass\n"] * n for _ in prompts]

    summary = run_humaneval(fake, he_problems[:3], 2, (1, 2))
    assert calls == [(3, 2)] and summary["pass@1"] == 0.0 and summary["n_samples"] == 2
    with pytest.raises(ValueError, match="completion"):
        run_humaneval(lambda p, n: [["x"]], he_problems[:2], 1)


def test_truncation_stops_at_top_level_code():
    body = "    x = 1\n    if x:\n        return x\n"
    assert truncate_completion(body) == body
    for tail in ["def g():\n    pass\n", "class A:\n    pass\n", "if __name__ == '__main__':\n    f()\n",
                 "print(f(1))\n", "# tests\n", "```\n", "assert f(1) == 1\n"]:
        assert truncate_completion(body + "\n" + tail) == body, tail
    assert truncate_completion("def g():\n    pass\n") == ""


def test_extract_code_from_fenced_and_unfenced_answers():
    code = "def f(x):\n    return x + 1\n"
    assert extract_code(f"Sure! Here it is:\n\n```python\n{code}```\n\nThis adds one.") == code
    assert extract_code(f"```\n{code}```") == code  # a bare fence
    assert extract_code(f"```py\n{code}```\nand ```python\nother()\n```") == code  # the first python block
    # a python block wins over an earlier block in another language; tags are case-insensitive
    assert extract_code(f"Run:\n```bash\npython f.py\n```\nCode:\n```Python\n{code}```\n") == code
    assert extract_code("```text\noutput\n```\n") == "output\n"  # no python block: the first block
    assert extract_code(f"Here:\n```python\n{code}    # cut off by the token limit") == (
        code + "    # cut off by the token limit")  # a fence left open runs to the end
    assert extract_code("    return x + 1\n") == "    return x + 1\n"  # no fence: the raw answer
    assert extract_code("") == ""


def test_defines_function_and_completion_kind():
    problem = {"prompt": "def f(x):\n    \"\"\"doc\"\"\"\n", "entry_point": "f", "test": ""}
    assert defines_function("import math\n\ndef f(x):\n    return x\n", "f")
    assert defines_function("    def f (x):\n        return x\n", "f")  # indented as a whole
    assert defines_function("async def f(x):\n    return x\n", "f")
    assert not defines_function("def ff(x):\n    return x\n", "f")
    assert not defines_function("def g(x):\n    def f(y):\n        return y\n    return f(x)\n", "f")
    assert not defines_function("    return f(x)\n", "f")
    kind, text = chat_completion(problem, "    def f(x):\n        return 2 * x\n")
    assert kind == "function" and text == "\n    pass\n\ndef f(x):\n    return 2 * x\n"
    kind, text = chat_completion(problem, "    return 2 * x\n\nprint(f(2))\n")
    assert kind == "body" and text == "    return 2 * x\n"  # truncated as in raw mode
    request = chat_request({"prompt": "def f(x):\n    pass\n"})
    assert len(request) == 1 and request[0]["role"] == "user"
    assert "```python\ndef f(x):\n    pass\n```" in request[0]["content"]


def _full_function(problem):
    """The canonical solution written as a full function definition (no imports: the prompt's stay)."""
    prompt, name = problem["prompt"], problem["entry_point"]
    return prompt[prompt.index(f"def {name}("):] + problem["canonical_solution"]


def test_chat_program_of_a_full_function_answer_passes_the_real_tests(he_problems):
    from mtp.evals.sandbox import run_program

    problem = he_problems[0]  # HumanEval/0 has_close_elements: its prompt imports List
    full = _full_function(problem)
    assert not full.startswith("from typing")  # the answer relies on the prompt's import
    answer = f"Here is the completed function:\n\n```python\n{full}```\n\nIt compares every pair."
    program = build_chat_program(problem, extract_code(answer))
    assert program.startswith(problem["prompt"] + "\n    pass\n\n" + full)
    assert program.rstrip().endswith(f"check({problem['entry_point']})")
    assert run_program(program).passed

    # a wrong full function fails the same tests (and so does the stub alone)
    wrong = full.replace("if distance < threshold:", "if distance > threshold:")
    assert wrong != full
    assert not run_program(build_chat_program(problem, extract_code(f"```python\n{wrong}```"))).passed
    assert not run_program(build_chat_program(problem, "Sorry, I cannot do that.")).passed

    # a body-only answer is judged as a raw completion
    body = f"```python\n{problem['canonical_solution']}```"
    assert build_chat_program(problem, extract_code(body)) == (
        problem["prompt"] + problem["canonical_solution"] + "\n\n" + problem["test"] + "\n\n"
        + f"check({problem['entry_point']})\n")


def test_run_humaneval_chat_mode_end_to_end(he_problems, tmp_path):
    problems = he_problems[:3]
    seen = []

    def fake_chat(messages):
        return "<user>" + messages[0]["content"] + "<assistant>"

    def fake_generate(prompts, n):
        seen.extend(prompts)
        answers = [f"Sure.\n```python\n{_full_function(p)}```\nDone." for p in problems[:2]]
        return [[a] * n for a in answers] + [["I do not know."] * n]

    out = tmp_path / "chat.jsonl"
    summary = run_humaneval(fake_generate, problems, 1, (1,), chat=fake_chat, out_path=out)
    assert all(q.startswith("<user>") and p["prompt"].rstrip() in q for q, p in zip(seen, problems))
    assert summary["pass@1"] == pytest.approx(2 / 3)
    assert summary["kind_counts"] == {"body": 1, "function": 2}
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["correct"] for r in records] == [1, 1, 0]
    sample = records[0]["samples"][0]
    assert sample["kind"] == "function" and sample["answer"].startswith("Sure.")
    assert sample["code"] == _full_function(problems[0])


def test_chat_needs_a_chat_template(tmp_path, capsys):
    class NoTemplate:
        chat_template = None

        def apply_chat_template(self, messages, add_generation_prompt=True):
            raise AssertionError("not to be called")

    with pytest.raises(ChatTemplateError, match="no chat template.*mtp convert.*chat_template.*--chat"):
        chat_formatter(NoTemplate())

    class WithTemplate(NoTemplate):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return f"<{messages[0]['content']}|{add_generation_prompt}>"

    assert chat_formatter(WithTemplate())([{"role": "user", "content": "hi"}]) == "<hi|True>"

    # The CLI refuses before loading the model (these workdirs have no config or checkpoint at
    # all): a byte tokenizer, and a Hugging Face tokenizer whose tokenizer_config.json has no
    # chat_template (its apply_chat_template would fall back to ChatML: not the model's own).
    from tokenizers import Tokenizer, models

    from mtp.data.hf_tokenizer import HFTokenizer, write_tokenizer

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer.bytes").write_text("")
    (tmp_path / "h").mkdir()
    write_tokenizer(tmp_path / "h", Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")),
                    {"eos_token_id": 0, "unk_token_id": 1})
    assert HFTokenizer(tmp_path / "h" / "tokenizer.json").chat_template is None
    for workdir in (tmp_path / "b", tmp_path / "h"):
        args = _parser().parse_args(["humaneval", "--workdir", str(workdir), "--chat", "--limit", "1"])
        with pytest.raises(SystemExit, match="--chat: --workdir .* has no chat template.*mtp convert"):
            args.func(args, [])
    args = _parser().parse_args(["humaneval", "--canonical", "--chat", "--limit", "1"])
    with pytest.raises(SystemExit, match="--chat needs a model"):
        args.func(args, [])


def test_malformed_jsonl_names_line_and_field(tmp_path):
    path = tmp_path / "p.jsonl"
    ok = {"task_id": "t/0", "prompt": "def f():\n", "test": "def check(c):\n    pass\n",
          "entry_point": "f"}
    path.write_text(json.dumps(ok) + "\n" + json.dumps({"task_id": "t/1", "prompt": "x"}) + "\n")
    with pytest.raises(ProblemsError, match=r"p.jsonl:2: .*lacks field\(s\) test, entry_point"):
        load_problems(path)
    path.write_text(json.dumps(ok) + "\n{not json\n")
    with pytest.raises(ProblemsError, match=r"p.jsonl:2: not valid JSON"):
        load_problems(path)
    gz = tmp_path / "p.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.write(json.dumps({**ok, "canonical_solution": "    return 1\n"}) + "\n")
    problems = load_problems(gz)
    summary = run_humaneval(canonical_generate_fn(problems), problems, 1, (1,))
    assert summary["pass@1"] == 1.0


def _parser():
    parser = argparse.ArgumentParser(prog="mtp")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    return parser


def test_humaneval_cli_canonical_and_decoder_wiring(tmp_path, monkeypatch, capsys):
    args = _parser().parse_args(["humaneval", "--canonical", "--limit", "3", "--k", "1",
                                 "--out", str(tmp_path / "r.jsonl"), "--json"])
    assert args.func(args, []) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pass@1"] == 1.0 and summary["problems"] == 3
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 3

    # The model path: generate_fn over mtp.decode.api.generate_texts (a fake module here).
    from mtp.evals import cli

    seen = []

    def generate_texts(loaded, prompts, **kw):
        seen.append((loaded, len(prompts), kw))
        return [p + "    return None\n" for p in prompts]  # echoes the prompt: stripped

    monkeypatch.setattr(cli, "generate_texts", generate_texts)
    xla = DecodeSettings(backend="xla")  # the decode settings (--decode-* flags) reach the decoder
    fn = cli.make_generate_fn("LOADED", mode="sample", heads=2, max_new_tokens=7, temperature=0.5,
                              top_p=0.9, top_k=3, seed=10, batch_size=2, settings=xla)
    out = fn(["a", "b", "c"], 2)
    assert out == [["    return None\n"] * 2] * 3
    assert [s[1] for s in seen] == [2, 1, 2, 1]
    assert [s[2]["seed"] for s in seen] == [10, 10, 11, 11]
    assert seen[0][2] == dict(mode="sample", heads=2, max_new_tokens=7, temperature=0.5, top_p=0.9,
                              top_k=3, seed=10, settings=xla)
    args = _parser().parse_args(["humaneval", "--workdir", str(tmp_path), "--n-samples", "2"])
    with pytest.raises(SystemExit, match="deterministic"):
        args.func(args, [])


# ----------------------------------------------------------------------------- per-head eval


def _batch(B=3, T=12, seed=1):
    tokens = np.asarray(random_tokens(seed, (B, T)))
    seg = np.ones_like(tokens)
    seg[1, 7:] = 2  # a second document
    seg[2, 9:] = 0  # padding
    return tokens, seg


def _direct_metrics(model, batches) -> dict:
    """Per-head loss, top-1, top-5 and token counts computed here, position by position, from the
    logits: head k at t scores token t+k when both lie in the same (non-padding) document."""
    n = model.spec.n_future
    ce, top1, top5, count = np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, int)
    for batch in batches:
        tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
        logits = np.asarray(model(jnp.asarray(tokens), jnp.asarray(seg)), np.float32)  # [N, B, T, V]
        for i in range(n):
            k = i + 1
            for b, t in np.ndindex(tokens.shape[0], tokens.shape[1] - k):
                if seg[b, t] == 0 or seg[b, t + k] != seg[b, t]:
                    continue
                row, target = logits[i, b, t], tokens[b, t + k]
                ce[i] += np.log(np.exp(row.astype(np.float64) - row.max()).sum()) + row.max() - row[target]
                above = int((row > row[target]).sum())
                top1[i], top5[i], count[i] = top1[i] + (above == 0), top5[i] + (above < 5), count[i] + 1
    return {"loss": ce / count, "top1": top1 / count, "top5": top5 / count, "tokens": count.tolist()}


def test_greedy_continuations_equal_step_by_step_generation():
    model = tiny_model(0, n_future=4)
    tokens, seg = _batch()
    B, T = tokens.shape
    depth = 4
    g = np.asarray(greedy_continuations_jit(model, tokens, seg, depth))
    # Reference: plain forwards, one row per (b, t) holding that position's document prefix,
    # extended one greedy token per step (right padding in segment 0 does not reach real tokens).
    starts = [(b, t, int(np.argmax(seg[b] == seg[b, t]))) for b in range(B) for t in range(T)
              if seg[b, t] != 0]
    rows = [list(tokens[b, start:t + 1]) for b, t, start in starts]
    L = T + depth
    forward = nnx.jit(lambda m, x, s: m(x, s)[0])
    for j in range(depth):
        x = np.zeros((len(rows), L), np.int32)
        s = np.zeros((len(rows), L), np.int32)
        for r, row in enumerate(rows):
            x[r, :len(row)], s[r, :len(row)] = row, 1
        logits = np.asarray(forward(model, jnp.asarray(x), jnp.asarray(s)))
        for r, ((b, t, _), row) in enumerate(zip(starts, rows)):
            nxt = int(np.argmax(logits[r, len(row) - 1]))
            assert g[j, b, t] == nxt, (b, t, j)
            row.append(nxt)


def test_head_metrics_agree_with_the_training_loss_and_are_rates():
    model = tiny_model(1, n_future=4)
    tokens, seg = _batch(seed=2)
    sums = jax.device_get(batch_sums_jit(model, tokens, seg))
    _, aux = nnx.jit(loss_vmap)(model, jnp.asarray(tokens), jnp.asarray(seg), jnp.ones(4),
                               jnp.ones(4))
    np.testing.assert_allclose(sums["ce"], aux["sum_ce"], rtol=1e-5)
    np.testing.assert_allclose(sums["top1"], aux["sum_correct"])
    np.testing.assert_allclose(sums["count"], aux["count"])
    result = evaluate_batches(model, [{"tokens": tokens, "segment_ids": seg}] * 2)
    # a budget of one row's logits: the same sums, one row per call
    sliced = evaluate_batches(model, [{"tokens": tokens, "segment_ids": seg}] * 2,
                              budget_bytes=4 * 12 * 97 * 4)
    np.testing.assert_allclose(sliced["loss"], result["loss"], rtol=1e-5)
    assert sliced["top5"] == result["top5"] and sliced["chain"] == result["chain"]
    np.testing.assert_allclose(result["loss"], sums["ce"] / sums["count"], rtol=1e-6)
    direct = _direct_metrics(model, [{"tokens": tokens, "segment_ids": seg}])
    np.testing.assert_allclose(result["loss"], direct["loss"], rtol=1e-5)
    np.testing.assert_allclose(result["top1"], direct["top1"])
    np.testing.assert_allclose(result["top5"], direct["top5"])
    assert result["tokens"] == [2 * c for c in direct["tokens"]]  # the same batch twice
    for h in result["heads"]:
        assert 0 <= h["top1"] <= h["top5"] <= 1
        assert h["acceptance"] is None or 0 <= h["chain"] <= h["acceptance"] <= 1
    assert result["heads"][0]["acceptance"] is None and result["batches"] == 2
    assert result["tokens_per_forward"] == pytest.approx(1 + sum(result["chain"][1:]))


def test_acceptance_is_one_when_every_head_agrees_with_the_greedy_continuation():
    # Zero embeddings: every logit is 0 everywhere, every head's argmax and every greedy token is 0.
    model = tiny_model(2, n_future=4)
    model.embed[...] = jnp.zeros_like(model.embed[...])
    tokens, seg = _batch()
    result = evaluate_batches(model, [{"tokens": tokens, "segment_ids": seg}])
    assert result["acceptance"][1:] == [1.0, 1.0, 1.0] and result["chain"][1:] == [1.0, 1.0, 1.0]
    assert result["tokens_per_forward"] == pytest.approx(4.0)


def test_acceptance_detects_a_head_that_disagrees():
    # Head 1 copied into head 2 predicts the NEXT token again, not the one after: it agrees
    # with g_2 only where the greedy continuation repeats a token, so acceptance drops below 1.
    model = tiny_model(3, n_future=4)
    state = nnx.state(model.heads)
    nnx.update(model.heads, jax.tree.map(lambda x: x.at[1].set(x[0]), state))
    tokens, seg = _batch(seed=4)
    sums = jax.device_get(batch_sums_jit(model, tokens, seg))
    g = np.asarray(greedy_continuations_jit(model, tokens, seg, 4))
    _, mask = head_targets(jnp.asarray(tokens), jnp.asarray(seg), 4)
    expected = np.sum((g[0] == g[1]) * np.asarray(mask[1]))  # head 2's argmax is g_1
    assert sums["accepted"][1] == expected < sums["count"][1]


def test_eval_cli_on_a_tiny_workdir(tmp_path, capsys):
    from mtp.data import prepare_data
    from mtp.train.checkpoint import save_json
    from mtp.workdir import load_model, save_params

    corpus = tmp_path / "corpus"
    rng = np.random.default_rng(0)
    words = "alpha beta gamma delta value index count total result".split()
    for i in range(24):
        path = corpus / f"m{i}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"def {rng.choice(words)}_{i}_{j}(x):\n    return x * {int(rng.integers(99))}\n\n"
                       for j in range(int(rng.integers(20, 40))))
        path.write_text(body)
    cfg = tiny_config(vocab_size=320)
    cfg.data.update(dict(source=str(corpus), cache_dir=str(tmp_path / "cache"), vocab_size=320,
                         val_fraction=0.3, tokenizer_max_chars=100_000))
    cfg.train.eval_batches = 2
    data = prepare_data(cfg.data)
    workdir = tmp_path / "w"
    workdir.mkdir()
    save_json(workdir / "config.json", cfg.to_dict())
    shutil.copy(data.tokenizer.path, workdir / "tokenizer.model")
    model = tiny_model(0, vocab_size=320)
    save_params(workdir, nnx.state(model, nnx.Param), step=7)

    args = _parser().parse_args(["eval", "--workdir", str(workdir), "--json"])
    assert args.func(args, []) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 7 and result["batches"] == 2 and len(result["heads"]) == 3
    assert result["seq_len"] == 16 and result["batch_size"] == 8
    # the numbers are those of the first two held-out batches, computed here from the logits
    loaded = load_model(workdir)
    direct = _direct_metrics(loaded.model, validation_batches(loaded, batches=2, seq_len=16, batch_size=8))
    assert result["tokens"] == direct["tokens"] and min(direct["tokens"]) > 0
    np.testing.assert_allclose(result["loss"], direct["loss"], rtol=1e-5)
    np.testing.assert_allclose(result["top1"], direct["top1"])
    np.testing.assert_allclose(result["top5"], direct["top5"])
    assert json.loads((workdir / "eval_heads.json").read_text())["loss"] == result["loss"]
    args = _parser().parse_args(["eval", "--workdir", str(workdir), "--batches", "1"])
    assert args.func(args, []) == 0
    assert "t+3" in capsys.readouterr().out

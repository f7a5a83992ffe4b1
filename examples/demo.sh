#!/usr/bin/env bash
# The whole pipeline on synthetic faces: synth -> fit -> predict (about a minute on 2 CPU cores).
set -euo pipefail
DATA=${DATA:-data/faces-demo}
RUN=${RUN:-runs/demo}
facemt synth "$DATA" --persons 12
facemt fit --data "$DATA" --out "$RUN" --overwrite --epochs 60 --image-size 64 --augment light --lr 2e-3
# The synthetic pictures are whole-face portraits like the training images: no face detection.
facemt predict "$RUN" "$DATA/001_y_m_h_a.jpg" "$DATA/012_o_f_s_b.jpg" --no-detect

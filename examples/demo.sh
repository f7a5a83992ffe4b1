#!/usr/bin/env bash
# facemt in two steps (about a minute on 2 CPU cores, no download):
# 1. the built-in base model on a real photo: Grace Hopper's US Navy portrait
#    (public domain), which matplotlib ships as sample data, and where each
#    head looked;
# 2. fine-tuning on your own labelled faces, here a synthetic FACES-named set
#    (drawn faces, not photographs), starting from the base model.
set -euo pipefail
PHOTO=$(python3 -c "import matplotlib.cbook as c; print(c.get_sample_data('grace_hopper.jpg', asfileobj=False))")
facemt predict "$PHOTO"
facemt explain "$PHOTO" --out "${EXPLAIN:-explanations}" --overwrite   # where each head looks (one PNG)
DATA=${DATA:-data/faces-demo}
RUN=${RUN:-runs/demo}
facemt synth "$DATA" --persons 12
facemt fit --data "$DATA" --out "$RUN" --overwrite --epochs 8 --augment light
facemt predict --model "$RUN" "$DATA/001_y_m_h_a.jpg" "$DATA/012_o_f_s_b.jpg"

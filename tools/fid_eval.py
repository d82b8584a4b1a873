"""FID-30k / CLIP-score evaluation of a one-step generator with the SiD-LSG protocol.

    python tools/fid_eval.py --model RUN/export --prompts ../shared/data/coco2014_val_captions_30k.txt \
        --ref-stats coco2014_val_clean256.npz --inception-weights ~/weights/inception-2015-12-05.pt \
        --clip-model ViT-g-14 --clip-weights ~/weights/vit_g14_laion2b_s12b_b42k.bin --out RUN/eval/export

    torchrun --nproc_per_node 8 tools/fid_eval.py ...      # generation sharded over 8 ranks

--model takes an export (unet/ + sidscale.json) or a checkpoint RUN/checkpoints/step_X (its EMA
generator is exported to OUT/export first). Image i = prompt i with seed i, one step, fp16 on CUDA
(fp32 on CPU), saved as OUT/images/{i:06d}.png at the model's native resolution (512 for SD1.5);
a rerun keeps the complete images and generates the rest. FID: centre crop + PIL Lanczos 256, then
clean-fid "clean" (bicubic 299, TF-Inception), against --ref-stats or --ref-dir (make stats once
with tools/ref_stats.py). CLIP score: open_clip, "A photo depicts " + prompt, mean cosine.
--teacher-steps K --teacher-cfg C also evaluates the teacher's DDIM sampler (OUT/teacher_images).
Writes OUT/metrics.json, and eval/fid, eval/clip_score to RUN/tb at the checkpoint's step.
Weights are read from local files only: nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sidscale.eval.evaluate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

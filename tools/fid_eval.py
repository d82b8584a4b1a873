"""FID / CLIP-score evaluation of a one- or K-step generator (UNet/VP or SD3 family) with a
published protocol.

    python tools/fid_eval.py --model RUN/export --prompts ../shared/data/coco2014_val_captions_30k.txt \
        --ref-stats coco2014_val_clean256.npz --inception-weights ~/weights/inception-2015-12-05.pt \
        --clip-model ViT-g-14 --clip-weights ~/weights/vit_g14_laion2b_s12b_b42k.bin --out RUN/eval/export

    torchrun --nproc_per_node 8 tools/fid_eval.py ...      # generation sharded over 8 ranks
    python tools/fid_eval.py --plot RUN                    # FID and CLIP vs kimg of RUN/eval/*/metrics.json

--protocol NAME (sidscale/eval/protocols.py) picks the evaluation code whose numbers you compare with:
sid_lsg_coco30k (default; SiD-LSG via GigaGAN's evaluation.py: 30k COCO-2014 captions, FID at 256),
dmd2_coco10k_512 (DMD2's SDXL: 10k prompts, FID at 512), sid_dit_coco10k (SiD-DiT: 10k, its
open_clip ViT-g/14 score without prefix). The name and every setting go into metrics.json.

--model takes an export (unet/ or transformer/ + sidscale.json) or a checkpoint RUN/checkpoints/step_X
(its EMA generator is exported to OUT/export first). Image i = prompt i (stripped, empty lines
skipped) with seed i, the generator's K steps, the protocol's dtype on CUDA (fp32 on CPU), an fp16
VAE upcast when it asks for it (force_upcast), saved as OUT/images/{i:06d}.png at the model's native
resolution; a rerun keeps the complete images and generates the rest. FID: torchvision-rounded
centre crop + PIL Lanczos to the protocol's size, then clean-fid (bicubic 299, TF-Inception), against
--ref-stats or --ref-dir (make stats once with tools/ref_stats.py --protocol NAME). CLIP score:
open_clip on the image prepared as the protocol's code prepares it, mean cosine.
--teacher-steps K --teacher-cfg C also evaluates the teacher's own sampler (DDIM / flow Euler).
Writes OUT/metrics.json, and eval/PROTOCOL/nN/fid (and clip_score_MODEL) at the checkpoint's step (and
eval_vs_images_seen/... at the images seen = 1000 x kimg) to RUN/tb when --out is inside RUN, else OUT/tb.
Images are bit-reproducible at the same --batch, device and dtype only (metrics.json says so).
Weights are read from local files only: nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from sidscale.eval.evaluate import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())

"""Readable previews: the trainer's preview grid (PNG and TensorBoard) upscales the toy's 8 px images
to 128 px (nearest), captions each row with its prompt, and puts the teacher's multi-step sample of
the same prompt and seed beside the student's, computed once. Both halves are checked against an
independent computation: the student's tiles against the export sampled with FewStepPipeline, the
teacher's against DDIM written out with the teacher's UNet (sidscale.families.shared.samplers + UNetEps)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.inprocess import one_rank_trainer

PROMPTS = ["a red circle", "a blue square on the left"]
OVERRIDES = [
    "train.precision=fp32", "train.global_batch=2", "train.micro_batch=2", "teacher.dtype=fp32",
    "teacher.resolution=8", "data.shards=indexed:toy", "eval.num_samples=0", "eval.teacher_steps=3",
    "method.cfg_eval_real=2.0", "train.seed=5", "preview.seeds_per_prompt=2",
    f"preview.prompts=[{', '.join(PROMPTS)}]",
]


def tiles(png: np.ndarray, boxes: list[list[tuple[int, int, int, int]]]) -> list[np.ndarray]:
    return [png[y0:y1, x0:x1] for row in boxes for (x0, y0, x1, y1) in row]


def upscaled(images: torch.Tensor, f: int) -> list[np.ndarray]:
    from sidscale.sample import to_uint8

    u8 = to_uint8(images.float().cpu()).permute(0, 2, 3, 1).numpy()
    return [np.kron(im, np.ones((f, f, 1), dtype=np.uint8)) for im in u8]  # nearest: each pixel an f x f block


def test_preview_grid_is_captioned_upscaled_with_the_teachers_reference(tmp_path, tiny_toy_teacher, monkeypatch):
    from sidscale.families.shared.samplers import ddim_sample
    from sidscale.families.unet_vp.adapter import UNetEps
    from sidscale.metrics import RunLogger, preview_grid
    from sidscale.sample import FewStepPipeline, seeded_latent_noise

    run = tmp_path / "run"
    with one_rank_trainer(run, [f"teacher.path={tiny_toy_teacher}", *OVERRIDES]) as trainer:
        calls = []
        sampler = trainer.family.teacher_sampler
        monkeypatch.setattr(trainer.family, "teacher_sampler", lambda *a, **k: calls.append(1) or sampler(*a, **k))
        trainer.logger = RunLogger(run, 2, 0, 2, True)
        trainer.preview()
        trainer.step = 1  # a later preview reuses the teacher's samples (computed at the first only)
        trainer.preview()
        trainer.logger.close()
        export = trainer.export()
        teacher = trainer.teacher

    assert len(calls) == 2  # 4 images in micro-batches of 2, at the first preview only
    prompts = [q for q in PROMPTS for _ in range(2)]
    seeds = list(range(4))  # image j of prompt r has seed 2 r + j, for the student and the teacher
    student = FewStepPipeline.from_export(export)(prompts, seeds)
    net = UNetEps(teacher.net, teacher.schedule)
    reference = []
    for s in (0, 2):  # the trainer's micro-batches
        c = teacher.conditioner
        reference.append(ddim_sample(net, teacher.schedule, (2, 3, 8, 8), c.encode(prompts[s:s + 2]), c.empty(2), 2.0,
                                     3, x_T=seeded_latent_noise(seeds[s:s + 2], (3, 8, 8))))
    reference = torch.cat(reference)

    _, boxes = preview_grid(torch.zeros(4, 3, 8, 8), PROMPTS, 2, torch.zeros(4, 3, 8, 8))
    for step in (0, 1):
        with Image.open(run / "samples" / f"step_{step:08d}.png") as im:
            png = np.asarray(im.convert("RGB"))
        got_student, got_teacher = tiles(png, boxes["images"]), tiles(png, boxes["reference"])
        assert all(t.shape == (128, 128, 3) for t in got_student + got_teacher)  # 8 px x 16, nearest
        for got, want in zip(got_student, upscaled(student, 16), strict=True):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(got_teacher, upscaled(reference, 16), strict=True):
            np.testing.assert_array_equal(got, want)
    # each row has its prompt written above it: dark text on white, different for the two prompts
    first, second = boxes["images"][0][0], boxes["images"][1][0]
    band_1 = png[first[1] - 16:first[1] - 2]
    band_2 = png[second[1] - 16:second[1] - 2]
    assert (band_1 < 100).any() and (band_2 < 100).any() and not np.array_equal(band_1, band_2)
    assert not np.array_equal(got_student[0], got_teacher[0])  # student and teacher differ at step 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    events = acc.Images("preview/ema")
    assert [e.step for e in events] == [0, 1]
    with Image.open(io.BytesIO(events[-1].encoded_image_string)) as im:
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), png)


def test_preview_grid_layout_and_errors():
    from sidscale.metrics import preview_grid, upscale_factor

    assert (upscale_factor(8, 8), upscale_factor(16, 16), upscale_factor(100, 120), upscale_factor(512, 512)) == (
        16, 8, 2, 1)
    long = "a very long prompt " * 30
    img, boxes = preview_grid(torch.zeros(2, 3, 16, 16), [long], 2)
    assert "reference" not in boxes and img.size[0] == 2 * 128 + 4 + 2 * 4
    # the caption wraps instead of running off the image, at most 3 lines (tile row lower by 2 lines)
    y_long = boxes["images"][0][0][1]
    y_one = preview_grid(torch.zeros(2, 3, 16, 16), ["short"], 2)[1]["images"][0][0][1]
    y_two = preview_grid(torch.zeros(2, 3, 16, 16), [long[:60]], 2)[1]["images"][0][0][1]
    assert y_two > y_one and y_long - y_one == 2 * (y_two - y_one)
    with pytest.raises(ValueError, match="3 images for 2 prompts x 2"):
        preview_grid(torch.zeros(3, 3, 8, 8), ["a", "b"], 2)

"""Previews and memory (issue 22, finding 1): a step that is due for both a checkpoint and a preview saves
first (a preview that runs out of memory loses no step), preview images are decoded a few at a time,
and the memory plan's ``preview`` phase (decode and the teacher's reference included) is checked
against the allocator's measured peak of a real preview on the CPU."""

from __future__ import annotations

from tests.inprocess import one_rank_trainer

TOY = ["train.precision=fp32", "train.global_batch=2", "train.micro_batch=2", "teacher.dtype=fp32",
       "teacher.resolution=8", "data.shards=indexed:toy", "eval.num_samples=0", "eval.teacher_steps=2",
       "train.export_at_end=false", "train.log_every=1"]


def test_checkpoint_of_a_step_is_saved_before_its_preview(tmp_path, tiny_toy_teacher, monkeypatch):
    """preview_every = ckpt_every = 1 over 3 steps: at each preview the step's checkpoint is already complete
    (the last step's too, which the loop used to save only after it ended)."""
    from sidscale import checkpoint as ckpt_lib

    run = tmp_path / "run"
    seen = []
    with one_rank_trainer(run, [f"teacher.path={tiny_toy_teacher}", *TOY, "train.max_steps=3",
                                "train.ckpt_every=1", "train.preview_every=1"]) as trainer:
        preview = trainer.preview

        def recording_preview():
            seen.append((trainer.step, ckpt_lib.is_complete(ckpt_lib.step_dir(run, trainer.step))))
            preview()

        monkeypatch.setattr(trainer, "preview", recording_preview)
        assert trainer.run()
    assert seen == [(1, True), (2, True), (3, True)]
    assert ckpt_lib.latest_marked(run) == ckpt_lib.step_dir(run, 3)

"""What a person sees in the terminal (issue "What a person sees"): each check runs the code in a
pseudo-terminal 100 columns wide and reads back what the terminal shows (``tests/helpers/terminal.py``)."""

from __future__ import annotations

import re
import textwrap

import pytest

from tests.helpers.terminal import COLS, frames, python_in_pty, render

ETA = r"\[\d\d:\d\d<\d\d:\d\d"  # tqdm's [elapsed<remaining]


def bar_frames(raw: str, desc: str) -> list[str]:
    return [f for f in frames(raw) if f.startswith(desc + ":")]


def test_training_bar_shows_a_logged_steps_numbers_at_once_and_ends_above_what_follows():
    """Trainer.run's order: the bar advances (logger.step), then the step's numbers are logged. The
    step's numbers must be on the bar as it shows that step (they used to appear one step later), and
    after training the bar's last line stays above the export and evaluation lines (it used to be
    redrawn below each of them, the final numbers only in a second "100%" line at the very end)."""
    code = textwrap.dedent("""
        import tempfile
        from pathlib import Path
        from sidscale.metrics import RunLogger

        logger = RunLogger(Path(tempfile.mkdtemp()), 6, 0, 32, True, "sid-dit 2-step")
        for step in range(1, 7):
            logger.step(step, 32 * step)
            if step % 2 == 0:
                logger.scalars(step, {"loss/fake": 10.0 * step, "loss/gen": -1.0 * step,
                                      "perf/images_per_s": 3.0, "progress/kimg": 0.032 * step})
        logger.end_progress()
        logger.write("exported EMA generator to RUN/export")
        logger.scalars(6, {"eval/frechet_student_2_step": 0.5})
        logger.write("toy Frechet distance to exact samples: done")
        logger.close()
    """)
    rc, raw = python_in_pty(code)
    assert rc == 0, raw
    bar = bar_frames(raw, "sid-dit 2-step")
    for step in (2, 4, 6):
        shown = [f for f in bar if re.search(rf"\| {step}/6 \[", f)]
        assert shown and f"fake={10 * step}," in shown[-1], (step, shown)
    screen = render(raw, COLS)
    finals = [i for i, line in enumerate(screen) if "100%" in line]
    exported = screen.index("exported EMA generator to RUN/export")
    assert len(finals) == 1 and finals[0] < exported, screen
    assert "fake=60," in screen[finals[0]] and "6/6" in screen[finals[0]]
    assert screen[exported + 1:] == ["toy Frechet distance to exact samples: done"], screen


QUIET_CHECK = textwrap.dedent("""
    import logging, sys, tempfile, warnings
    from pathlib import Path
    import torch
    {install}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel
    from sidscale.families.unet_vp.tiny import build_tiny_text_encoder, build_tiny_unet

    tmp = Path(tempfile.mkdtemp())
    build_tiny_unet(0, sample_size=8).to(torch.float16)                  # diffusers: "... float32: []"
    build_tiny_unet(0, sample_size=8).save_pretrained(tmp / "unet")
    UNet2DConditionModel.from_pretrained(tmp / "unet")                    # diffusers: the accelerate notice
    build_tiny_text_encoder(1).save_pretrained(tmp / "te")               # transformers: "Writing model shards"
    CLIPTextModel.from_pretrained(tmp / "te")                             # transformers: "Loading weights"
    torch.distributed.init_process_group("gloo", init_method=f"file://{{tmp / 'pg'}}", rank=0, world_size=1)
    torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.ones(2))  # torch: FutureWarning
    torch.distributed.destroy_process_group()
    # what must still show: sidscale's own warnings, and other third-party messages
    from sidscale.data.stream import DataWarning
    warnings.warn("sidscale-own data warning", DataWarning)
    logging.getLogger("sidscale.train").warning("sidscale-own log warning")
    logging.getLogger("diffusers.models.modeling_utils").warning(
        "There are modules in Foo that should be kept in float32: ['norm']. Casting directly ...")
    logging.getLogger("diffusers.models.modeling_utils").warning("another diffusers warning")
    warnings.warn("another torch FutureWarning", FutureWarning)
    print("filters:", sum(type(f).__name__ == "_DropMessages"
                          for f in logging.getLogger("diffusers.models.modeling_utils").filters), flush=True)
    print("END", flush=True)
""")

SILENCED = ("should be kept in float32: []", "`accelerate` was not found", "all_gather_into_tensor` is deprecated",
            "Loading weights", "Writing model shards")
KEPT = ("sidscale-own data warning", "sidscale-own log warning", "should be kept in float32: ['norm']",
        "another diffusers warning", "another torch FutureWarning", "END")


def test_third_party_messages_are_silenced_once_in_one_place_and_nothing_else():
    """``quiet_third_party`` drops exactly the named messages (each triggered here for real) and keeps
    sidscale's own warnings and every other third-party message."""
    rc, raw = python_in_pty(QUIET_CHECK.format(install="from sidscale.terminal import quiet_third_party; "
                                                       "quiet_third_party(); quiet_third_party()"))
    assert rc == 0, raw
    text = "\n".join(render(raw, COLS))
    for message in SILENCED:
        assert message not in text, (message, text)
    for message in KEPT:
        assert text.count(message) == 1, (message, text)
    assert "filters: 1" in text  # installed twice, added once


def test_the_training_bar_names_the_method_the_run_uses():
    from sidscale.core.schedule import FlowSchedule, VPSchedule
    from sidscale.terminal import method_label, teacher_sampler_name

    vp = VPSchedule.from_settings(1000, 0.00085, 0.012, "scaled_linear", "epsilon")
    assert method_label(vp) == "sid-lsg" and method_label(FlowSchedule()) == "sid-dit"
    assert method_label(FlowSchedule(), 4) == "sid-dit 4-step" and method_label(vp, 2) == "sid-lsg 2-step"
    assert teacher_sampler_name(vp) == "ddim" and teacher_sampler_name(FlowSchedule()) == "flow_euler"


LONG_PHASES = textwrap.dedent("""
    import tempfile
    from pathlib import Path
    import torch
    from sidscale.distributed import comm
    from sidscale.eval.generate import generate_images
    from sidscale.families.toy.evaluation import toy_quality
    from sidscale.families import family_for_kind
    from sidscale.config import config_from_dict
    from sidscale.families.toy.mixture import ToyMixture
    from sidscale.families.toy.fit import ToyTeacherSpec, ensure_toy_teacher, load_toy_mixture
    from sidscale.terminal import quiet_third_party
    from sidscale.families.toy.tiny import write_tiny_toy_teacher

    quiet_third_party()  # as the entry points do (transformers' own bar when the fit saves its encoder)
    tmp = Path(tempfile.mkdtemp())
    spec = ToyTeacherSpec(mixture=ToyMixture(size=8).to_dict(), fit_steps=1, batch_size=2, eval_samples=2,
                          eval_steps=1)
    ensure_toy_teacher(tmp / "cache", spec)
    sample = lambda prompts, seeds: torch.zeros(len(prompts), 3, 4, 4)
    generate_images(sample, ["p"] * 7, tmp / "images", batch=3, rank=0, world=2)
    generate_images(sample, ["p"] * 7, tmp / "images", batch=3, rank=1, world=2)   # rank 1: no bar
    teacher_dir = write_tiny_toy_teacher(tmp / "toy", sample_size=8)
    teacher = family_for_kind("toy").load_teacher(config_from_dict(
        {"teacher": {"kind": "toy", "path": str(teacher_dir), "dtype": "fp32", "resolution": 8}}, "test"), "cpu")
    mixture = load_toy_mixture(teacher_dir)
    toy_quality(teacher, mixture, teacher.net, 6, 2, 1.5, 625, batch=4)
    print("RANK 1 FROM HERE", flush=True)
    comm.rank = lambda: 1
    toy_quality(teacher, mixture, teacher.net, 2, 1, 1.5, 625)
    print("END", flush=True)
""")


def test_long_phases_show_a_progress_bar_with_eta_on_rank_0_only():
    """The toy teacher's fit and its report, fid_eval's image generation and the toy evaluation each
    draw a bar with the elapsed time and the ETA, to completion, on rank 0; other ranks draw none."""
    rc, raw = python_in_pty(LONG_PHASES)
    assert rc == 0, raw
    raw, rank1 = raw.split("RANK 1 FROM HERE")
    for desc, total in (("fitting the eps toy teacher (once; cached)", 1), ("toy teacher fit report", 3),
                        ("generating images (rank 0's share of 7, 2 ranks)", 4),
                        ("toy evaluation: 1-step student", 6), ("toy evaluation: teacher DDIM 2 steps", 6)):
        shown = bar_frames(raw, desc)
        assert shown, (desc, frames(raw))
        assert re.search(rf"100%\|.*\| {total}/{total} {ETA}", shown[-1]), (desc, shown)
    # generated by rank 1 (chunk 1: images 3..5) without a bar, and only rank 0's share in rank 0's
    assert len(bar_frames(raw, "generating images")) == len(bar_frames(raw, "generating images (rank 0's"))
    assert frames(rank1) == ["END"], frames(rank1)


@pytest.mark.parametrize("num_samples", [0, 16])
def test_demo_without_a_toy_evaluation_says_why_instead_of_crashing(num_samples, tmp_path, monkeypatch, capsys):
    """``tools/demo.py --set eval.num_samples=0`` trained, then died on the missing toy_eval.json."""
    import json
    import sys

    sys.path.insert(0, str(__import__("tests.helpers.terminal").helpers.terminal.REPO / "tools"))
    import demo

    run = tmp_path / "run"

    def fake_launch(cmd, env, cwd):  # the run as the trainer leaves it, without training
        run.mkdir()
        (run / "config.yaml").write_text(f"teacher:\n  kind: toy_flow\neval:\n  num_samples: {num_samples}\n")
        if num_samples:
            (run / "toy_eval.json").write_text(json.dumps({
                "frechet_one_step": 0.5, "prompt_accuracy_one_step": 0.25, "colour_accuracy_one_step": 0.5,
                "frechet_exact_vs_exact": 0.1, "prompt_accuracy_exact": 1.0, "colour_accuracy_exact": 1.0,
                "teacher_steps": 25, "teacher_cfg": 1.5, "generator_steps": 2}))
        return 0

    monkeypatch.setattr(demo.subprocess, "call", fake_launch)
    assert demo.main(["--run-dir", str(run), "--set", f"eval.num_samples={num_samples}"]) == 0
    out = capsys.readouterr().out
    if num_samples == 0:
        assert "eval.num_samples = 0: no toy evaluation was made, so there is no comparison table" in out
        assert "toy Frechet" not in out
    else:
        assert re.search(r"2-step student \(EMA\)\s+0\.5000\s+25\.0%\s+50\.0%", out), out


def test_toy_evaluation_tags_name_what_ran():
    """K-step students and flow teachers: the tags say K and the teacher's sampler and steps (they
    said ``frechet_one_step`` and ``*_teacher_ddim`` whatever ran)."""
    from sidscale.terminal import toy_eval_scalars

    result = {"frechet_one_step": 1.0, "prompt_accuracy_one_step": 0.5, "colour_accuracy_one_step": 0.75,
              "frechet_teacher_ddim": 2.0, "prompt_accuracy_teacher_ddim": 0.4, "colour_accuracy_teacher_ddim": 0.6,
              "frechet_exact_vs_exact": 0.1, "prompt_accuracy_exact": 1.0, "colour_accuracy_exact": 1.0,
              "step": 200, "num_samples": 1000, "teacher_steps": 4, "generator_steps": 4}
    assert toy_eval_scalars(result, 4, "flow_euler", 4) == {
        "eval/frechet_student_4_step": 1.0, "eval/prompt_accuracy_student_4_step": 0.5,
        "eval/colour_accuracy_student_4_step": 0.75,
        "eval/frechet_teacher_flow_euler_4_steps": 2.0, "eval/prompt_accuracy_teacher_flow_euler_4_steps": 0.4,
        "eval/colour_accuracy_teacher_flow_euler_4_steps": 0.6,
        "eval/frechet_exact_vs_exact": 0.1, "eval/prompt_accuracy_exact": 1.0, "eval/colour_accuracy_exact": 1.0}


SIDSCALE_BARS = re.compile(r"^(sid-(lsg|dit)( \d+-step)?|toy evaluation: [^:|]+|fitting the [^:|]+"
                           r"|toy teacher fit report|generating [^:|]+): +\d+%\|")  # cut at the width, if wider
SIDSCALE_LINES = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ sidscale[\w.]*: "  # sidscale's loggers, any level
    r"|sidscale: |exported EMA generator to |toy Frechet distance to exact samples "  # the trainer's own lines
    r"|\+ \S+python\S* -m torch\.distributed\.run |demo finished in |toy Frechet +prompt acc\. "  # demo.py
    r"|\d+-step student \(EMA\) |one-step student |teacher, \d+-step |exact samples \(noise floor\) |\(accuracy: "
    r"|export: )")


@pytest.mark.slow
def test_a_demo_run_shows_only_sidscales_lines_and_bars(tmp_path):
    """``tools/demo.py --family flow`` (2 ranks, K = 2) in a terminal 100 columns wide, from the start
    to the final table: every line drawn is sidscale's own (its loggers, its prints, demo.py's table)
    or one of its bars; the bar names SiD-DiT and K, its last line stays above the export line; the
    toy evaluation draws its bars; its TensorBoard tags name K and the flow Euler sampler."""
    import os
    import sys

    from sidscale.families.toy.fit import ToyTeacherSpec, ensure_toy_teacher
    from sidscale.families.toy.mixture import ToyMixture
    from tests.helpers.terminal import REPO, run_in_pty

    # a flow toy teacher fitted for one step: what is shown does not depend on its quality
    teacher = ensure_toy_teacher(tmp_path / "cache", ToyTeacherSpec(
        mixture=ToyMixture(size=8).to_dict(), fit_steps=1, batch_size=2, eval_samples=0, parameterisation="flow"))
    run = tmp_path / "run"
    sets = [f"teacher.path={teacher}", f"teacher.cache_dir={tmp_path / 'cache'}", "teacher.resolution=8",
            "train.max_steps=4", "train.log_every=2", "train.preview_every=2", "train.ckpt_every=4",
            "train.global_batch=4", "train.micro_batch=2", "method.generator_steps=2", "eval.num_samples=16",
            "eval.teacher_steps=2"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rc, raw = run_in_pty([sys.executable, str(REPO / "tools" / "demo.py"), "--family", "flow", "--run-dir", str(run),
                          *[a for s in sets for a in ("--set", s)]], env=env)
    assert rc == 0, raw
    shown = frames(raw)
    strangers = [f for f in shown if not (SIDSCALE_BARS.match(f) or SIDSCALE_LINES.match(f))]
    assert not strangers, "\n".join(strangers)

    training = bar_frames(raw, "sid-dit 2-step")
    assert training and re.search(r"\| 4/4 \[.*fake=", training[-1]), training
    screen = render(raw, COLS)
    exported = next(i for i, line in enumerate(screen) if line.startswith("exported EMA generator to"))
    assert [i for i, line in enumerate(screen) if line.startswith("sid-dit 2-step: 100%")] == [exported - 1], screen
    for desc in ("toy evaluation: 2-step student", "toy evaluation: teacher flow Euler 2 steps"):
        assert re.search(rf"100%\|.*\| 16/16 {ETA}", bar_frames(raw, desc)[-1]), desc
    assert any(re.match(r"teacher, 2-step flow Euler cfg 1\.5 +\d", line.strip()) for line in screen), screen

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    evals = {t for t in acc.Tags()["scalars"] if t.startswith("eval/")}
    assert {"eval/frechet_student_2_step", "eval/frechet_teacher_flow_euler_2_steps",
            "eval/prompt_accuracy_student_2_step", "eval/frechet_exact_vs_exact"} <= evals, evals
    assert not {t for t in evals if "one_step" in t or "ddim" in t}, evals

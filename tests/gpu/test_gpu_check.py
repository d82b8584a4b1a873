"""The GPU check's pieces that a CPU can check: the random-weight preset teacher it trains on loads
through the trainer's real loading path with the preset's architecture, and the check itself, run
in GPU mode on a machine without a GPU, fails clearly, skips what depends on the GPU and still
writes its JSON. (The whole sequence on the CPU: ``bash tools/gpu_check.sh --cpu-smoke``, ~3 min.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from sidscale.config import TeacherConfig
from sidscale.core.schedule import VPSchedule
from sidscale.families.presets import build_preset_unet, latent_shape
from sidscale.families.shared.tokenizers import CLIP_VOCAB_SIZE
from sidscale.families.unet_vp.loading import load_teacher
from sidscale.testing.random_teacher import read_info, write_random_teacher
from tests.helpers.dist_launch import REPO


def test_random_teacher_loads_through_load_teacher_with_the_preset_architecture(tmp_path):
    info = write_random_teacher(tmp_path / "teacher", "tiny", dtype="bf16", seed=3)
    assert read_info(tmp_path / "teacher") == info
    assert (info["kind"], info["resolution"]) == ("sd", 64)

    # on disk: bf16 safetensors (half the bytes of fp32), as asked
    with safe_open(str(tmp_path / "teacher" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    assert dtypes == {"BF16"}

    teacher = load_teacher(TeacherConfig(kind=info["kind"], path=str(tmp_path / "teacher"), dtype="fp32",
                                         resolution=info["resolution"]))
    # the preset's UNet, built independently: same config, same parameter shapes, the seed's weights
    # (rounded to bf16 by the save)
    want = build_preset_unet("tiny", "cpu", seed=3)
    got_cfg, want_cfg = dict(teacher.net.config), dict(want.config)
    assert {k: got_cfg[k] for k in want_cfg if not k.startswith("_")} == \
           {k: v for k, v in want_cfg.items() if not k.startswith("_")}
    want_sd = want.state_dict()
    got_sd = teacher.net.state_dict()
    assert got_sd.keys() == want_sd.keys()
    for k, v in want_sd.items():
        assert torch.equal(got_sd[k], v.to(torch.bfloat16).float()), k
    assert sum(p.numel() for p in teacher.net.parameters()) == info["parameters"]["unet"]

    # the text side feeds the UNet's cross-attention; the latents come out of a factor-8 VAE
    assert teacher.latent_shape == latent_shape("tiny") == (4, 8, 8)
    assert len(teacher.conditioner.tokenizer) == CLIP_VOCAB_SIZE
    cond = teacher.conditioner.encode(["a red circle", ""])
    assert cond["encoder_hidden_states"].shape == (2, 77, teacher.net.config.cross_attention_dim)
    x = torch.randn(2, *teacher.latent_shape)
    out = teacher.net(x, torch.tensor([10, 900]), encoder_hidden_states=cond["encoder_hidden_states"]).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert teacher.vae is not None and teacher.scaling_factor == 0.18215
    assert torch.equal(teacher.schedule.alphas_cumprod, VPSchedule.from_settings().alphas_cumprod)


@pytest.mark.slow
def test_gpu_mode_without_a_gpu_fails_clearly_skips_the_rest_and_still_writes_the_json(tmp_path):
    out = tmp_path / "result.json"
    # DS_ACCELERATOR=cpu in the caller's shell must not turn the GPU check into a CPU run
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen([sys.executable, "tools/gpu_check.py", "--out", str(out), "--workdir", str(tmp_path / "w")],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the check kills its own children and writes its JSON
        stdout, stderr = proc.communicate(timeout=120)
        raise AssertionError(f"the check ran on past 300 s:\n{stdout[-3000:]}") from None
    assert proc.returncode == 1, stdout + stderr
    record = json.loads(out.read_text())
    assert record["mode"] == "gpu" and record["ok"] is False
    steps = {s["name"]: s for s in record["steps"]}
    assert list(steps) == ["environment", "comm_check", "gpu_tests", "write_teacher", "disk_space",
                           "train_checkpoint_kill",
                           "resume_train_export", "sample", "bench_sd15", "memory_plan_sd15"]
    env_step = steps["environment"]
    assert env_step["status"] == "fail" and "no CUDA device" in env_step["reason"], env_step
    assert record["environment"]["DS_ACCELERATOR"] is None  # removed for every child in GPU mode
    assert record["environment"]["cuda_available"] is False
    for name, s in steps.items():
        if name != "environment":
            assert s["status"] == "skipped" and "did not pass" in s["reason"], s
    assert "environment" in stdout and "FAIL" in stdout


MAIN_PART = ["environment", "write_teacher", "disk_space", "train_checkpoint_kill", "resume_train_export", "sample",
             "bench_tiny", "memory_plan_tiny"]


def test_a_spent_budget_skips_every_step_and_leaves_one_json_and_one_log_in_the_out_folder(tmp_path):
    """A lent machine's call has a hard limit: with the part's budget spent no step starts (none is cut
    mid-way), and the folder it returns holds the part's JSON and its one log, nothing else."""
    out = tmp_path / "out"
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--cpu-smoke", "--part", "main", "--budget-s", "1",
                           "--out", str(out), "--workdir", str(tmp_path / "w")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # skipped is not failed
    assert sorted(f.name for f in out.iterdir()) == ["cpu_main.json", "cpu_main.log"]
    record = json.loads((out / "cpu_main.json").read_text())
    assert (record["part"], record["budget_s"]) == ("main", 1.0)
    assert [s["name"] for s in record["steps"]] == MAIN_PART
    # each skipped for the budget, or for a step before it that was
    assert all(s["status"] == "skipped" and ("budget" in s["reason"] or "did not pass" in s["reason"])
               for s in record["steps"]), record["steps"]
    assert "budget" in record["steps"][0]["reason"]  # the environment step, which the others need


def test_gather_logs_puts_every_step_log_in_one_file_oldest_first(tmp_path):
    import time as _time

    from tools.gpu_check import gather_logs

    logs = tmp_path / "logs"
    logs.mkdir()
    for i, name in enumerate(["b.log", "a.log", "c.log"]):
        (logs / name).write_text(f"text of {name}\n" + "x" * (50 if name == "c.log" else 0))
        os.utime(logs / name, (_time.time() + i, _time.time() + i))
    gather_logs(logs, tmp_path / "all.log", per_log=20)
    text = (tmp_path / "all.log").read_text()
    assert [line for line in text.splitlines() if line.startswith("=====")] == [
        "===== b.log =====", "===== a.log =====", "===== c.log ====="]
    assert "text of b.log" in text and text.endswith("[... 44 characters cut ...]\n" + "x" * 20 + "\n")


def test_big_preset_slices_keep_the_real_width_and_fit_one_h200():
    """flux_dev_4l / sd35_large_4l: the published transformer with fewer blocks, nothing else changed; the
    memory plan finds a setting for one 141 GB H200 (the --part big check measures it)."""
    from sidscale.families.flux.presets import flux_preset
    from sidscale.families.presets import SLICES, preset_nets
    from sidscale.families.sd3.presets import dit_preset
    from sidscale.perf.memory_plan import PlanInput, plan

    for name, (base, blocks) in SLICES.items():
        full = (flux_preset if base.startswith("flux") else dit_preset)(base)
        cut = (flux_preset if base.startswith("flux") else dit_preset)(name)
        assert {k: v for k, v in cut.transformer.items() if k not in blocks} == \
               {k: v for k, v in full.transformer.items() if k not in blocks}
        assert all(cut.transformer[k] == v < full.transformer[k] for k, v in blocks.items())
        assert (cut.text_encoders, cut.vae, cut.resolution, cut.t5_tokens) == \
               (full.text_encoders, full.vae, full.resolution, full.t5_tokens)
        # on the meta device: the blocks asked for, everything outside the blocks exactly the full network's
        nets = preset_nets(name)
        big, small = nets.build(base, "meta", 0), nets.build(name, "meta", 0)
        attrs = [a for a in ("transformer_blocks", "single_transformer_blocks") if hasattr(big, a)]
        assert [len(getattr(small, a)) for a in attrs] == [blocks[k] for k in ("num_layers", "num_single_layers")
                                                           if k in blocks]

        def outside(m, attrs=attrs):
            return {n: p.shape for n, p in m.named_parameters() if n.split(".")[0] not in attrs}

        assert outside(small) == outside(big) and outside(big)
        res = plan(PlanInput(name, 1, 3, 1, "bf16", None, True, 139.8, teacher_partitioned=True))
        assert res.max_micro_batch >= 1, name


def test_a_step_cut_by_the_budget_is_not_measured_but_a_failure_with_time_left_fails(tmp_path, monkeypatch):
    import tools.gpu_check as gc

    def check(budget):
        return gc.Check(gc.SMOKE_MODE, tmp_path / "r.json", tmp_path, None, [], 0.25, None, part="main",
                        budget_s=budget)

    def fails():
        raise gc.StepFailed("exited None")

    monkeypatch.setattr(gc, "MIN_STEP_S", 0.1)
    short, roomy = check(1.0), check(600.0)
    short.step("cut", fails)  # started with time left, ended with the budget gone
    roomy.step("broken", fails)
    (cut,), (broken,) = short.record["steps"], roomy.record["steps"]
    assert cut["status"] == "skipped" and cut["reason"].startswith("cut by the part's time budget"), cut
    assert broken["status"] == "fail" and broken["reason"] == "exited None", broken

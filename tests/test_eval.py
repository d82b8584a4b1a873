"""Evaluation pipeline (FID / CLIP score / generation) on random-weight stand-ins.

The real TF-Inception torchscript (inception-2015-12-05.pt) is a traced file that cannot be rebuilt
offline, so ``inception_standin`` saves a tiny torchscript module with the same interface
(``.layers(x in [-1, 1], 299x299) -> [B, 2048, 1, 1]``); these tests exercise the pipeline around the
network (loading through clean-fid's InceptionV3W, preprocessing, statistics), not its numbers.
CLIP uses the real ViT-B-32 architecture with random weights saved to a file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from sidscale.eval.fid import (
    EvalWeightsError,
    cached_folder_stats,
    fid_from_features,
    files_features,
    load_inception,
    load_stats,
)
from sidscale.eval.frechet import feature_statistics, frechet_distance
from sidscale.eval.generate import generate_images, one_step_sampler, read_prompts
from sidscale.eval.images import image_path, is_complete_png, protocol_resize
from sidscale.sample import to_uint8

RES = 8
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two red circles", "a small blue square",
           "a big green circle", "a red square on the left"]


class _StandInLayers(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=13, stride=13)  # 299 -> 23
        self.proj = torch.nn.Linear(8 * 4 * 4, 2048)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 4)
        return self.proj(h.flatten(1)).view(x.shape[0], 2048, 1, 1)


class _StandInInception(torch.nn.Module):
    """Same call signature as the TF-Inception torchscript: base(x in [0, 255], return_features) and
    base.layers(x normalised to [-1, 1] at 299x299)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = _StandInLayers()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return self.layers((x - 128) / 128).view(x.shape[0], 2048)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def inception_standin(work) -> Path:
    torch.manual_seed(0)
    path = work / "my-inception.pt"  # any file name: load_inception must not rely on clean-fid's name
    torch.jit.script(_StandInInception().eval()).save(str(path))
    return path


@pytest.fixture(scope="module")
def clip_file(work) -> Path:
    import open_clip

    torch.manual_seed(0)
    path = work / "clip_vit_b32_random.pt"
    torch.save(open_clip.create_model("ViT-B-32", pretrained=None).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def teacher_dir(work) -> Path:
    from tests.tiny_teachers import write_tiny_toy_teacher

    return write_tiny_toy_teacher(work / "teacher", sample_size=RES)


def sampling_meta(teacher: Path, step: int) -> dict:
    return {"t_init": 625, "prediction_type": "epsilon",
            "schedule": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                         "beta_schedule": "scaled_linear"},
            "latent_shape": [3, RES, RES], "scaling_factor": 1.0, "teacher_path": str(teacher.resolve()),
            "teacher_kind": "toy", "resolution": RES, "step": step, "images_seen": 4 * step}


def tiny_generator_state() -> tuple[dict, dict]:
    from sidscale.models.tiny import build_tiny_unet

    unet = build_tiny_unet(5, sample_size=RES)
    return unet.state_dict(), dict(unet.config)


@pytest.fixture(scope="module")
def run_with_export(work, teacher_dir) -> Path:
    from sidscale.export import export_generator

    run = work / "run"
    state, config = tiny_generator_state()
    export_generator(state, config, run / "export", sampling_meta(teacher_dir, 3))
    (run / "checkpoints").mkdir(parents=True)
    return run


def write_fake_checkpoint(ckpt: Path, teacher: Path, step: int) -> None:
    """The layout ``full_ema_from_checkpoint`` reads (one rank, no ZeRO-3), without running DeepSpeed."""
    state, _ = tiny_generator_state()
    names = list(state)
    ckpt.mkdir(parents=True)
    for tag in ("generator", "fake"):
        (ckpt / tag).mkdir()
        (ckpt / tag / "placeholder").write_text("x")
    flat = torch.cat([state[n].flatten().float() for n in names])
    torch.save({"ema": {"zero3": False, "shards": [flat]}}, ckpt / "rank_00000.pt")
    (ckpt / "meta.json").write_text(json.dumps({
        "world_size": 1, "step": step, "ema_names": names, "ema_shapes": [list(state[n].shape) for n in names],
        "sampling": sampling_meta(teacher, step)}))


def write_random_images(folder: Path, n: int, seed: int, size: tuple[int, int] = (40, 30)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(image_path(folder, i))


# ---------------------------------------------------------------------------------------- FID maths


def test_frechet_distance_matches_independent_scipy_computation():
    rng = np.random.default_rng(0)
    d = 6
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2): a symmetric PSD square root, no complex parts
    r1 = scipy.linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(
        scipy.linalg.sqrtm(r1 @ s2 @ r1).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    # diagonal covariances: closed form sum (sqrt(a) - sqrt(b))^2
    va, vb = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(closed, rel=1e-9)


def test_fid_of_a_folder_against_itself_is_zero_and_ref_stats_are_cached(work, inception_standin):
    folder = work / "ref_images"
    write_random_images(folder, 12, seed=1)
    fn = load_inception(inception_standin)
    feats = files_features(sorted(folder.glob("*.png")), fn, batch=5)
    assert feats.shape == (12, 2048)
    mu, sigma = feature_statistics(feats)
    # 12 images < 2048 dims: fid_from_features takes its exact low-rank path (sqrtm of a 2048 matrix
    # takes over a minute on a shared CPU)
    assert abs(fid_from_features(feats, mu, sigma)) < 1e-6 * np.trace(sigma)

    # Another batch size reorders float32 sums inside the network's convolution (K = 3*13*13 = 507
    # terms) and linear layer (K = 128): the standard bound for a reordered float32 sum of K terms is
    # K * 2^-24 * sum |terms|, with sum |terms| of the order of the features' scale. So features of the
    # same images may differ by up to ~(507 + 128) * 2^-24 * max|f| (3.8e-5 relative), never by the
    # O(max|f|) of a wrong image or order; a relative tolerance on the MEAN would not follow from this
    # (entries of mu near 0 have no relative precision). Measured: 8.9e-8 with max|f| = 0.34.
    other_batch = files_features(sorted(folder.glob("*.png")), fn, batch=4)
    np.testing.assert_allclose(other_batch, feats, rtol=0, atol=(507 + 128) * 2.0**-24 * np.abs(feats).max())

    out = work / "ref_stats.npz"
    mu_c, sigma_c, meta = cached_folder_stats(folder, out, inception_standin, fn, batch=5)
    np.testing.assert_array_equal(mu_c, mu)  # same batches, same arithmetic: bit-identical
    np.testing.assert_array_equal(sigma_c, sigma)
    assert meta["num_images"] == 12 and load_stats(out)[2] == meta

    def must_not_run(x):
        raise AssertionError("statistics were recomputed although the cache matches")

    cached_folder_stats(folder, out, inception_standin, must_not_run)  # cache hit
    write_random_images(folder, 13, seed=1)  # one more image: the cache no longer matches
    assert cached_folder_stats(folder, out, inception_standin, fn)[2]["num_images"] == 13


def test_low_rank_fid_path_matches_the_standard_formula():
    rng = np.random.default_rng(2)
    d = 40
    ref = rng.normal(size=(200, d)) * rng.uniform(0.5, 2, d) + 0.3
    ref_mu, ref_sigma = feature_statistics(ref)
    for n in (25, 40):  # N < D and N = D: singular sample covariance, the low-rank path
        feats = rng.normal(size=(n, d))
        expected = frechet_distance(*feature_statistics(feats), ref_mu, ref_sigma)
        assert fid_from_features(feats, ref_mu, ref_sigma) == pytest.approx(expected, rel=1e-5)
    feats = rng.normal(size=(60, d))  # N > D: the standard formula itself
    assert fid_from_features(feats, ref_mu, ref_sigma) == frechet_distance(*feature_statistics(feats), ref_mu,
                                                                           ref_sigma)


# ---------------------------------------------------------------------------------------- preprocessing


def test_protocol_preprocessing_matches_pil_on_crafted_images(work, inception_standin):
    rng = np.random.default_rng(3)
    for w, h in ((300, 200), (201, 333), (512, 512), (64, 64)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        ref = Image.fromarray(arr).crop((left, top, left + s, top + s)).resize((256, 256), Image.LANCZOS)
        got = protocol_resize(arr)
        assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
        np.testing.assert_array_equal(got, np.asarray(ref))

    # what reaches the network: the 256 image, then clean-fid's "clean" resize (PIL bicubic on float
    # channels to 299, not quantised), in [0, 255]
    arr = rng.integers(0, 256, (120, 90, 3), dtype=np.uint8)
    path = work / "crafted.png"
    Image.fromarray(arr).save(path)
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return torch.zeros(x.shape[0], 2048)

    files_features([path], record)
    small = protocol_resize(arr)
    expected = np.stack([np.asarray(Image.fromarray(small[:, :, c].astype(np.float32), mode="F")
                                    .resize((299, 299), Image.BICUBIC)).clip(0, 255) for c in range(3)])
    np.testing.assert_allclose(seen[0][0].numpy(), expected, atol=1e-4)


def test_uint8_conversion_and_png_round_trip(work):
    values = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.001, 0.5, 0.99, 1.0, 1.2])
    expected = np.clip(values.double().numpy() * 127.5 + 128, 0, 255).astype(np.uint8)  # truncation
    np.testing.assert_array_equal(to_uint8(values).numpy(), expected)

    img = torch.linspace(-1.2, 1.2, 3 * 4 * 5).view(1, 3, 4, 5)
    out = work / "roundtrip"
    generate_images(lambda p, s: img, ["x"], out, batch=1)
    with Image.open(image_path(out, 0)) as im:
        saved = np.asarray(im)
    np.testing.assert_array_equal(saved, to_uint8(img)[0].permute(1, 2, 0).numpy())
    assert is_complete_png(image_path(out, 0))
    truncated = out / "truncated.png"
    truncated.write_bytes(image_path(out, 0).read_bytes()[:-5])
    assert not is_complete_png(truncated)


# ---------------------------------------------------------------------------------------- generation


def test_image_i_is_identical_for_1_and_2_ranks_and_after_resume(work, run_with_export):
    sample = one_step_sampler(run_with_export / "export", "cpu", "fp32")
    one, two = work / "gen_1rank", work / "gen_2ranks"
    n, _ = generate_images(sample, PROMPTS, one, batch=2)
    assert n == len(PROMPTS)
    counts = [generate_images(sample, PROMPTS, two, batch=2, rank=r, world=2)[0] for r in (1, 0)]
    assert counts == [3, 4]  # chunks of 2: {0,1},{4,5} -> rank 0; {2,3},{6} -> rank 1
    for i in range(len(PROMPTS)):
        assert image_path(one, i).read_bytes() == image_path(two, i).read_bytes(), f"image {i} differs"
    before = {i: image_path(one, i).read_bytes() for i in range(len(PROMPTS))}
    for i in (1, 4, 6):
        image_path(one, i).unlink()
    image_path(one, 2).write_bytes(before[2][:10])  # a torn file is regenerated too
    assert generate_images(sample, PROMPTS, one, batch=2)[0] == 4
    assert {i: image_path(one, i).read_bytes() for i in range(len(PROMPTS))} == before
    assert len({before[i] for i in before}) == len(PROMPTS)  # different prompts/seeds, different images


# ---------------------------------------------------------------------------------------- CLIP score


def test_clip_score_equals_direct_open_clip_computation(work, clip_file):
    import open_clip

    from sidscale.eval.clip_score import clip_score_files, load_clip

    folder = work / "clip_images"
    write_random_images(folder, 3, seed=7, size=(64, 48))
    files = [image_path(folder, i) for i in range(3)]
    prompts = PROMPTS[:3]
    score, _ = clip_score_files(load_clip("ViT-B-32", clip_file), files, prompts, batch=2)

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(clip_file))
    tok = open_clip.get_tokenizer("ViT-B-32")
    sims = []
    with torch.no_grad():
        for f, p in zip(files, prompts, strict=True):
            img = model.encode_image(preprocess(Image.open(f).convert("RGB"))[None])
            txt = model.encode_text(tok(["A photo depicts " + p]))
            sims.append(torch.nn.functional.cosine_similarity(img, txt).item())
    assert score == pytest.approx(float(np.mean(sims)), abs=1e-5)
    assert abs(score) <= 1.0


# ---------------------------------------------------------------------------------------- CLI


def cli_args(model: Path, prompts: Path, out: Path, inception: Path, ref_dir: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--prompts", str(prompts), "--ref-dir", str(ref_dir), "--inception-weights",
            str(inception), "--out", str(out), "--device", "cpu", "--batch", "3", "--workers", "0",
            "--feature-batch", "4", *extra]


def test_cli_checkpoint_two_ranks_teacher_and_tensorboard(work, run_with_export, teacher_dir, inception_standin,
                                                          clip_file):
    from sidscale.eval.evaluate import build_parser, evaluate

    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ref_dir = work / "cli_ref"
    write_random_images(ref_dir, 10, seed=11)
    ckpt = run_with_export / "checkpoints" / "step_00000003"
    write_fake_checkpoint(ckpt, teacher_dir, 3)
    out = run_with_export / "eval" / "step_00000003"
    argv = cli_args(ckpt, prompts, out, inception_standin, ref_dir, "--clip-model", "ViT-B-32", "--clip-weights",
                    str(clip_file), "--teacher-steps", "2", "--teacher-cfg", "3")
    # rank 1 waits for rank 0's export of the checkpoint: make it first, then run rank 1 before rank 0
    # (rank 1 generates its chunks and returns; rank 0 reuses the export, generates, and scores)
    from sidscale.eval.model_source import export_checkpoint

    export_checkpoint(ckpt, out / "export")
    assert evaluate(build_parser().parse_args([*argv, "--rank", "1", "--world-size", "2"])) is None
    assert not (out / "metrics.json").exists()
    metrics = evaluate(build_parser().parse_args([*argv, "--rank", "0", "--world-size", "2"]))
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["fid"] == pytest.approx(metrics["fid"]) and on_disk["num_images"] == len(PROMPTS)
    assert metrics["step"] == 3 and metrics["model_kind"] == "checkpoint" and metrics["image_size"] == [RES, RES]
    assert -1 <= metrics["clip_score"] <= 1 and metrics["teacher"]["ddim_steps"] == 2
    assert np.isfinite(metrics["teacher"]["fid"]) and metrics["protocol"]["clip_prefix"] == "A photo depicts "
    assert len(list((out / "teacher_images").glob("*.png"))) == len(PROMPTS)

    # the checkpoint's EMA equals the export's weights, so its images equal the export's
    direct = work / "gen_from_export"
    generate_images(one_step_sampler(run_with_export / "export", "cpu", "fp32"), PROMPTS, direct, batch=3)
    for i in range(len(PROMPTS)):
        assert image_path(direct, i).read_bytes() == image_path(out / "images", i).read_bytes()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_with_export / "tb"))
    acc.Reload()
    [fid_event] = acc.Scalars("eval/fid")
    assert fid_event.step == 3 and fid_event.value == pytest.approx(metrics["fid"], rel=1e-5)
    assert acc.Scalars("eval/clip_score")[0].value == pytest.approx(metrics["clip_score"], rel=1e-5)


def test_clear_errors(work, run_with_export, inception_standin, clip_file):
    from sidscale.eval.evaluate import build_parser, evaluate
    from sidscale.eval.model_source import ModelDirError

    prompts = work / "prompts_err.txt"
    prompts.write_text("a red circle\n")
    ref_dir = work / "ref_images"
    out = work / "err_out"
    export = run_with_export / "export"

    def run(*argv: str, model: Path = export, prompt_file: Path = prompts, inception: Path = inception_standin):
        return evaluate(build_parser().parse_args(cli_args(model, prompt_file, out, inception, ref_dir, *argv)))

    with pytest.raises(EvalWeightsError, match=r"nope\.pt.*nvlabs-fi-cdn.*inception-2015-12-05\.pt"):
        run(inception=work / "nope.pt")
    with pytest.raises(EvalWeightsError, match=r"missing_clip\.bin.*laion2b_s12b_b42k"):
        run("--clip-weights", str(work / "missing_clip.bin"))
    empty = work / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="no prompts"):
        run(prompt_file=empty)
    with pytest.raises(ValueError, match="--num 5"):
        run("--num", "5")
    not_export = work / "not_an_export"
    not_export.mkdir(exist_ok=True)
    with pytest.raises(ModelDirError, match=r"not_an_export.*neither a sidscale export"):
        run(model=not_export)
    with pytest.raises(ModelDirError, match="not a directory"):
        run(model=work / "missing_dir")
    assert not (out / "images").exists()  # every check fails before any generation
    shutil.rmtree(out, ignore_errors=True)
    with pytest.raises(FileNotFoundError, match="ref-stats"):
        load_stats(work / "no_stats.npz")
    assert read_prompts(prompts) == ["a red circle"]

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
    RefStatsError,
    cached_folder_stats,
    check_stats_protocol,
    fid_from_features,
    files_features,
    load_inception,
    load_stats,
    save_stats,
)
from sidscale.eval.frechet import feature_statistics, frechet_distance
from sidscale.eval.generate import generate_images, one_step_sampler, protocol_pixels, read_prompts
from sidscale.eval.images import image_path, is_complete_png, protocol_resize, sid_dit_fid_resize
from sidscale.eval.protocols import PROTOCOLS
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
def teacher_dir(tiny_toy_teacher) -> Path:
    return tiny_toy_teacher  # the session's tiny toy teacher (sample_size 8 = RES)


def sampling_meta(teacher: Path, step: int, generator_steps: int = 1) -> dict:
    return {"t_init": 625, "prediction_type": "epsilon", "generator_steps": generator_steps, "family": "unet_vp",
            "schedule": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                         "beta_schedule": "scaled_linear"},
            "latent_shape": [3, RES, RES], "scaling_factor": 1.0, "teacher_path": str(teacher.resolve()),
            "teacher_kind": "toy", "resolution": RES, "step": step, "images_seen": 4 * step}


def tiny_generator_state() -> tuple[dict, dict]:
    from sidscale.families.unet_vp.tiny import build_tiny_unet

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
    # statistics cached by protocol version 1 (offsets rounded down, no version key) are recomputed ...
    v1 = {k: v for k, v in meta.items() if k not in ("fid_protocol_version", "crop")}
    save_stats(out, mu, sigma, {**v1, "crop": "center-square"})
    calls = []
    cached_folder_stats(folder, out, inception_standin, lambda x: calls.append(1) or fn(x), batch=5)
    assert calls and load_stats(out)[2] == meta
    # ... and refused when given as --ref-stats, as are statistics of another protocol's preprocessing;
    # statistics made elsewhere (no sidscale metadata) are taken as they are
    sid_lsg, dmd2 = PROTOCOLS["sid_lsg_coco30k"], PROTOCOLS["dmd2_coco10k_512"]
    check_stats_protocol(meta, sid_lsg, out)
    check_stats_protocol({}, sid_lsg, out)
    with pytest.raises(RefStatsError, match=r"fid_protocol_version.*\(None, 2\).*ref_stats.py --protocol sid_lsg"):
        check_stats_protocol({**v1, "crop": "center-square"}, sid_lsg, out)
    with pytest.raises(RefStatsError, match=r"PIL-lanczos-256.*PIL-lanczos-512"):
        check_stats_protocol(meta, dmd2, out)
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


def test_protocol_preprocessing_matches_torchvision_crop_and_pil(work, inception_standin):
    """GigaGAN's / DMD2's ``resize_and_center_crop``: torchvision's ``center_crop(img, min(img.size))``
    (offsets rounded half to even), then PIL Lanczos. 640x425 (a COCO size, 215 px to remove) is where
    rounding down would crop one pixel to the left."""
    import torchvision.transforms.functional as TF

    rng = np.random.default_rng(3)
    for w, h in ((640, 425), (425, 640), (643, 480), (300, 200), (201, 333), (512, 512), (64, 64)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        img = Image.fromarray(arr)
        ref = TF.center_crop(img, min(img.size)).resize((256, 256), Image.LANCZOS)
        got = protocol_resize(arr)
        assert got.dtype == np.uint8 and got.shape == (256, 256, 3)
        np.testing.assert_array_equal(got, np.asarray(ref), err_msg=f"{w}x{h}")
        if (w, h) == (640, 425):  # the old floor rounding gives another image here
            floor = img.crop((107, 0, 107 + 425, 425)).resize((256, 256), Image.LANCZOS)
            assert not np.array_equal(got, np.asarray(floor))
        np.testing.assert_array_equal(protocol_resize(arr, 512), np.asarray(
            TF.center_crop(img, min(img.size)).resize((512, 512), Image.LANCZOS)))

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

    # SiD-DiT (resize_images_in_tensor): to_pil_image, PIL Lanczos (256, 256), to_tensor * 255, .byte();
    # the uint8 256 image goes to the network, which resizes to 299 inside (legacy_tensorflow)
    import torchvision.transforms.functional as TF

    square = rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(square).save(path)
    t = TF.to_tensor(TF.to_pil_image(torch.from_numpy(square).permute(2, 0, 1)).resize((256, 256), Image.LANCZOS))
    sid_dit = (t * 255).byte().permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(sid_dit_fid_resize(square), sid_dit.astype(np.float32))
    seen.clear()
    files_features([path], record, protocol=PROTOCOLS["sid_dit_coco10k"])
    np.testing.assert_array_equal(seen[0][0].permute(1, 2, 0).numpy(), sid_dit.astype(np.float32))
    # and the network of that protocol is called with resize_inside (the stand-in's own forward)
    got = load_inception(inception_standin, protocol=PROTOCOLS["sid_dit_coco10k"])(seen[0])
    direct = torch.jit.load(str(inception_standin))(seen[0], True)
    torch.testing.assert_close(got, direct, rtol=0, atol=0)


def test_uint8_conversion_and_png_round_trip(work):
    values = torch.tensor([-1.5, -1.0, -0.999, -0.5, 0.0, 0.001, 0.5, 0.99, 1.0, 1.2])
    expected = np.clip(values.double().numpy() * 127.5 + 128, 0, 255).astype(np.uint8)  # truncation
    np.testing.assert_array_equal(to_uint8(values).numpy(), expected)
    np.testing.assert_array_equal(protocol_pixels(values).numpy(), expected)
    # DMD2: ((x + 1) * 127.5).clamp(0, 255).to(uint8), half a level lower (0 -> 127, not 128)
    dmd2 = np.clip((values.double().numpy() + 1) * 127.5, 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(protocol_pixels(values, 127.5).numpy(), dmd2)
    assert protocol_pixels(torch.zeros(1), 127.5).item() == 127

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


def test_clip_score_equals_the_reference_codes_computation(work, clip_file):
    """The score of each protocol against its evaluation code's steps, re-expressed with torchvision
    and open_clip directly: GigaGAN (SiD-LSG's numbers): torchvision centre crop, Resize(256, Lanczos),
    ToTensor, Normalize(0.5, 0.5), ``uint8((x + 1) * 127.5)``, open_clip's preprocess, "A photo
    depicts " + caption; DMD2: without the float round trip; SiD-DiT: square images, PIL Lanczos 256,
    to_tensor * 255 -> byte, / 255, bicubic F.interpolate to 224, OpenAI mean/std, no prefix."""
    import dataclasses

    import open_clip
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    from sidscale.eval.clip_score import clip_score_files, load_clip

    folder = work / "clip_images"
    write_random_images(folder, 3, seed=7, size=(64, 48))
    files = [image_path(folder, i) for i in range(3)]
    prompts = PROMPTS[:3]
    sid_dit = load_clip("ViT-B-32", clip_file, protocol=PROTOCOLS["sid_dit_coco10k"])
    assert (sid_dit.prep, sid_dit.prefix) == ("sid_dit", "")
    scorer = dataclasses.replace(sid_dit, prep="gigagan", prefix="A photo depicts ")  # the default protocol's
    score, _ = clip_score_files(scorer, files, prompts, batch=2)

    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=str(clip_file))
    model.eval()
    tok = open_clip.get_tokenizer("ViT-B-32")
    crop_256 = T.Compose([lambda im: TF.center_crop(im, min(im.size)),
                          T.Resize(256, interpolation=T.InterpolationMode.LANCZOS)])
    giga = T.Compose([crop_256, T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])

    def tensor2pil(x: torch.Tensor) -> Image.Image:  # GigaGAN evaluation.py
        return Image.fromarray(((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(1, 2, 0).numpy())

    def cosines(image_inputs: list[torch.Tensor], texts: list[str]) -> list[float]:
        with torch.no_grad():
            img = model.encode_image(torch.stack(image_inputs))
            txt = model.encode_text(tok(texts))
            return torch.nn.functional.cosine_similarity(img, txt).tolist()

    pil = [Image.open(f).convert("RGB") for f in files]
    giga_inputs = [preprocess(tensor2pil(giga(im))) for im in pil]
    for im, want in zip(pil, giga_inputs, strict=True):
        torch.testing.assert_close(scorer.image_input(im), want, rtol=0, atol=0)
    expected = np.mean(cosines(giga_inputs, ["A photo depicts " + p for p in prompts]))
    assert score == pytest.approx(float(expected), abs=1e-5)
    assert abs(score) <= 1.0

    # DMD2: the same crop + Lanczos 256, no float round trip (which changes what CLIP sees)
    dmd2 = dataclasses.replace(scorer, prep="crop_lanczos")
    dmd2_inputs = [preprocess(crop_256(im)) for im in pil]
    for im, want in zip(pil, dmd2_inputs, strict=True):
        torch.testing.assert_close(dmd2.image_input(im), want, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(giga_inputs, dmd2_inputs, strict=True))

    # SiD-DiT on square images (its generator's), no prefix
    square = work / "clip_square"
    write_random_images(square, 2, seed=8, size=(40, 40))
    sq_files = [image_path(square, i) for i in range(2)]
    norm = T.Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    sid_inputs = []
    for f in sq_files:
        u8 = torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1)
        x = (TF.to_tensor(TF.to_pil_image(u8).resize((256, 256), Image.LANCZOS)) * 255).byte()
        x = torch.nn.functional.interpolate(x[None].float() / 255.0, 224, mode="bicubic", align_corners=False)
        sid_inputs.append(norm(x[0]))
    got, _ = clip_score_files(sid_dit, sq_files, prompts[:2])
    assert got == pytest.approx(float(np.mean(cosines(sid_inputs, prompts[:2]))), abs=1e-5)


def test_gigagan_float_round_trip_and_sid_dit_byte_round_trip():
    """Over all 256 values: GigaGAN's ToTensor -> Normalize(0.5, 0.5) -> uint8((x + 1) * 127.5) takes 63
    values one step down in float32 (torchvision computes it here), SiD-DiT's to_tensor * 255 ->
    byte keeps every value."""
    import torchvision.transforms as T

    from sidscale.eval.images import byte_round_trip, gigagan_float_round_trip

    ramp = np.arange(256, dtype=np.uint8).repeat(3).reshape(16, 16, 3)
    x = T.Normalize([0.5] * 3, [0.5] * 3)(T.ToTensor()(Image.fromarray(ramp)))
    want = ((x + 1.0) * 127.5).clamp(0.0, 255.0).to(torch.uint8).permute(1, 2, 0).numpy()
    got = np.asarray(gigagan_float_round_trip(Image.fromarray(ramp)))
    np.testing.assert_array_equal(got, want)
    assert (got != ramp).any(axis=2).sum() == 63 and (ramp.astype(int) - got).max() == 1
    np.testing.assert_array_equal(byte_round_trip(ramp), ramp)


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

    acc = EventAccumulator(str(run_with_export / "tb"))  # --out is inside the run: its tb
    acc.Reload()
    [fid_event] = acc.Scalars("eval/sid_lsg_coco30k/n7/fid")
    assert fid_event.step == 3 and fid_event.value == pytest.approx(metrics["fid"], rel=1e-5)
    clip_tag = "eval/sid_lsg_coco30k/n7/clip_score_ViT-B-32"
    assert acc.Scalars(clip_tag)[0].value == pytest.approx(metrics["clip_score"], rel=1e-5)
    # the same numbers against images seen (= 1000 x kimg; the fake checkpoint's meta says 4 x step)
    assert metrics["images_seen"] == 12 and metrics["kimg"] == pytest.approx(0.012)
    [by_images] = acc.Scalars("eval_vs_images_seen/sid_lsg_coco30k/n7/fid")
    assert by_images.step == 12 and by_images.value == pytest.approx(metrics["fid"], rel=1e-5)
    assert acc.Scalars("eval_vs_images_seen/sid_lsg_coco30k/n7/clip_score_ViT-B-32")[0].step == 12
    p = metrics["protocol"]
    assert p["name"] == "sid_lsg_coco30k" and p["fid"]["fid_protocol_version"] == 2
    assert p["reference"]["ref_dir"] == str((work / "cli_ref").resolve())
    assert p["reference_set"].startswith("all 40,504")
    assert metrics["num_images"] == len(PROMPTS)  # the protocol's 30k, capped at the file's 7 (a warning)


def test_prompts_are_stripped_and_empty_lines_skipped_as_the_reference_reads_them(work):
    """SiD-LSG's / SiD-DiT's ``read_file_to_sentences``: ``line.strip()`` for each line of the file
    (text mode: \\n, \\r\\n and \\r end a line), empty ones skipped."""
    path = work / "prompts_ws.txt"
    raw = "  a red circle \n\n\tblue square\t\r\nline\u2028with separator \r\n   \nlast"
    path.write_bytes(raw.encode("utf-8"))
    with open(path, encoding="utf-8") as f:  # the reference's loop, verbatim in effect
        reference = [line.strip() for line in f if line.strip()]
    assert read_prompts(path) == reference == ["a red circle", "blue square", "line\u2028with separator", "last"]
    assert read_prompts(path, 2) == reference[:2]


def run_cli(*argv: str):
    from sidscale.eval.evaluate import build_parser, evaluate

    return evaluate(build_parser().parse_args(list(argv)))


@pytest.fixture(scope="module")
def cli_inputs(work) -> tuple[Path, Path]:
    prompts = work / "prompts_cli.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    ref_dir = work / "cli_ref_small"
    write_random_images(ref_dir, 6, seed=12)
    return prompts, ref_dir


def test_fid_eval_on_a_k4_export_with_dmd2_protocol(work, teacher_dir, run_with_export, inception_standin,
                                                    cli_inputs):
    """A K = 4 export: its images are FewStepPipeline's 4-step samples (not the 1-step ones of the
    same weights), converted as DMD2 does (``(x + 1) * 127.5``), and metrics.json records K and the
    protocol; DMD2's 512 px FID preprocessing."""
    from sidscale.export import export_generator
    from sidscale.sample import FewStepPipeline

    prompts, ref_dir = cli_inputs
    state, config = tiny_generator_state()
    k4 = export_generator(state, config, work / "k4" / "export", sampling_meta(teacher_dir, 5, generator_steps=4))
    out = work / "k4_eval"
    metrics = run_cli(*cli_args(k4, prompts, out, inception_standin, ref_dir, "--num", "3", "--protocol",
                                "dmd2_coco10k_512"))
    p = metrics["protocol"]
    assert (p["name"], p["steps"], p["family"], p["fid_size"], p["pixels"]) == (
        "dmd2_coco10k_512", 4, "unet_vp", 512, "uint8(clip(x*127.5+127.5, 0, 255))")
    assert p["fid"]["resize"] == "PIL-lanczos-512" and metrics["num_images"] == 3 and metrics["kimg"] == 0.02
    assert json.loads((out / "metrics.json").read_text())["protocol"]["name"] == "dmd2_coco10k_512"
    pipe = FewStepPipeline.from_export(k4)
    assert pipe.settings.generator_steps == 4
    want = protocol_pixels(pipe(PROMPTS[:3], [0, 1, 2]), 127.5).permute(0, 2, 3, 1).numpy()
    one_step = protocol_pixels(FewStepPipeline.from_export(run_with_export / "export")(PROMPTS[:3], [0, 1, 2]), 127.5)
    for i in range(3):
        with Image.open(image_path(out / "images", i)) as im:
            got = np.asarray(im)
        np.testing.assert_array_equal(got, want[i])
        assert not np.array_equal(got, one_step[i].permute(1, 2, 0).numpy())


@pytest.fixture(scope="module")
def sd3_export(work) -> tuple[Path, Path]:
    """A tiny SD3.5-shaped teacher and a K = 4 export of its transformer, with the sampling entry the
    trainer writes (``Trainer.sampling_meta``) for teacher.resolution = 64."""
    from diffusers import SD3Transformer2DModel

    from sidscale.core.schedule import FlowSchedule
    from sidscale.export import export_generator
    from sidscale.families.sd3.tiny import write_tiny_sd3_teacher

    teacher = write_tiny_sd3_teacher(work / "sd3_teacher", seed=0, sd35=True)
    net = SD3Transformer2DModel.from_pretrained(teacher / "transformer")
    sampling = {"family": "mmdit_flow", "generator_steps": 4, "t_init": 625, "sigma_init": 1.0,
                "prediction_type": "velocity", "schedule": FlowSchedule().meta(str(teacher / "scheduler")),
                "latent_shape": [16, 8, 8], "scaling_factor": 1.5305, "shift_factor": 0.0609,
                "teacher_path": str(teacher.resolve()), "teacher_kind": "sd3", "resolution": 64, "step": 8,
                "images_seen": 32, "t5": True, "max_sequence_length": 16, "time_scale": 1000.0}
    return teacher, export_generator(net.state_dict(), dict(net.config), work / "sd3_run" / "export", sampling)


def test_fid_eval_on_a_tiny_sd3_export_with_its_flow_teacher(work, sd3_export, inception_standin, cli_inputs):
    """fid_eval on an SD3-shaped K = 4 export, with SiD-DiT's protocol, and the teacher's own sampler:
    its images are diffusers' StableDiffusion3Pipeline's (same x_T, CFG 2.5, 2 steps), decoded."""
    from diffusers import StableDiffusion3Pipeline

    from sidscale.families import family_for_kind
    from sidscale.sample import FewStepPipeline, seeded_latent_noise

    teacher, export = sd3_export
    prompts, ref_dir = cli_inputs
    out = work / "sd3_eval"
    metrics = run_cli(*cli_args(export, prompts, out, inception_standin, ref_dir, "--num", "2", "--batch", "2",
                                "--protocol", "sid_dit_coco10k", "--teacher-steps", "2", "--teacher-cfg", "2.5"))
    p = metrics["protocol"]
    assert (p["name"], p["steps"], p["family"], p["teacher_kind"], p["fid_mode"]) == (
        "sid_dit_coco10k", 4, "mmdit_flow", "sd3", "legacy_tensorflow")
    assert metrics["image_size"] == [64, 64] and metrics["teacher"]["sampler"] == "flow euler"
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["teacher"]["fid"])
    want = to_uint8(FewStepPipeline.from_export(export)(PROMPTS[:2], [0, 1])).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        with Image.open(image_path(out / "images", i)) as im:
            np.testing.assert_array_equal(np.asarray(im), want[i])

    # the teacher's sampler against diffusers' own SD3 pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(teacher, local_files_only=True)
    x_T = seeded_latent_noise([0, 1], (16, 8, 8))
    with torch.no_grad():
        ref = pipe(prompt=PROMPTS[:2], negative_prompt=["", ""], latents=x_T.clone(), guidance_scale=2.5,
                   num_inference_steps=2, max_sequence_length=16, output_type="latent").images
        vae = pipe.vae
        images = to_uint8(family_for_kind("sd3").decode(vae, ref, vae.config.scaling_factor, vae.config.shift_factor))
    for i in range(2):  # fid_eval's teacher images = the pipeline's latents, decoded (1 level for float noise)
        with Image.open(image_path(out / "teacher_images", i)) as im:
            diff = np.abs(np.asarray(im).astype(int) - images[i].permute(1, 2, 0).numpy())
        assert diff.max() <= 1 and diff.mean() < 0.01
    # the comparison can fail: the same pipeline with 3 steps gives images several levels off
    with torch.no_grad():
        other = pipe(prompt=PROMPTS[:2], negative_prompt=["", ""], latents=x_T.clone(), guidance_scale=2.5,
                     num_inference_steps=3, max_sequence_length=16, output_type="latent").images
        other = to_uint8(family_for_kind("sd3").decode(vae, other, vae.config.scaling_factor, vae.config.shift_factor))
    assert (other.int() - images.int()).abs().max() > 3


def test_fp16_vae_decodes_upcast_as_sid_lsg_does():
    """An fp16 VAE with ``force_upcast`` decodes as SiD-LSG's ``sid_sd_sampler`` + ``upcast_vae``: fp32,
    except post_quant_conv, decoder.conv_in and the mid-block (SDPA attention), latents in fp16; the
    VAE is fp16 again afterwards. Both families' decode do it; without force_upcast, plain fp16."""
    import copy

    from sidscale.families import family_for_kind
    from sidscale.families.unet_vp.tiny import tiny_vae

    vae = tiny_vae(3).half().eval()
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(vae).float()
    for part in (ref.post_quant_conv, ref.decoder.conv_in, ref.decoder.mid_block):
        part.half()

    def decode_as_diffusers_0_27(latents: torch.Tensor) -> torch.Tensor:
        """AutoencoderKL._decode + Decoder.forward of diffusers 0.27.2 (SiD-LSG's environment),
        which casts the mid-block's output to the up-blocks' dtype."""
        d = ref.decoder
        x = d.mid_block(d.conv_in(ref.post_quant_conv(latents)), None)
        x = x.to(next(iter(d.up_blocks.parameters())).dtype)
        for up in d.up_blocks:
            x = up(x, None)
        return d.conv_out(d.conv_act(d.conv_norm_out(x))).float()

    with torch.no_grad():
        want_vp = decode_as_diffusers_0_27(z.half() / 0.18215)
        want_sd3 = decode_as_diffusers_0_27((z / 0.18215 + 0.1).half())
        plain = vae.decode(z.half() / 0.18215).sample.float()
    got_vp = family_for_kind("sd").decode(vae, z, 0.18215)
    got_sd3 = family_for_kind("sd3").decode(vae, z, 0.18215, 0.1)
    torch.testing.assert_close(got_vp, want_vp, rtol=0, atol=0)
    torch.testing.assert_close(got_sd3, want_sd3, rtol=0, atol=0)
    assert not torch.equal(got_vp, plain)  # the upcast changes the result
    assert all(v.dtype == torch.float16 and torch.equal(v, before[k]) for k, v in vae.state_dict().items())
    # force_upcast false (an fp16-safe VAE), and bf16 VAEs: decoded as they are
    safe = copy.deepcopy(vae)
    safe.register_to_config(force_upcast=False)
    with torch.no_grad():
        torch.testing.assert_close(family_for_kind("sd").decode(safe, z, 0.18215), plain, rtol=0, atol=0)
        bf = copy.deepcopy(vae).to(torch.bfloat16)
        want_bf = bf.decode(z.to(torch.bfloat16) / 0.18215).sample.float()
    torch.testing.assert_close(family_for_kind("sd").decode(bf, z, 0.18215), want_bf, rtol=0, atol=0)


def test_plot_draws_fid_and_clip_against_kimg(work):
    """--plot RUN: every RUN/eval/*/metrics.json of the chosen protocol, by kimg; points on a linear
    scale (equal steps in kimg and FID give equal pixel steps), the teacher as a dashed line."""
    from sidscale.eval.curves import LINE, TEACHER, collect_points, plot_curves
    from sidscale.eval.evaluate import main

    run = work / "plot_run"
    rows = [("step_00000300", 3.0, 10.0, 0.31), ("step_00000100", 1.0, 30.0, 0.29), ("step_00000200", 2.0, 20.0, 0.30),
            ("export", 3.0, 10.0, 0.31)]
    for name, kimg, fid, clip in rows:
        (run / "eval" / name).mkdir(parents=True)
        m = {"fid": fid, "clip_score": clip, "kimg": kimg, "step": int(kimg * 100),
             "protocol": {"name": "sid_lsg_coco30k"}, "teacher": {"fid": 15.0, "clip_score": 0.305}}
        (run / "eval" / name / "metrics.json").write_text(json.dumps(m))
    (run / "eval" / "other").mkdir()
    (run / "eval" / "other" / "metrics.json").write_text(json.dumps({"fid": 1.0, "kimg": 1.0, "protocol": {
        "name": "dmd2_coco10k_512"}}))
    (run / "eval" / "old").mkdir()
    (run / "eval" / "old" / "metrics.json").write_text(json.dumps({"fid": 1.0, "clip_score": None, "protocol": {}}))

    points, skipped = collect_points(run, "sid_lsg_coco30k")
    assert [p.kimg for p in points] == [1.0, 2.0, 3.0, 3.0] and len(skipped) == 2
    out = work / "curves.png"
    panels = plot_curves(points, out, "sid_lsg_coco30k")
    with Image.open(out) as im:
        png = np.asarray(im.convert("RGB"))
    for panel, values in zip(panels, ([30.0, 20.0, 10.0], [0.29, 0.30, 0.31]), strict=True):
        pts = panel.points[:3]
        assert [v for _, v, _, _ in pts] == pytest.approx(values)
        (_, _, px0, py0), (_, _, px1, py1), (_, _, px2, py2) = pts
        assert px0 < px1 < px2 and abs((px1 - px0) - (px2 - px1)) <= 1
        assert abs((py1 - py0) - (py2 - py1)) <= 1 and (py0 > py2) == (values[0] < values[2])
        for _, _, px, py in pts:
            assert tuple(png[py, px]) == LINE
        x0, _, x1, _ = panel.box
        _, ty = panel.to_pixel(panel.x_range[0], 15.0 if panel is panels[0] else 0.305)
        assert sum(tuple(png[ty, x]) == TEACHER for x in range(x0, x1)) > (x1 - x0) // 3  # dashed
    assert main(["--plot", str(run)]) == 0 and (run / "eval" / "curves.png").is_file()
    assert main(["--plot", str(run), "--protocol", "sid_dit_coco10k"]) == 2


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


def _scalar_tags(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_fid_eval_tensorboard_tags_by_protocol_and_n_and_kept_out_of_the_run_unless_out_is_in_it(
        work, run_with_export, inception_standin, cli_inputs):
    """Evaluations of one export with another N or protocol never share a tag (a curve would join
    incomparable numbers), and one whose --out lies outside the run writes to OUT/tb, not RUN/tb."""
    prompts, ref_dir = cli_inputs
    export, run_tb = run_with_export / "export", run_with_export / "tb"
    before = _scalar_tags(run_tb) if run_tb.is_dir() else {}

    outside = work / "elsewhere" / "export_n3"
    m = run_cli(*cli_args(export, prompts, outside, inception_standin, ref_dir, "--num", "3"))
    assert (_scalar_tags(run_tb) if run_tb.is_dir() else {}) == before  # the run's curves are untouched
    here = _scalar_tags(outside / "tb")
    assert here == {"eval/sid_lsg_coco30k/n3/fid": [(3, pytest.approx(m["fid"], rel=1e-6))],
                    "eval_vs_images_seen/sid_lsg_coco30k/n3/fid": [(12, pytest.approx(m["fid"], rel=1e-6))]}
    # the tags metrics.json names are the ones written (TensorBoard's reader does not keep the write order)
    assert m["tensorboard"]["dir"] == str((outside / "tb").resolve())
    assert sorted(m["tensorboard"]["tags"]) == sorted(here)

    for protocol, num in (("sid_lsg_coco30k", "5"), ("dmd2_coco10k_512", "5")):
        m = run_cli(*cli_args(export, prompts, run_with_export / "eval" / f"export_{protocol}_{num}", inception_standin,
                              ref_dir, "--num", num, "--protocol", protocol))
        assert _scalar_tags(run_tb)[f"eval/{protocol}/n{num}/fid"] == [(3, pytest.approx(m["fid"], rel=1e-6))]
    new = set(_scalar_tags(run_tb)) - set(before)
    assert new == {f"{axis}/{p}/n5/fid" for axis in ("eval", "eval_vs_images_seen")
                   for p in ("sid_lsg_coco30k", "dmd2_coco10k_512")}


def test_metrics_json_says_images_are_bit_reproducible_at_a_fixed_batch_only(work, run_with_export,
                                                                             inception_standin, cli_inputs):
    prompts, ref_dir = cli_inputs
    m = run_cli(*cli_args(run_with_export / "export", prompts, work / "repro_eval", inception_standin, ref_dir,
                          "--num", "2", "--batch", "2", "--no-tensorboard"))
    p = json.loads((work / "repro_eval" / "metrics.json").read_text())["protocol"]
    assert "bit-reproducible only at the same --batch" in p["reproducibility"]
    assert p["bit_reproducible_at"] == {"batch": 2, "device": "cpu", "dtype": "fp32", "torch": torch.__version__,
                                        "diffusers": __import__("diffusers").__version__}
    assert "tensorboard" not in m


def test_plot_ticks_are_readable_and_evaluations_of_different_n_are_never_joined(work):
    """The FID panel of values 0.2959..0.3031 had one y tick; points of N = 8 and N = 30000 were one
    line, and the title did not say N."""
    from sidscale.eval.curves import GRID, SERIES, EvalPoint, plot_curves

    small = [EvalPoint(f"s{k}", k, 100 * k, fid, 0.30, num_images=8)
             for k, fid in ((1.0, 0.2959), (2.0, 0.2965), (3.0, 0.2970))]
    large = [EvalPoint(f"l{k}", k, 100 * k, fid, 0.31, num_images=30000) for k, fid in ((1.5, 0.3031), (2.5, 0.3025))]
    out = work / "curves_n.png"
    fid_panel, _ = plot_curves(sorted(small + large, key=lambda p: p.kimg), out, "sid_lsg_coco30k")
    with Image.open(out) as im:
        png = np.asarray(im.convert("RGB"))

    lo, hi = fid_panel.y_range
    assert lo <= 0.2959 and hi >= 0.3031
    values = [v for v, _ in fid_panel.y_ticks]
    labels = [label for _, label in fid_panel.y_ticks]
    assert len(values) >= 3 and all(lo <= v <= hi for v in values) and len(set(labels)) == len(labels)
    step = values[1] - values[0]
    for v, label in fid_panel.y_ticks:
        assert float(label) == pytest.approx(v, abs=step / 10)
        _, py = fid_panel.to_pixel(lo, v)
        assert any(tuple(png[py, x]) == GRID for x in range(fid_panel.box[0], fid_panel.box[2]))
    assert len(fid_panel.x_ticks) >= 3

    assert set(fid_panel.series) == {8, 30000} and "N = " not in fid_panel.title
    def colours_near(x: int, y: int) -> set[tuple[int, ...]]:  # the 3x3 pixels around (x, y)
        return {tuple(int(c) for c in png[y + dy, x + dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}

    (_, _, ax, ay), (_, _, bx, by) = fid_panel.series[8][:2]
    assert SERIES[0] in colours_near((ax + bx) // 2, (ay + by) // 2)  # one N: joined
    (_, _, cx, cy) = fid_panel.series[30000][0]
    assert not colours_near((ax + cx) // 2, (ay + cy) // 2) & set(SERIES)  # kimg neighbours, different N: not joined

    only, _ = plot_curves(small, work / "curves_8.png", "sid_lsg_coco30k")
    assert only.title == "FID (sid_lsg_coco30k), N = 8"

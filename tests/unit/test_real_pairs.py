"""Real-pair stream (method.adversarial): what the tools write is what the stream yields (checked against
decodes written here), exact resume, bad samples skipped and counted, elastic merge, the toy mixture's
exact samples, and the VAE encode against diffusers' own latent distribution."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from sidscale.checkpointing.elastic import replayed_samples
from sidscale.checkpointing.states import RealDataState
from sidscale.data.real_pairs import RealPairFormat, RealPairSource
from sidscale.data.real_shards import npy_bytes
from sidscale.data.shard_reading import _Counters
from sidscale.data.shards import tar_bytes
from sidscale.data.stream import DataWarning
from sidscale.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHAPE = (3, 4, 4)
SIZE = 16


def _tool(name: str):
    # tools/ is not a package: load the script by path
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def source(shards: str | Path, **kw) -> RealPairSource:
    args = dict(rank=0, world_size=1, batch_size=4, seed=3, num_workers=0, shuffle_buffer=0, resampled=False,
                latent_shape=SHAPE, image_size=SIZE)
    args.update(kw)
    return RealPairSource(str(shards), **args)


def epoch0(src: RealPairSource) -> dict[str, tuple[torch.Tensor, str]]:
    """key -> (x, caption) of every sample of epoch 0 (epoch mode: each sample once)."""
    out: dict[str, tuple[torch.Tensor, str]] = {}
    while src.stats()["epochs"] < 1:
        b = next(src.stream)
        for key, x, c, e in zip(b["keys"], b["x"], b["captions"], b["epoch"], strict=True):
            if e == 0:
                assert key not in out
                out[key] = (x, c)
    src.close()
    return out


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def independent_image(data: bytes, size: int) -> np.ndarray:
    """RGB, shorter side -> size (bicubic), center crop, [-1, 1], CHW: written here, not imported."""
    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    if min(w, h) != size:
        if w <= h:
            im = im.resize((size, max(size, round(h * size / w))), Image.BICUBIC)
        else:
            im = im.resize((max(size, round(w * size / h)), size), Image.BICUBIC)
    w, h = im.size
    x0, y0 = (w - size) // 2, (h - size) // 2
    a = np.array(im, dtype=np.float64)[y0:y0 + size, x0:x0 + size]
    return ((a / 127.5) - 1.0).astype(np.float32).transpose(2, 0, 1)


def _image_bytes(rng: np.random.Generator, w: int, h: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Images of several sizes and formats with captions beside them (and two that must be dropped)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    sizes = [(16, 16), (24, 16), (16, 40), (33, 20), (20, 20), (64, 17)]
    for i, (w, h) in enumerate(sizes * 2):
        fmt, ext = [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")][i % 3]
        (d / f"img{i:02d}.{ext}").write_bytes(_image_bytes(rng, w, h, fmt))
        (d / f"img{i:02d}.txt").write_text(f"  caption {i}\n")
    (d / "nocap.png").write_bytes(_image_bytes(rng, 16, 16, "PNG"))
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "broken.txt").write_text("a broken image")
    return d


def test_image_shards_from_the_tool_equal_an_independent_decode(tmp_path, image_folder):
    out = tmp_path / "real"
    assert _tool("make_real_shards").main([str(image_folder), "--out", str(out), "--shard-size", "3"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "image" and manifest["total"] == 12
    assert manifest["dropped"] == {"missing_caption": 1, "undecodable_image": 1}
    expected = {}
    for shard in manifest["shards"]:
        members = tar_members(out / shard["path"])
        for name, data in members.items():
            key, ext = name.split(".", 1)
            if ext != "txt":
                expected[f"{shard['path']}/{key}"] = (independent_image(data, SIZE),
                                                      members[f"{key}.txt"].decode())
    src = source(out / "manifest.json")
    assert src.kind == "image"
    got = epoch0(src)
    assert got.keys() == expected.keys()
    for key, (x, caption) in got.items():
        assert x.dtype == torch.float32 and x.shape == (3, SIZE, SIZE)
        np.testing.assert_allclose(x.numpy(), expected[key][0], rtol=0, atol=1e-6, err_msg=key)
        assert caption == expected[key][1].strip()
    assert sorted(c for _, c in got.values()) == sorted(f"caption {i}" for i in range(12))


# ----------------------------------------------------------------------------------------------
# A latent shard set with bad samples in it


def _latent(i: int, dtype=np.float32) -> np.ndarray:
    return (np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE) / 7 + i).astype(dtype)


def _write_latent_set(d: Path, n_shards: int = 8, per_shard: int = 10) -> list[str]:
    """fp16 and fp32 latents + captions; shard 0 also holds one bad sample of each kind. Returns the good
    captions."""
    d.mkdir(parents=True, exist_ok=True)
    good = []
    for s in range(n_shards):
        members = []
        for j in range(per_shard):
            i = s * per_shard + j
            members += [(f"{i:05d}.latent.npy", npy_bytes(_latent(i, np.float16 if i % 2 else np.float32))),
                        (f"{i:05d}.txt", f"latent {i}".encode())]
            good.append(f"latent {i}")
        if s == 0:
            members += _bad_latent_members()
        (d / f"r-{s}.tar").write_bytes(tar_bytes(members))
    return good


BAD_COUNTS = {"skipped_latent_dtype": 1, "skipped_latent_shape": 1, "skipped_nonfinite": 2, "skipped_bad_latent": 1,
              "skipped_missing_text": 1, "skipped_empty": 1, "skipped_undecodable": 1, "skipped_wrong_kind": 1,
              "skipped_missing_data": 1}


def _bad_latent_members() -> list[tuple[str, bytes]]:
    nan, inf = _latent(0), _latent(0, np.float16)
    nan[1, 2, 3], inf[0, 0, 0] = np.nan, np.inf
    png = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE)).save(png, format="PNG")
    return [("b64.latent.npy", npy_bytes(_latent(0, np.float64))), ("b64.txt", b"fp64"),
            ("bshape.latent.npy", npy_bytes(np.zeros((3, 4, 5), np.float32))), ("bshape.txt", b"shape"),
            ("bnan.latent.npy", npy_bytes(nan)), ("bnan.txt", b"nan"),
            ("binf.latent.npy", npy_bytes(inf)), ("binf.txt", b"inf"),
            ("bjunk.latent.npy", b"\x93NUMPY garbage"), ("bjunk.txt", b"junk"),
            ("bnotext.latent.npy", npy_bytes(_latent(0))),
            ("bempty.latent.npy", npy_bytes(_latent(0))), ("bempty.txt", b" \n"),
            ("butf.latent.npy", npy_bytes(_latent(0))), ("butf.txt", b"caf\xe9 \xff"),
            ("bimage.png", png.getvalue()), ("bimage.txt", b"an image among latents"),
            ("bnodata.json", b"{}"), ("bnodata.txt", b"no data")]


def test_each_bad_sample_is_skipped_and_counted_once(tmp_path):
    d = tmp_path / "lat"
    good = _write_latent_set(d, n_shards=2)
    # + a truncated copy of shard 1 (cut inside its 4th sample's data) and a file that is no tar
    (d / "r-2.tar").write_bytes((d / "r-1.tar").read_bytes()[:6 * 1024 + 700])
    (d / "r-3.tar").write_bytes(b"not a tar at all" * 64)
    fmt = RealPairFormat("latent", SHAPE, SIZE)
    counters = _Counters({}, fmt.counters)
    captions = []
    with pytest.warns(DataWarning):
        for s in range(4):
            for _key, payload in fmt.read(str(d / f"r-{s}.tar"), counters):
                sample = fmt.decode(payload, counters)
                if sample is not None:
                    captions.append(sample[1])
    # every complete sample before the cut survives: 3 (2 members of 2 blocks each = 4 KiB per sample)
    assert captions == good + good[10:13]
    want = dict.fromkeys(fmt.counters, 0)
    want.update(BAD_COUNTS, shards_opened=4, skipped_corrupt_shards=2)
    assert counters.values == want
    # the same through the stream (>=: it reads ahead into epoch 1)
    src = source(str(d / "r-{0..3}.tar"), shuffle_buffer=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        got = epoch0(src)
    assert Counter(c for _, c in got.values()) == Counter(good + good[10:13])
    stats = src.stats()
    for k, v in BAD_COUNTS.items():
        assert stats[k] >= v, k


def test_bad_images_are_skipped_and_counted(tmp_path):
    png = io.BytesIO()
    Image.new("RGB", (20, 18), (10, 200, 30)).save(png, format="PNG")
    truncated = png.getvalue()[:60]
    members = [("a.png", png.getvalue()), ("a.txt", b"green"), ("b.jpg", b"\xff\xd8 no jpeg"), ("b.txt", b"bad"),
               ("c.png", truncated), ("c.txt", b"cut"), ("d.latent.npy", npy_bytes(_latent(0))), ("d.txt", b"latent")]
    (tmp_path / "i-0.tar").write_bytes(tar_bytes(members))
    fmt = RealPairFormat("image", SHAPE, SIZE)
    counters = _Counters({}, fmt.counters)
    with pytest.warns(DataWarning, match="wrong_kind=1"):
        kept = [fmt.decode(p, counters) for _, p in fmt.read(str(tmp_path / "i-0.tar"), counters)]
    assert [k[1] for k in kept if k is not None] == ["green"]
    assert counters.values["skipped_bad_image"] == 2 and counters.values["skipped_wrong_kind"] == 1
    src = source(tmp_path / "i-0.tar", batch_size=1)
    b = src.batch(0, 0, [0])
    src.close()
    assert b.kind == "image" and b.captions == ["green"]
    np.testing.assert_allclose(b.x[0].numpy(), independent_image(png.getvalue(), SIZE), atol=1e-6)


def test_no_usable_pair_is_a_config_error_naming_the_key(tmp_path):
    (tmp_path / "junk-0.tar").write_bytes(b"\x00junk" * 100)
    (tmp_path / "shape-0.tar").write_bytes(tar_bytes([("a.latent.npy", npy_bytes(np.zeros((4, 4, 4), np.float32))),
                                                      ("a.txt", b"wrong latent shape")]))
    with pytest.raises(ConfigError, match=r"data\.real_shards=.*junk-0\.tar.*skipped_corrupt_shards=1"):
        source(tmp_path / "junk-0.tar")
    with pytest.raises(ConfigError, match=r"data\.real_shards=.*skipped_latent_shape=1"):
        source(tmp_path / "shape-0.tar")
    with pytest.raises(ConfigError, match=re.escape("data.real_shards=") + ".*matches no shard files"):
        source(tmp_path / "none-{0..3}.tar")
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "manifest.json").write_text(json.dumps({"format": "sidscale-prompt-shards/1",
                                                                   "shards": [{"path": "p.tar"}]}))
    with pytest.raises(ConfigError, match="not a usable real-pair shard manifest"):
        source(tmp_path / "prompts")


# ----------------------------------------------------------------------------------------------
# Resume and elastic merge


@pytest.mark.parametrize("num_workers", [1, 2])
def test_resume_from_state_dict_gives_the_uninterrupted_sequence(tmp_path, num_workers):
    d = tmp_path / "lat"
    _write_latent_set(d)
    kw = dict(rank=1, world_size=2, batch_size=3, seed=7, num_workers=num_workers, shuffle_buffer=6)
    pattern = str(d / "r-{0..7}.tar")
    n = 20  # rank 1 reads 40 samples per epoch: the cuts fall mid-epoch, and after an epoch boundary
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        ref_src = source(pattern, **kw)
        ref = [ref_src.batch(i, 0, range(3)) for i in range(n)]
        ref_src.close()
        for cut in (5, 16):
            first = source(pattern, **kw)
            head = [first.batch(i, 0, range(3)) for i in range(cut)]
            state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
            first.close()
            resumed = source(pattern, **kw)
            resumed.load_state_dict(state)
            tail = [resumed.batch(i, 0, range(3)) for i in range(cut, n)]
            resumed.close()
            for a, b in zip(head + tail, ref, strict=True):
                assert a.captions == b.captions and torch.equal(a.x, b.x), f"cut={cut}"
            assert resumed.stats() == ref_src.stats(), f"cut={cut}"
    assert ref_src.stats()["epochs"] >= 1


def test_elastic_merge_two_writers_to_one_reader_replays_only_the_restart_epoch(tmp_path):
    """2 writer ranks (both past epoch 0; rank 0 further into epoch 1) -> 1 reader: it restarts at epoch 1,
    reads no sample of epoch 0 again, reads epoch 1 whole and once; the samples read twice are exactly the
    old ranks' part of epoch 1 (``elastic.replayed_samples``, the documented bound)."""
    d = tmp_path / "lat"
    good = _write_latent_set(d)  # 80 samples: 40 per old rank and epoch, 20 per worker
    pattern = str(d / "r-{0..7}.tar")
    kw = dict(batch_size=5, seed=1, num_workers=2, shuffle_buffer=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        olds = [source(pattern, rank=r, world_size=2, **kw) for r in range(2)]
        consumed: list[tuple[str, int]] = []
        for s, n in ((olds[0], 12), (olds[1], 10)):  # 60 and 50 samples: every worker is in epoch 1
            for _ in range(n):
                b = next(s.stream)
                consumed += zip(b["captions"], b["epoch"], strict=True)
            s.close()
        states = [{"real_data": s.state_dict()} for s in olds]
        new = source(pattern, rank=0, world_size=1, **kw)
        with pytest.warns(DataWarning, match="start of epoch 1"):
            RealDataState(new).load_resharded(states, {}, tmp_path, rank=0, is_main=True)
        assert new.stats()["samples"] == len(consumed) == 110
        read: list[tuple[str, int]] = []
        while new.stats()["epochs"] < 2:
            b = next(new.stream)
            read += zip(b["captions"], b["epoch"], strict=True)
        new.close()
    assert Counter(e for _, e in consumed) == {0: 80, 1: 30}
    assert min(e for _, e in read) == 1  # nothing of the finished epoch 0 again
    assert Counter(c for c, e in read if e == 1) == Counter(good)  # epoch 1 whole, once, under the new split
    old_epoch1 = [c for c, e in consumed if e == 1]
    assert replayed_samples([s["real_data"] for s in states], samples_per_epoch=len(good)) == len(old_epoch1) == 30


def test_real_data_state_key_and_a_checkpoint_without_it(tmp_path):
    d = tmp_path / "lat"
    _write_latent_set(d, n_shards=2)
    src = source(str(d / "r-{0..1}.tar"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        first = [src.batch(i, 0, range(4)).captions for i in range(3)]
    saved = RealDataState(src).save()
    assert set(saved) == {"real_data"} and saved["real_data"]["batches"] == 3
    fresh = source(str(d / "r-{0..1}.tar"))
    with pytest.warns(DataWarning, match="no real-pair cursor"):
        RealDataState(fresh).load({"data": {}}, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        assert fresh.batch(0, 0, range(4)).captions == first[0]


# ----------------------------------------------------------------------------------------------
# Toy real shards, the build function


def _cfg(real_shards: str, kind: str = "toy", enabled: bool = True, seed: int = 5) -> SimpleNamespace:
    return SimpleNamespace(method=SimpleNamespace(adversarial=SimpleNamespace(enabled=enabled)),
                           data=SimpleNamespace(real_shards=real_shards, num_workers=0, shuffle_buffer=0,
                                                resampled=False),
                           teacher=SimpleNamespace(kind=kind, is_toy=kind in ("toy", "toy_flow"), resolution=16),
                           train=SimpleNamespace(seed=seed, micro_batch=8))


def test_toy_real_shards_are_the_mixtures_exact_samples(tmp_path):
    from sidscale.data.sources import build_real_source
    from sidscale.families.toy.mixture import ToyMixture

    teacher = SimpleNamespace(path=tmp_path / "no-teacher", latent_shape=(3, 16, 16))
    assert build_real_source(_cfg("", enabled=False), tmp_path, teacher, 0, 1, True) is None
    with pytest.raises(ConfigError, match="toy teachers only"):
        build_real_source(_cfg("toy", kind="sd3"), tmp_path, teacher, 0, 1, True)
    src = build_real_source(_cfg("toy"), tmp_path / "run", teacher, 0, 1, True)
    assert src.kind == "latent"
    got = epoch0(src)
    mixture = ToyMixture()  # (the default mixture: the toy teachers are fitted on it)
    prompts = [mixture.prompts[i % 24] for i in range(4096)]
    want = mixture.sample(prompts, torch.Generator().manual_seed(5))  # the mixture's own sampler, seed = train.seed
    assert len(got) == 4096
    for key, (x, caption) in got.items():
        i = int(key.rsplit("/", 1)[1])
        assert caption == prompts[i] and torch.equal(x, want[i]), key
    # the tool: its tars hold the same exact samples (read here with tarfile + numpy)
    out = tmp_path / "tool"
    args = ["--kind", "toy_flow", "--count", "100", "--seed", "5", "--shard-size", "30", "--out", str(out)]
    assert _tool("make_toy_real_shards").main(args) == 0
    want = mixture.sample(prompts[:100], torch.Generator().manual_seed(5))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["count"] for s in manifest["shards"]] == [30, 30, 30, 10]
    for shard in manifest["shards"]:
        for name, data in tar_members(out / shard["path"]).items():
            i = int(name.split(".")[0])
            if name.endswith(".txt"):
                assert data.decode() == prompts[i]
            else:
                arr = np.load(io.BytesIO(data))
                assert arr.dtype == np.float32 and np.array_equal(arr, want[i].numpy()), name


# ----------------------------------------------------------------------------------------------
# Image -> latent with a VAE


def _tiny_vae(shift: float | None):
    from diffusers import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                             block_out_channels=[8, 16], norm_num_groups=4, down_block_types=["DownEncoderBlock2D"] * 2,
                             up_block_types=["UpDecoderBlock2D"] * 2, sample_size=SIZE, scaling_factor=0.7,
                             shift_factor=shift).eval()


@pytest.mark.parametrize("shift", [None, 0.25])  # SD-style (no shift), SD3/FLUX-style
def test_encode_images_matches_diffusers_latent_dist(shift):
    from sidscale.families.base import Teacher
    from sidscale.families.shared.vae_encode import encode_images

    vae = _tiny_vae(shift)
    pixels = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(9))
    want = (dist.mean + dist.std * eps - (shift or 0.0)) * 0.7
    got = encode_images(vae, pixels, torch.Generator().manual_seed(9), 0.7, shift or 0.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    teacher = Teacher(Path("."), "sd", torch.nn.Identity(), None, None, (4, SIZE // 2, SIZE // 2), 0.7, vae,
                      shift or 0.0)
    torch.testing.assert_close(teacher.encode_images(pixels, torch.Generator().manual_seed(9)), want, rtol=0,
                               atol=1e-6)
    toy = Teacher(Path("."), "toy", torch.nn.Identity(), None, None, (3, SIZE, SIZE), 1.0, None)
    assert torch.equal(toy.encode_images(pixels), pixels)
    with pytest.raises(ValueError, match="teacher.resolution"):
        teacher.encode_images(pixels[:, :, :8, :8])


def test_make_real_shards_with_a_teacher_writes_its_seeded_vae_latents(tmp_path, image_folder):
    vae = _tiny_vae(0.25)
    vae.save_pretrained(tmp_path / "teacher" / "vae")
    out = tmp_path / "latents"
    args = [str(image_folder), "--out", str(out), "--teacher", str(tmp_path / "teacher"), "--kind", "sd3",
            "--resolution", str(SIZE), "--seed", "4", "--batch-size", "64", "--latent-dtype", "fp32"]
    assert _tool("make_real_shards").main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "latent" and manifest["settings"]["latent_shape"] == [4, 8, 8]
    # independently: the images in the tool's order (sorted paths), decoded here, one diffusers encode
    images = sorted(p for p in image_folder.iterdir() if p.name.startswith("img") and p.suffix != ".txt")
    pixels = torch.from_numpy(np.stack([independent_image(p.read_bytes(), SIZE) for p in images]))
    with torch.no_grad():
        dist = vae.encode(pixels).latent_dist
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(4))
    want = (dist.mean + dist.std * eps - 0.25) * 0.7
    src = source(out, latent_shape=(4, 8, 8))
    got = epoch0(src)
    assert len(got) == len(images)
    for key, (x, caption) in got.items():
        j = [p.stem for p in images].index(f"img{int(caption.split()[1]):02d}")
        assert int(key.rsplit("/", 1)[1]) == j  # written in input order
        torch.testing.assert_close(x, want[j], rtol=0, atol=1e-5)


def test_make_real_shards_reads_jsonl_and_tsv_captions(tmp_path, image_folder):
    (tmp_path / "imgs").mkdir()
    for name in ("img00.png", "img01.jpg", "img02.webp"):
        (tmp_path / "imgs" / name).write_bytes((image_folder / name).read_bytes())
    lines = [json.dumps({"image": "imgs/img01.jpg", "caption": "one"}), "{not json",
             json.dumps({"image": "imgs/missing.png", "caption": "gone"}), "",
             json.dumps({"image": "imgs/img00.png", "caption": "  zero "}),
             json.dumps({"image": "imgs/img02.webp", "caption": ""})]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "caps.tsv").write_text("path\ttext\nimgs/img02.webp\ttwo\nimgs/img00.png\tzero\n")
    tool = _tool("make_real_shards")
    assert tool.main([str(tmp_path / "caps.jsonl"), "--out", str(tmp_path / "a")]) == 0
    assert tool.main([str(tmp_path / "caps.tsv"), "--out", str(tmp_path / "b"), "--image-column", "path",
                      "--caption-column", "text"]) == 0
    for out, want in (("a", [("img01.jpg", "one"), ("img00.png", "zero")]),
                      ("b", [("img02.webp", "two"), ("img00.png", "zero")])):
        manifest = json.loads((tmp_path / out / "manifest.json").read_text())
        members = tar_members(tmp_path / out / manifest["shards"][0]["path"])
        got = [(members[f"{i:09d}.txt"].decode(), members[f"{i:09d}.{name.split('.')[1]}"])
               for i, (name, _) in enumerate(want)]
        assert got == [(c, (tmp_path / "imgs" / name).read_bytes()) for name, c in want]
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["dropped"] == \
        {"malformed": 1, "missing_image": 1, "empty_caption": 1}


@pytest.mark.parametrize("preset", ["tiny", "sd3_tiny", "flux_tiny"])
def test_each_familys_vae_encodes_into_its_teacher_latent_layout(preset):
    """SD (no shift), SD3 and FLUX (shifted; FLUX's latent kept unpacked, its network packs it 2x2): the
    encode of an image at the teacher's resolution has exactly the shape the teacher denoises."""
    from diffusers import AutoencoderKL

    from sidscale.families.base import Teacher
    from sidscale.families.presets import latent_shape, preset_vae_config

    cfg = preset_vae_config(preset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae = AutoencoderKL(**cfg).eval()
    shape = latent_shape(preset)
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    teacher = Teacher(Path("."), preset, torch.nn.Identity(), None, None, shape, cfg["scaling_factor"], vae,
                      cfg.get("shift_factor") or 0.0)
    pixels = torch.rand(1, 3, shape[1] * factor, shape[2] * factor, generator=torch.Generator().manual_seed(2)) * 2 - 1
    z = teacher.encode_images(pixels, torch.Generator().manual_seed(3))
    assert z.shape == (1, *shape) and z.dtype == torch.float32
    if preset == "flux_tiny":
        from sidscale.families.flux.adapter import pack_latents
        from sidscale.families.flux.presets import flux_preset

        assert pack_latents(z).shape[-1] == flux_preset(preset).transformer["in_channels"]

"""SD3 text side: SD3Tokenize / SD3Conditioner / load_sd3_conditioner against diffusers'
StableDiffusion3Pipeline.encode_prompt, and the tiny SD3 teacher directory as a real diffusers dir."""

import json
import pickle

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from sidscale.errors import TeacherDirError
from sidscale.families.sd3.conditioning import (
    SD3_REQUIRED_FOLDERS,
    SD3Conditioner,
    load_sd3_conditioner,
)
from sidscale.families.sd3.tiny import (
    CLIP_G_WIDTH,
    CLIP_L_WIDTH,
    INFO_FILE,
    T5_WIDTH,
    build_tiny_sd3_pipeline,
    write_tiny_sd3_teacher,
)
from sidscale.families.shared.tokenizers import build_tiny_t5_tokenizer

L = 16  # T5 tokens (max_sequence_length); SiD-DiT uses 77, 16 keeps the test small
CLIP = 77
# the last prompt is longer than both 77 CLIP tokens and L T5 tokens: truncation on every part
PROMPTS = ["a red circle", "photo of a dog zebra", " ".join(["red circle"] * 50)]


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return write_tiny_sd3_teacher(tmp_path_factory.mktemp("sd3") / "tiny", seed=0, sd35=True, t5=True)


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    p = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def conds(sd3_dir):
    """t5 -> the fp32 conditioner loaded from the tiny dir (each loaded once per module)."""
    cache = {}

    def get(t5: bool) -> SD3Conditioner:
        if t5 not in cache:
            cache[t5] = load_sd3_conditioner(sd3_dir, torch.float32, "cpu", t5=t5, max_sequence_length=L)
        return cache[t5]

    return get


def without_t5(pipe):
    """The same pipeline with T5 off, as diffusers allows (text_encoder_3=None, tokenizer_3=None)."""
    return StableDiffusion3Pipeline(**{**pipe.components, "text_encoder_3": None, "tokenizer_3": None})


def encode_prompt(pipe, prompts):
    with torch.no_grad():
        return pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=True, max_sequence_length=L)


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_encode_equals_pipeline_encode_prompt(pipe, conds, t5):
    cond = conds(t5)
    ref = pipe if t5 else without_t5(pipe)
    pe, npe, pp, npp = encode_prompt(ref, PROMPTS)
    got = cond.encode(PROMPTS)
    assert set(got) == {"encoder_hidden_states", "pooled_projections"}
    assert torch.equal(got["encoder_hidden_states"], pe)
    assert torch.equal(got["pooled_projections"], pp)
    # the unconditional branch is E(""), encoded like a prompt, as the pipeline's absent negative prompt
    uncond = cond.encode([""] * len(PROMPTS))
    assert torch.equal(uncond["encoder_hidden_states"], npe) and torch.equal(uncond["pooled_projections"], npp)
    # empty(B): E("") at batch 1, expanded: bit-exact against the pipeline at batch 1 ...
    _, npe1, _, npp1 = encode_prompt(ref, ["a"])
    e1 = cond.empty(1)
    assert torch.equal(e1["encoder_hidden_states"], npe1) and torch.equal(e1["pooled_projections"], npp1)
    # ... and at batch 3 equal up to the kernels' batch-size rounding (see SD3Conditioner.empty)
    e3 = cond.empty(3)
    assert e3["encoder_hidden_states"].shape == npe.shape and e3["pooled_projections"].shape == npp.shape
    torch.testing.assert_close(e3["encoder_hidden_states"], npe, rtol=0, atol=1e-6)
    torch.testing.assert_close(e3["pooled_projections"], npp, rtol=0, atol=1e-6)

    # layout: rows [CLIP-L | CLIP-G | zero pad] x 77, then T5 x L; pooled = [CLIP-L | CLIP-G]
    h, pooled = got["encoder_hidden_states"], got["pooled_projections"]
    assert h.shape == (len(PROMPTS), CLIP + L, T5_WIDTH) and h.dtype == torch.float32
    assert pooled.shape == (len(PROMPTS), CLIP_L_WIDTH + CLIP_G_WIDTH)
    clip_width = CLIP_L_WIDTH + CLIP_G_WIDTH
    assert (h[:, :CLIP, clip_width:] == 0).all() and (h[:, :CLIP, :clip_width] != 0).all()
    assert (h[:, CLIP:] != 0).any(dim=-1).all() if t5 else (h[:, CLIP:] == 0).all()


def test_tokenize_layout_and_encode_ids(pipe, conds):
    cond, cond_off = conds(True), conds(False)
    ids = cond.tokenize(PROMPTS)
    assert ids.dtype == torch.long and ids.shape == (len(PROMPTS), 2 * CLIP + L) and cond.tokenize.width == 2 * CLIP + L

    def pipe_ids(tok, length, **kw):  # the pipeline's own tokenizer objects and settings
        return tok(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt",
                   **kw).input_ids

    assert torch.equal(ids[:, :CLIP], pipe_ids(pipe.tokenizer, CLIP))
    assert torch.equal(ids[:, CLIP:2 * CLIP], pipe_ids(pipe.tokenizer_2, CLIP))
    assert torch.equal(ids[:, 2 * CLIP:], pipe_ids(pipe.tokenizer_3, L, add_special_tokens=True))
    # CLIP-L pads with <|endoftext|>, CLIP-G with "!" (id 0): the two blocks really are different tokenizers
    assert ids[0, CLIP - 1] == 49407 and ids[0, 2 * CLIP - 1] == 0
    # T5: "a red circle" -> ▁a ▁red ▁circle </s> <pad>... (the tiny vocab's ids); the long prompt ends in </s>
    assert ids[0, 2 * CLIP:2 * CLIP + 5].tolist() == [3, 4, 6, 1, 0] and ids[2, -1] == 1
    assert torch.equal(ids[2, CLIP - 1:CLIP + 1], torch.tensor([49407, 49406]))  # truncated CLIP-L: eos | bos

    ids_off = cond_off.tokenize(PROMPTS)  # T5 off: same width, T5 columns zero
    assert ids_off.shape == ids.shape and torch.equal(ids_off[:, :2 * CLIP], ids[:, :2 * CLIP])
    assert (ids_off[:, 2 * CLIP:] == 0).all()

    for c, i in ((cond, ids), (cond_off, ids_off)):
        a, b = c.encode_ids(i), c.encode(PROMPTS)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match=rf"\[B, {2 * CLIP + L}\]"):
        cond.encode_ids(ids[:, :-1])


def test_tokenize_pickles_without_encoders(conds):
    cond = conds(True)
    data = pickle.dumps(cond.tokenize)
    # a pickled tensor is rebuilt by torch._utils._rebuild_tensor*: the marker shows weights ...
    assert b"_rebuild_tensor" in pickle.dumps(cond.text_encoder_3)
    # ... and the tokenize callable has none: it is its three tokenizers and a few ints, nothing else
    assert b"_rebuild_tensor" not in data
    tokenizers = (cond.tokenizer, cond.tokenizer_2, cond.tokenizer_3)
    assert len(data) < sum(len(pickle.dumps(t)) for t in tokenizers) + 10_000
    assert torch.equal(pickle.loads(data)(PROMPTS), cond.tokenize(PROMPTS))


def test_no_grad_frozen_and_dtype(sd3_dir, conds):
    cond = conds(True)
    encoders = (cond.text_encoder, cond.text_encoder_2, cond.text_encoder_3)
    assert all(not e.training and not any(p.requires_grad for p in e.parameters()) for e in encoders)
    with torch.enable_grad():
        out = cond.encode(PROMPTS[:1])
    assert not out["encoder_hidden_states"].requires_grad
    bf16 = load_sd3_conditioner(sd3_dir, torch.bfloat16, "cpu", t5=True, max_sequence_length=L)
    low = bf16.encode(PROMPTS[:1])
    assert all(v.dtype == torch.bfloat16 for v in low.values())
    assert next(bf16.text_encoder_3.parameters()).dtype == torch.bfloat16
    for k in out:  # same numbers up to bf16 rounding through the encoders
        torch.testing.assert_close(low[k].float(), out[k], rtol=0.1, atol=0.1)


def test_load_errors(sd3_dir, tmp_path):
    def linked_copy(name, skip=()):
        d = tmp_path / name
        d.mkdir()
        for entry in sd3_dir.iterdir():
            if entry.name not in skip:
                (d / entry.name).symlink_to(entry)
        return d

    no_te2 = linked_copy("no_te2", skip=("text_encoder_2",))
    with pytest.raises(TeacherDirError, match=r"missing text_encoder_2/.*must contain"):
        load_sd3_conditioner(no_te2, torch.float32, "cpu")
    with pytest.raises(TeacherDirError, match="not a directory"):
        load_sd3_conditioner(tmp_path / "nowhere", torch.float32, "cpu")
    with pytest.raises(ValueError, match="max_sequence_length = 513"):
        load_sd3_conditioner(sd3_dir, torch.float32, "cpu", max_sequence_length=513)

    no_joint = linked_copy("no_joint", skip=("transformer",))
    cfg = json.loads((sd3_dir / "transformer" / "config.json").read_text())
    del cfg["joint_attention_dim"]
    (no_joint / "transformer").mkdir()
    (no_joint / "transformer" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherDirError, match=r"transformer/config.json: joint_attention_dim = None"):
        load_sd3_conditioner(no_joint, torch.float32, "cpu")

    assert SD3_REQUIRED_FOLDERS(True) == SD3_REQUIRED_FOLDERS(False) + ("text_encoder_3", "tokenizer_3")
    assert {"transformer", "scheduler", "vae", "tokenizer_2", "text_encoder_2"} <= set(SD3_REQUIRED_FOLDERS(False))


def test_tiny_dir_round_trip_and_one_step(sd3_dir, pipe):
    assert json.loads((sd3_dir / INFO_FILE).read_text())["kind"] == "sd3"
    assert all((sd3_dir / d).is_dir() for d in SD3_REQUIRED_FOLDERS(True))
    cfg = pipe.transformer.config
    assert list(cfg.dual_attention_layers) == [0] and cfg.qk_norm == "rms_norm" and cfg.joint_attention_dim == T5_WIDTH
    assert (pipe.vae.config.scaling_factor, pipe.vae.config.shift_factor) == (1.5305, 0.0609)
    assert pipe.scheduler.config.shift == 3.0 and type(pipe.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # the saved weights are the seeded in-memory build's (deterministic, global RNG left alone)
    rng = torch.get_rng_state()
    again = build_tiny_sd3_pipeline(seed=0)
    assert torch.equal(rng, torch.get_rng_state())
    for name in ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        saved, built = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in saved), name
    other = build_tiny_sd3_pipeline(seed=1).transformer.state_dict()
    assert not torch.equal(other["proj_out.weight"], again.transformer.state_dict()["proj_out.weight"])

    out = pipe(PROMPTS[:2], num_inference_steps=1, height=64, width=64, max_sequence_length=L, guidance_scale=2.0,
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 64, 64) and torch.isfinite(out).all()


def test_sd3_medium_without_t5(tmp_path):
    """SD3-Medium-shaped (no dual attention, no qk-norm) and written without T5: a valid diffusers dir
    with no text_encoder_3/, and load_sd3_conditioner(t5=False) works on it (t5=True names the folder)."""
    path = write_tiny_sd3_teacher(tmp_path / "sd3m", seed=3, sd35=False, t5=False)
    assert not (path / "text_encoder_3").exists() and not (path / "tokenizer_3").exists()
    # diffusers loads a T5-less SD3 dir only when told so (its documented way to drop T5)
    p = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    assert p.text_encoder_3 is None and list(p.transformer.config.dual_attention_layers) == []
    assert p.transformer.config.qk_norm is None
    cond = load_sd3_conditioner(path, torch.float32, "cpu", t5=False, max_sequence_length=L)
    pe, _, pp, _ = encode_prompt(p, PROMPTS[:2])
    got = cond.encode(PROMPTS[:2])
    assert torch.equal(got["encoder_hidden_states"], pe) and torch.equal(got["pooled_projections"], pp)
    with pytest.raises(TeacherDirError, match="missing text_encoder_3/"):
        load_sd3_conditioner(path, torch.float32, "cpu", t5=True)
    with pytest.raises(FileExistsError):
        write_tiny_sd3_teacher(path)


def test_tiny_t5_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer, T5TokenizerFast

    tok = build_tiny_t5_tokenizer()
    kw = dict(padding="max_length", max_length=8, truncation=True, add_special_tokens=True, return_tensors="pt")
    texts = ["a red circle", "photo of a dog zebra", ""]
    ids = tok(texts, **kw).input_ids
    # T5 conventions: pad 0, </s> 1 appended, unknown words spelled out in letters
    assert ids[0].tolist() == [3, 4, 6, 1, 0, 0, 0, 0] and ids[2].tolist() == [1] + [0] * 7
    assert ids[1, -1] == 1 and (ids[1] > 2).sum() == 7  # truncated: 7 pieces + </s>
    tok.save_pretrained(tmp_path)
    for cls in (AutoTokenizer, T5TokenizerFast):
        back = cls.from_pretrained(tmp_path, local_files_only=True)
        assert len(back) == len(tok) and torch.equal(back(texts, **kw).input_ids, ids)

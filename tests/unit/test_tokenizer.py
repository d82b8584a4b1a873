"""The CLIP tokenizer derived from open_clip's BPE file must agree with open_clip id for id."""

import json

import pytest
import torch

from sidscale.families.shared.tokenizers import CLIP_VOCAB_SIZE, build_clip_tokenizer, clip_vocab_and_merges

open_clip = pytest.importorskip("open_clip")

PROMPTS = [
    "a red circle",
    "",
    "A photo of an astronaut riding a horse on Mars!",
    "it's 2024, don't   stop; we'll see",
    "café déjà vu, naïve résumé",
    "hello, world... #tags @user 3.14 -- (parentheses) [brackets]",
    "UPPER lower MiXeD",
    "a very long prompt " * 20,  # truncated to 77 tokens on both sides
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tok")


def test_vocab_matches_open_clip_encoder():
    from open_clip.tokenizer import SimpleTokenizer

    vocab, merges = clip_vocab_and_merges()
    ref = SimpleTokenizer()
    assert len(vocab) == CLIP_VOCAB_SIZE == ref.vocab_size
    # open_clip names the specials <start_of_text>/<end_of_text>; HF uses <|startoftext|>/<|endoftext|>
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    assert vocab == {renamed.get(k, k): v for k, v in ref.encoder.items()}
    assert {m: i for i, m in enumerate(merges)} == ref.bpe_ranks


def test_ids_equal_open_clip_tokenize(tok_dir):
    tok = build_clip_tokenizer(tok_dir / "main")
    assert len(tok) == CLIP_VOCAB_SIZE and tok.model_max_length == 77
    ids = tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ref = open_clip.tokenize(PROMPTS, context_length=77).long()
    # open_clip pads with 0, SD1.5's tokenizer with <|endoftext|>: identical up to the first eos
    eos_pos = (ref == 49407).int().argmax(dim=1)
    after = torch.arange(77)[None] > eos_pos[:, None]
    assert torch.equal(ids[~after], ref[~after])
    assert (ids[after] == 49407).all() and (ref[after] == 0).all()
    assert ids.shape == (len(PROMPTS), 77) and (ids[-1, -1] == 49407)  # truncated, ends with eos


def test_default_tokenizer_pads_with_eos_like_sd15(tok_dir):
    from open_clip.tokenizer import SimpleTokenizer

    tok = build_clip_tokenizer(tok_dir / "eos")
    assert tok.pad_token_id == tok.eos_token_id == 49407 and tok.bos_token_id == 49406
    ref = SimpleTokenizer()
    for prompt in PROMPTS[:-1]:  # the long one is covered by the truncation test above
        body = ref.encode(prompt)
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
        expected = [49406, *body, 49407] + [49407] * (77 - len(body) - 2)
        assert ids == expected, prompt


def test_directory_reloads_and_config(tok_dir):
    from transformers import CLIPTokenizer

    build_clip_tokenizer(tok_dir / "reload", model_max_length=77)
    cfg = json.loads((tok_dir / "reload" / "tokenizer_config.json").read_text())
    assert cfg["model_max_length"] == 77
    again = CLIPTokenizer.from_pretrained(str(tok_dir / "reload"))
    assert len(again) == CLIP_VOCAB_SIZE
    assert again("a blue ring").input_ids == open_clip.tokenize(["a blue ring"])[0][:5].tolist()

"""Offline tokenizers: the real CLIP BPE tokenizer, and a tiny T5-style one for tests.

The CLIP BPE tokenizer is built offline from the vocabulary that ships inside open_clip_torch.

Stable Diffusion 1.x/2.x tokenize with OpenAI's CLIP BPE (49,408 ids). No model hub is reachable
here, but ``open_clip`` ships the same merges as ``bpe_simple_vocab_16e6.txt.gz``. From it we
derive the two files a transformers ``CLIPTokenizer`` reads (``vocab.json``, ``merges.txt``).

The id layout (the one both OpenAI CLIP and open_clip use, so ids agree token for token):
  0..255      the 256 byte symbols (GPT-2 style printable byte -> unicode map)
  256..511    the same symbols with the end-of-word marker ``</w>``
  512..49405  one id per merge, in merge-rank order (48,894 merges)
  49406       ``<|startoftext|>``    49407  ``<|endoftext|>``
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sidscale.core.io import atomic_write_text

if TYPE_CHECKING:  # transformers is heavy: imported where a tokenizer is built
    from transformers import PreTrainedTokenizerFast

CLIP_VOCAB_SIZE = 49408
NUM_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def open_clip_bpe_path() -> Path:
    """Location of open_clip's shipped BPE merges file (a clear error if it is missing)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("open_clip_torch is not installed; it ships the CLIP BPE vocabulary we need")
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"CLIP BPE vocabulary not found at {path}")
    return path


def _byte_symbols() -> list[str]:
    """The 256 unicode stand-ins for raw bytes, in CLIP's id order.

    Printable latin-1 bytes map to themselves (and come first, in byte order); the remaining
    bytes (control characters, space, ...) map to code points from 256 upward, so that no BPE
    symbol is whitespace or a control character.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    keep = set(printable)
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]


def _read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
    # line 0 is a version header; CLIP uses exactly the first NUM_MERGES merges after it
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like the CLIP BPE file (bad merges section)")
    return merges  # type: ignore[return-value]


def clip_vocab_and_merges(bpe_path: Path | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order) of OpenAI CLIP's tokenizer."""
    merges = _read_merges(bpe_path or open_clip_bpe_path())
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(
            f"derived CLIP vocabulary has {len(vocab)} distinct tokens, expected {CLIP_VOCAB_SIZE}"
        )
    return vocab, merges


def write_clip_tokenizer_files(out_dir: str | os.PathLike, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and the tokenizer config into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    atomic_write_text(out / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    atomic_write_text(out / "merges.txt", "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "do_lower_case": True,
    }
    atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2))
    specials = {k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    atomic_write_text(out / "special_tokens_map.json", json.dumps(specials, indent=2))
    return out


def build_clip_tokenizer(out_dir: str | os.PathLike, model_max_length: int = 77):
    """Write a CLIP tokenizer directory and load it as a transformers ``CLIPTokenizer``.

    It pads with ``<|endoftext|>`` like SD1.5's tokenizer (open_clip.tokenize pads with 0; the ids
    up to and including the first ``<|endoftext|>`` are identical). Not offered: SD2.x's ``"!"``
    pad token, which as a special token also captures every "!" typed in a prompt.
    """
    from transformers import CLIPTokenizer

    out = write_clip_tokenizer_files(out_dir, model_max_length)
    # NOTE: load through from_pretrained: in transformers 5.x, CLIPTokenizer(vocab_file=...,
    # merges_file=...) silently ignores the files and yields a 3-token vocabulary.
    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=model_max_length)
    if len(tok) != CLIP_VOCAB_SIZE:
        raise RuntimeError(
            f"CLIPTokenizer loaded from {out} has {len(tok)} tokens, expected {CLIP_VOCAB_SIZE}; "
            "the vocab.json / merges.txt were not picked up (transformers API change?)"
        )
    if tok.bos_token_id != CLIP_VOCAB_SIZE - 2 or tok.eos_token_id != CLIP_VOCAB_SIZE - 1:
        raise RuntimeError(f"unexpected special token ids bos={tok.bos_token_id} eos={tok.eos_token_id}")
    return tok


T5_PAD_ID, T5_EOS_ID, T5_UNK_ID = 0, 1, 2
DEFAULT_WORDS = ("a", "red", "blue", "circle", "square", "photo", "of", "cat", "dog")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_t5_vocab(words: Sequence[str] = DEFAULT_WORDS) -> list[tuple[str, float]]:
    """(piece, log-probability) in id order. Whole words score well above spelling them out, so a
    listed word is one id; letters are the fallback."""
    words = list(words)
    bad = [w for w in words if not w or any(c.isspace() for c in w)]
    if bad:
        raise ValueError(f"build_tiny_t5_tokenizer: words must be non-empty and contain no whitespace, got {bad!r}")
    if len(set(words)) != len(words):
        raise ValueError(f"build_tiny_t5_tokenizer: duplicate words in {words!r}")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in words]
    vocab += [(c, -5.0) for c in LETTERS]  # distinct from the word pieces: those start with "\u2581"
    vocab.append(("\u2581", -3.0))
    return vocab


def build_tiny_t5_tokenizer(words: Sequence[str] = DEFAULT_WORDS, model_max_length: int = 512,
                            extra_ids: int = 0) -> PreTrainedTokenizerFast:
    """A T5-convention tokenizer (Unigram, pad=0, eos=1, unk=2, Metaspace pre-tokenizer, ``</s>``
    appended) over ``words`` + single letters.

    ``extra_ids``: T5's sentinel tokens ``<extra_id_i>`` appended after the vocabulary (real T5
    has 100); 0 keeps ``len(tokenizer)`` small, so a tiny encoder's ``vocab_size`` covers it.
    """
    from transformers import T5Tokenizer

    # NOTE: T5Tokenizer(vocab=...) builds the same Unigram / Metaspace / "$A </s>" pipeline as
    # a hand-built tokenizers.Tokenizer, but saves as class T5Tokenizer (not TokenizersBackend),
    # so a T5TokenizerFast.from_pretrained of the saved dir does not add 100 sentinel ids.
    tok = T5Tokenizer(vocab=tiny_t5_vocab(words), extra_ids=extra_ids, model_max_length=model_max_length)
    ids = (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id)
    if ids != (T5_PAD_ID, T5_EOS_ID, T5_UNK_ID):
        raise RuntimeError(f"tiny T5 tokenizer: special ids (pad, eos, unk) = {ids}, expected (0, 1, 2) "
                           "(transformers API change?)")
    return tok

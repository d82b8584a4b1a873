"""A tiny offline T5-style tokenizer for tests: no sentencepiece model file, no model hub.

SD3's third text encoder is T5-v1.1-XXL, tokenized by a sentencepiece Unigram model (32k pieces)
that nothing installed here ships. Tests only need a tokenizer with T5's conventions, so this one
is a Unigram over a handful of words plus single letters, built with the ``tokenizers`` library:

  0  ``<pad>``    1  ``</s>`` (eos, appended to every sequence)    2  ``<unk>``
  3.. one piece per word (``"\u2581" + word``), then the 26 letters, then ``"\u2581"`` alone

Words outside the list fall back to letters (Unigram picks the best segmentation); other
characters (upper case, digits, punctuation) become ``<unk>``. The object is a transformers
``T5Tokenizer`` (in transformers 5 the tokenizers-backed class, also exported as
``T5TokenizerFast``; a ``PreTrainedTokenizerFast``), so ``save_pretrained`` writes
``tokenizer_class: T5Tokenizer`` like a real SD3 ``tokenizer_3/`` and ``AutoTokenizer`` /
``T5TokenizerFast.from_pretrained(dir)`` load it back with the same ids.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerFast

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

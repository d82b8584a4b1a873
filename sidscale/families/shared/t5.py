"""The CPU-sized T5 encoder of the bench's tiny SD3 and FLUX presets (one config for both)."""

from __future__ import annotations

from typing import Any

# >= len(build_tiny_t5_tokenizer()) (39): the tiny offline T5 tokenizer's ids fit
TINY_T5_VOCAB = 64


def tiny_t5_config(width: int) -> dict[str, Any]:
    """``T5Config`` kwargs of a two-layer T5 encoder of ``d_model = width`` (SD3's / FLUX's text states)."""
    return {"vocab_size": TINY_T5_VOCAB, "d_model": width, "d_kv": 16, "d_ff": 2 * width,
            "num_layers": 2, "num_heads": 4, "relative_attention_num_buckets": 8, "feed_forward_proj": "gated-gelu",
            "layer_norm_epsilon": 1e-6, "is_encoder_decoder": False, "use_cache": False,
            "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1}

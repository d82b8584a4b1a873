"""The resolved-preset assets (``tests/assets/presets_resolved``) and the schema keys added after them."""

from __future__ import annotations

import json

# Keys added to the schema after the assets were written, with the value every preset must resolve to
# (the default: no preset sets them). The assets themselves are never rewritten.
ADDED_SINCE = {
    ("method", "noise_type"): "fresh",
    ("method", "fake_text"): True,
    ("method", "adversarial"): {"enabled": False, "disc_scale": 1.0, "gen_scale": 1.0, "disc_warmup_kimg": 20.0,
                                "mix_after_kimg": 40.0, "mix_weight": 0.5, "logit_clamp": 10.0},
    ("data", "real_shards"): "",
}


def with_added_keys(tree: dict) -> dict:
    tree = json.loads(json.dumps(tree))
    for (section, key), value in ADDED_SINCE.items():
        assert key not in tree[section], f"{section}.{key} is in the asset already"
        tree[section][key] = value
    return tree

"""Every preset resolves to exactly the config it had before presets were written as differences.

``tests/assets/presets_resolved/<name>.json`` is ``config_to_dict(load_config(name))`` as the
whole-tree presets loaded before ``extends:`` existed (written once by that code, never by this
one). Comparing the JSON text, not only the dicts, also catches an int that became a float.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sidscale.config import ConfigError, config_to_dict, list_presets, load_config, read_config_tree
from sidscale.config.loading import PRESET_DIR
from tests.helpers.preset_assets import with_added_keys

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "presets_resolved"



def canonical(tree: dict) -> str:
    return json.dumps(tree, indent=1, sort_keys=True)


def leaf_paths(tree: dict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for key, value in tree.items():
        paths += leaf_paths(value, (*prefix, key)) if isinstance(value, dict) else [(*prefix, key)]
    return paths


def lookup(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def test_every_preset_has_its_reference_and_back() -> None:
    assert sorted(p.stem for p in ASSETS.glob("*.json")) == list_presets()


@pytest.mark.parametrize("name", sorted(p.stem for p in ASSETS.glob("*.json")))
def test_preset_resolves_to_its_pre_extends_config(name: str) -> None:
    expected = with_added_keys(json.loads((ASSETS / f"{name}.json").read_text()))
    resolved = config_to_dict(load_config(name))
    assert resolved == expected
    assert canonical(resolved) == canonical(expected)


def test_presets_are_written_as_differences() -> None:
    """The family presets start from a sibling (the chain the preset files declare), and no preset
    restates a value its parent already resolves to."""
    parents = {}
    for name in list_presets():
        raw = (PRESET_DIR / f"{name}.yaml").read_text()
        parents[name] = next((line.split(":", 1)[1].strip() for line in raw.splitlines()
                              if line.startswith("extends:")), None)
    assert parents == {"toy": None, "sd15": None, "sd21": "sd15", "sd21_768": "sd21", "sdxl": "sd15",
                       "sd3_medium": None, "sd35_medium": "sd3_medium", "sd35_large": "sd3_medium",
                       "flux_dev": "sd3_medium"}
    for name, parent in parents.items():
        if parent is None:
            continue
        own = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
        own.pop("extends")
        mine, theirs = config_to_dict(load_config(name)), config_to_dict(load_config(parent))
        for path in leaf_paths(own):
            assert lookup(mine, path) != lookup(theirs, path), f"{name} restates {'.'.join(path)} of {parent}"


def test_changing_a_parent_changes_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The equality above is not vacuous: with one value of sd3_medium changed, its children (whose
    files do not mention the key) no longer match their references, while sd15's family still does."""
    import shutil

    import sidscale.config.loading as loading

    copy = tmp_path / "configs"
    shutil.copytree(PRESET_DIR, copy)
    parent = copy / "sd3_medium.yaml"
    text = parent.read_text()
    assert "  max_steps: 8000\n" in text
    parent.write_text(text.replace("  max_steps: 8000\n", "  max_steps: 8001\n"))
    monkeypatch.setattr(loading, "PRESET_DIR", copy)
    for child in ("sd35_medium", "sd35_large", "flux_dev"):
        expected = with_added_keys(json.loads((ASSETS / f"{child}.json").read_text()))
        resolved = config_to_dict(load_config(child))
        assert resolved["train"]["max_steps"] == 8001 != expected["train"]["max_steps"]
        resolved["train"]["max_steps"] = expected["train"]["max_steps"]
        assert resolved == expected  # that one value, nothing else
    sd21_768 = with_added_keys(json.loads((ASSETS / "sd21_768.json").read_text()))
    assert config_to_dict(load_config("sd21_768")) == sd21_768


def test_preset_trees_hold_no_extends_key() -> None:
    for name in list_presets():
        assert "extends" not in read_config_tree(PRESET_DIR / f"{name}.yaml")
    with pytest.raises(ConfigError, match="unknown key 'extends'"):
        from sidscale.config import config_from_dict

        config_from_dict({"extends": "toy"})  # only YAML files start from another one

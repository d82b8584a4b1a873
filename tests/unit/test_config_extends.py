"""``extends:``: a YAML starts from a preset or another YAML and holds only what differs.

The expectations are written out by hand (or taken from the pre-extends reference trees in
``tests/assets/presets_resolved``), never computed by the loader under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidscale.config import Config, ConfigError, config_to_dict, dump_config, load_config, preset_path
from tests.helpers.preset_assets import with_added_keys

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "presets_resolved"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load_error(path: Path, *overrides: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(str(path), list(overrides))
    return str(info.value)


PARENT = """\
method:
  alpha: 1.2
  t_min: 30
generator:
  betas: [0.5, 0.9]
  eps: 1.0e-7
preview:
  prompts: [a, b, c]
train:
  max_steps: 7
"""


def test_mappings_merge_lists_scalars_and_nulls_replace(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", """\
extends: parent.yaml
method:
  alpha: 1.3
generator:
  eps: null
preview:
  prompts: [x]
fake:
  lr: 2.0e-5
""")
    expected = Config()
    expected.method.alpha, expected.method.t_min = 1.3, 30     # the child's alpha, the parent's t_min
    expected.generator.betas, expected.generator.eps = (0.5, 0.9), None  # null replaces the parent's 1e-7
    expected.preview.prompts = ["x"]                           # a list replaces, never concatenates
    expected.train.max_steps = 7
    expected.fake.lr = 2e-5
    assert load_config(str(child)) == expected


def test_a_chain_of_three_resolves_parents_first(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "train:\n  max_steps: 1\n  seed: 1\n  log_every: 1\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\ntrain:\n  seed: 2\n  log_every: 2\n")
    c = write(tmp_path / "c.yaml", "extends: b.yaml\ntrain:\n  log_every: 3\n")
    t = load_config(str(c)).train
    assert (t.max_steps, t.seed, t.log_every) == (1, 2, 3)


def test_a_user_config_extends_a_preset(tmp_path: Path) -> None:
    mine = write(tmp_path / "mine.yaml", """\
extends: sd3_medium
teacher:
  path: /models/sd3
train:
  max_steps: 10
""")
    expected = with_added_keys(json.loads((ASSETS / "sd3_medium.json").read_text()))
    expected["teacher"]["path"], expected["train"]["max_steps"] = "/models/sd3", 10
    assert config_to_dict(load_config(str(mine))) == expected


def test_a_path_parent_is_relative_to_the_file_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "runs" / "base.yaml", "train:\n  max_steps: 11\n")
    child = write(tmp_path / "runs" / "exp" / "child.yaml", "extends: ../base.yaml\ntrain:\n  seed: 5\n")
    cwd = tmp_path / "elsewhere"
    write(cwd / "base.yaml", "train:\n  max_steps: 99\n")  # the same name beside the cwd: not the parent
    write(cwd / "exp" / "base.yaml", "train:\n  max_steps: 98\n")
    monkeypatch.chdir(cwd)
    t = load_config(str(child)).train
    assert (t.max_steps, t.seed) == (11, 5)
    absolute = write(tmp_path / "abs.yaml", f"extends: {tmp_path / 'runs' / 'base.yaml'}\n")
    assert load_config(str(absolute)).train.max_steps == 11


def test_set_overrides_apply_after_the_whole_chain(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\nmethod:\n  alpha: 1.3\n")
    cfg = load_config(str(child), ["method.alpha=1.4", "train.max_steps=8", "method={t_init: 500}"])
    assert (cfg.method.alpha, cfg.method.t_min, cfg.method.t_init, cfg.train.max_steps) == (1.4, 30, 500, 8)
    # values are checked once, after the overrides: a file's t_min above the default t_max is fine
    # when --set moves t_max
    high = write(tmp_path / "high.yaml", "extends: toy\nmethod:\n  t_min: 990\n")
    assert load_config(str(high), ["method.t_max=995"]).method.t_min == 990
    assert load_error(high) == f"method.t_min = 990: expected a value below method.t_max=980 (from {high})"


def test_the_resolved_config_dumps_without_extends(tmp_path: Path) -> None:
    child = write(tmp_path / "child.yaml", "extends: sd35_large\ntrain:\n  max_steps: 3\n")
    cfg = load_config(str(child))
    out = tmp_path / "run" / "config.yaml"
    dump_config(cfg, out)
    assert "extends" not in out.read_text()
    assert load_config(str(out)) == cfg


# ---------------------------------------------------------------------------- errors


def test_a_cycle_names_the_file_and_the_chain(tmp_path: Path) -> None:
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path / "b.yaml", "extends: ./a.yaml\n")
    assert load_error(a) == f"{b}: extends = './a.yaml': a cycle of extends ({a} -> {b} -> {a})"
    me = write(tmp_path / "me.yaml", "extends: me.yaml\ntrain:\n  seed: 1\n")
    assert load_error(me) == f"{me}: extends = 'me.yaml': a cycle of extends ({me} -> {me})"


def test_an_unknown_preset_parent_names_the_file_and_suggests(tmp_path: Path) -> None:
    mine = write(tmp_path / "mine.yaml", "extends: sd3_mediun\n")
    msg = load_error(mine)
    assert msg.startswith(f"{mine}: extends = 'sd3_mediun': unknown preset; did you mean 'sd3_medium'? Presets: ")
    assert "sd15, sd21" in msg and msg.endswith("(a path needs a separator or a .yaml suffix)")


def test_a_missing_or_malformed_parent_names_the_file(tmp_path: Path) -> None:
    mine = write(tmp_path / "mine.yaml", "extends: base/nope.yaml\n")
    assert load_error(mine) == f"{mine}: extends = 'base/nope.yaml': file not found: {tmp_path / 'base' / 'nope.yaml'}"
    listed = write(tmp_path / "listed.yaml", "extends: [toy, sd15]\n")
    assert load_error(listed) == (f"{listed}: extends = ['toy', 'sd15']: expected a preset name or a YAML path, "
                                  "got list")
    empty = write(tmp_path / "empty.yaml", "extends:\n")
    assert load_error(empty) == f"{empty}: extends = None: expected a preset name or a YAML path, got NoneType"


def test_a_bad_key_in_a_parent_names_the_parent(tmp_path: Path) -> None:
    parent = write(tmp_path / "parent.yaml", "train:\n  max_step: 3\n")
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\ntrain:\n  seed: 1\n")
    assert load_error(child).startswith(
        f"{parent}: unknown key 'train.max_step'; did you mean 'train.max_steps'?")
    parent.write_text("train:\n  seed: one\n")
    assert load_error(child) == f"{parent}: train.seed = 'one': expected an int, got str"


def test_a_section_replaced_by_a_value_is_refused_in_the_child(tmp_path: Path) -> None:
    write(tmp_path / "parent.yaml", PARENT)
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\nmethod: 3\n")
    assert load_error(child) == f"{child}: method = 3: expected a mapping of MethodConfig keys, got int"


def test_presets_extend_by_name_from_the_preset_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a preset's `extends: sd15` means the preset, even from a cwd holding an sd15.yaml
    write(tmp_path / "sd15.yaml", "train:\n  max_steps: 1\n")
    monkeypatch.chdir(tmp_path)
    expected = with_added_keys(json.loads((ASSETS / "sd21.json").read_text()))
    assert config_to_dict(load_config("sd21")) == expected
    assert "extends: sd15" in preset_path("sd21").read_text()

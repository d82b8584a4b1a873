"""teacher.text_encoders = cpu: the text encoders stay in host memory and only their outputs go to the
trainer's device (sidscale/families/shared/host.py)."""

from __future__ import annotations

import torch

from sidscale.families.shared.host import HostConditioner
from tests.helpers.inprocess import one_rank_trainer

OVERRIDES = ["train.precision=fp32", "teacher.dtype=fp32", "teacher.resolution=8", "data.shards=indexed:toy",
             "train.global_batch=4", "train.micro_batch=2", "eval.num_samples=0"]


def test_encoders_on_the_host_outputs_on_the_device_values_unchanged(tiny_toy_teacher, tmp_path):
    prompts = ["a red circle", "a blue square"]
    settings = OVERRIDES + [f"teacher.path={tiny_toy_teacher}"]
    with one_rank_trainer(tmp_path / "gpu", settings) as plain:
        want = plain.teacher.conditioner.encode(prompts)
        want_ids = plain.teacher.conditioner.encode_ids(plain.teacher.conditioner.tokenize(prompts))
        want_empty = plain.teacher.conditioner.empty(2)
    with one_rank_trainer(tmp_path / "cpu", settings + ["teacher.text_encoders=cpu"]) as trainer:
        cond = trainer.teacher.conditioner
        assert isinstance(cond, HostConditioner)
        assert {p.device.type for p in cond.inner.parameters()} == {"cpu"}
        got = cond.encode(prompts)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
        got_ids = cond.encode_ids(cond.tokenize(prompts))
        assert all(torch.equal(got_ids[k], want_ids[k]) for k in want_ids)
        assert all(torch.equal(cond.empty(2)[k], want_empty[k]) for k in want_empty)
        # outputs land on the trainer's device: seen with a device the encoders cannot be on
        meta = HostConditioner(cond.inner, "meta")
        out = meta.encode(prompts)
        assert {v.device.type for v in out.values()} == {"meta"}
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in want.items()}
        assert meta.empty(2) is meta.empty(2)  # the unconditional branch: encoded and moved once
        assert trainer.train_step()["loss_fake"].isfinite()

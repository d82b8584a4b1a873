"""ds_configs/zero3_offload.json trains (issue 12, fault 10): ZeRO-3 with optimizer and parameters
offloaded to the host. The shipped config keeps torch Adam (``zero_force_ds_cpu_optimizer: false``,
see ``build_optimizer``); a config without that key gets DeepSpeedCPUAdam, whose first use JIT-builds
a C++ op (154 s measured here), so its choice is tested without building it.
"""

from __future__ import annotations

import tempfile

import pytest
import torch


@pytest.fixture(scope="module")
def one_rank():
    from tests.helpers.inprocess import one_rank_group

    with one_rank_group() as info:
        yield info


def _masters(engine) -> torch.Tensor:
    flats = engine.optimizer.fp32_partitioned_groups_flat  # the fp32 masters, on the host
    return torch.cat([flat.detach().float().flatten().clone() for flat in flats])


def test_zero3_offload_trains_two_steps(one_rank):
    from sidscale.bench.cases import BenchCase, case_config
    from sidscale.families.presets import build_preset_teacher
    from sidscale.trainer import Trainer

    case = BenchCase("tiny", zero=3, precision="bf16", micro_batch=1)  # bf16: the sdxl preset's offload setting
    cfg = case_config(case, 1)
    cfg.deepspeed.config = "ds_configs/zero3_offload.json"
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="sidscale-offload-"), one_rank,
                      teacher=build_preset_teacher("tiny", one_rank.device, "bf16"))
    try:
        engines = {"generator": trainer.gen_engine, "fake": trainer.fake_engine}
        for name, engine in engines.items():
            assert type(engine.basic_optimizer) is torch.optim.Adam, name
            assert engine.zero_offload_param() is not None and engine.zero_cpu_offload(), name
        before = {name: _masters(e) for name, e in engines.items()}
        for _ in range(2):
            stats = trainer.train_step()
            assert stats["skipped_fake"].item() == 0 and stats["skipped_gen"].item() == 0
        lr = cfg.generator.lr
        for name, engine in engines.items():
            delta = (_masters(engine) - before[name]).abs()
            assert torch.isfinite(delta).all(), name
            # Adam (betas 0, 0.999) moves an entry by at most ~lr per step (~1.42 lr in step 2)
            assert (delta > 0).float().mean() > 0.5, f"{name}: weights did not change"
            assert delta.max() <= 2.5 * lr, f"{name}: a step larger than Adam's bound ({delta.max()})"
    finally:
        trainer.prompts.close()


def test_offload_optimizer_choice(monkeypatch):
    """ZeRO-Offload without the opt-out gets DeepSpeedCPUAdam with torch Adam's semantics (L2 weight
    decay, the net's lr, betas, eps); with the opt-out, or without offload, torch Adam."""
    import deepspeed.ops.adam

    from sidscale.config import NetConfig
    from sidscale.distributed.engines import build_optimizer, offloads_optimizer

    made = []

    class RecordingCPUAdam(torch.optim.Adam):  # stands in for the class: no C++ build in the test
        def __init__(self, params, **kw):
            made.append(dict(kw))
            kw.pop("adamw_mode")
            super().__init__(params, **kw)

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", RecordingCPUAdam)
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert offloads_optimizer(offload)
    assert not offloads_optimizer({"zero_optimization": {"stage": 2}})
    params = [torch.nn.Parameter(torch.zeros(3))]
    net = NetConfig(lr=3e-6, betas=[0.0, 0.99], weight_decay=0.01)
    assert type(build_optimizer(params, net, offload)) is RecordingCPUAdam
    assert made == [{"lr": 3e-6, "betas": (0.0, 0.99), "eps": 1e-8, "weight_decay": 0.01, "adamw_mode": False}]
    opt = build_optimizer(params, NetConfig(), {**offload, "zero_force_ds_cpu_optimizer": False})
    assert type(opt) is torch.optim.Adam and opt.param_groups[0]["eps"] == 1e-8
    assert type(build_optimizer(params, NetConfig(), {"zero_optimization": {"stage": 2}})) is torch.optim.Adam

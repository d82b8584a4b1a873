"""``teacher.partitioned = auto``: does the run fit with a replicated teacher? The memory plan, on the real run.

The same formulas as ``sidscale.perf.memory_plan`` (``static_terms``), fed with the run's own
networks instead of a preset: the teacher network's element counts (``counts_of``), its text
encoders, the run's ds_config (ZeRO stage, buckets), world size, micro-batch, accumulation,
precisions and CFG scales. The generator step's activations (G trainable, the frozen fake net and
the teacher with their CFG batches, the usual peak) are measured with saved-tensor hooks on a
``meta``-device copy of the network through the family's own prediction function, so no memory is
spent and no family is named here; where that measurement is impossible (a network that cannot run
on meta) the decision uses the model states alone and says so.

Replicated when model states + those activations fit the device memory of one rank (a CUDA device:
its total memory; the CPU: the host's memory divided among the node's ranks), partitioned otherwise.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sidscale.perf.memory_plan import (
    DEFAULT_BUDGET_FRACTION,
    GIB,
    PlanInput,
    budget_bytes,
    static_terms,
)
from sidscale.perf.zero_terms import counts_of, teacher_zero_settings

# the default fraction of the device memory the plan may fill (train.memory_fraction; the same budget as
# the micro-batch search: sidscale.perf.memory_plan.budget_bytes)
USABLE_FRACTION = DEFAULT_BUDGET_FRACTION


def usable_bytes(device: torch.device, fraction: float = DEFAULT_BUDGET_FRACTION) -> float:
    """What the plan may fill on ``device``: a GPU's budget (its fraction less the reserve outside the
    allocator, ``budget_bytes``); on the CPU the fraction of this rank's share of host memory."""
    capacity = device_capacity_bytes(device)
    if device.type == "cuda":
        return budget_bytes(capacity / GIB, fraction)
    return capacity * fraction


def device_capacity_bytes(device: torch.device) -> int:
    """Memory of one rank's device: a GPU's total memory; on the CPU, host memory / ranks on this node."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or 1
    return int(total // local)


def _saved_bytes(pred, x: torch.Tensor, t: torch.Tensor, cond: dict, params: list) -> int:
    from sidscale.perf.activations import flash_sdpa_on_meta, saved_tensor_bytes

    with torch.enable_grad(), flash_sdpa_on_meta():
        return saved_tensor_bytes(lambda: pred(x, t, cond), params)


def generator_step_activation_bytes(teacher: Any, cfg: Any) -> float:
    """Saved-activation bytes of one generator step's forward (G + fake + teacher, CFG batches), on meta.

    Raises when the network cannot be copied or run on meta (the caller falls back)."""
    from sidscale.families.shared.diffusers_dir import DTYPES
    from sidscale.method.sid_lsg import MethodSettings

    settings = MethodSettings.from_config(cfg.method)
    mb = cfg.train.micro_batch
    net_cls = type(teacher.net)
    with torch.device("meta"):
        meta_net = net_cls.from_config(dict(teacher.net.config))
    level = teacher.schedule.draw_loss_level(settings, torch.Generator().manual_seed(0))
    cond_dev = teacher.conditioner.empty(1)

    def one(dtype_name: str, trainable: bool, batch: int, ckpt: bool) -> int:
        net = meta_net.to(DTYPES[dtype_name]).requires_grad_(trainable).train()
        if ckpt and hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
        elif hasattr(net, "disable_gradient_checkpointing"):
            net.disable_gradient_checkpointing()
        pred = teacher.family.prediction_fn(net, teacher.schedule)
        x = torch.empty(batch, *teacher.latent_shape, device="meta", requires_grad=True)
        t = teacher.schedule.level_tensor(float(level) if level.is_floating_point() else int(level), batch, "meta")
        cond = {k: v.expand(batch, *v.shape[1:]).to("meta") for k, v in cond_dev.items()}
        return _saved_bytes(pred, x, t, cond, [*net.parameters(), *net.buffers()])

    def cfg_batch(k: float) -> int:
        return 2 * mb if k != 1.0 else mb

    work = "bf16" if cfg.train.precision == "pure_bf16" else cfg.train.precision  # the engines' working dtype
    return float(one(work, True, mb, cfg.generator.grad_checkpointing)
                 + one(work, False, cfg_batch(settings.cfg_eval_fake), cfg.fake.grad_checkpointing)
                 + one(cfg.teacher.dtype, False, cfg_batch(settings.cfg_eval_real), cfg.teacher.grad_checkpointing))


def plan_input_for_run(cfg: Any, ds_config: dict, world: int, partitioned: bool) -> PlanInput:
    from sidscale.config import accumulation_steps

    zs = ds_config["zero_optimization"]
    m = cfg.method
    return PlanInput(preset="(this run)", gpus=world, zero=int(zs["stage"]), micro_batch=cfg.train.micro_batch,
                     precision=cfg.train.precision, teacher_dtype=cfg.teacher.dtype,
                     grad_checkpointing=cfg.generator.grad_checkpointing,
                     cfg_scales=(m.cfg_train_fake, m.cfg_eval_fake, m.cfg_eval_real),
                     reduce_bucket_size=zs.get("reduce_bucket_size"), accumulation=accumulation_steps(cfg, world),
                     grad_accum_dtype=(ds_config.get("data_types") or {}).get("grad_accum_dtype"),
                     teacher_partitioned=partitioned,
                     adversarial=bool(m.adversarial.enabled), real_workers=int(cfg.data.num_workers),
                     budget_fraction=float(getattr(cfg.train, "memory_fraction", 0.9)),
                     # teacher.text_encoders = cpu keeps them in host memory: nothing on the device
                     text_encoders="off" if getattr(cfg.teacher, "text_encoders", "gpu") == "cpu" else "replicated",
                     previews=cfg.train.preview_every <= cfg.train.max_steps or cfg.eval.num_samples > 0,
                     preview_images=len(cfg.preview.prompts) * cfg.preview.seeds_per_prompt,
                     teacher_reference=cfg.eval.teacher_steps > 0)


def config_preset_plan(config: str, gpus: int, gpu_mem_gib: float, overrides: list[str] | None = None):
    """The memory plan (``sidscale.perf.memory_plan.plan``) of config preset ``config``'s defaults on ``gpus``
    GPUs of ``gpu_mem_gib`` GiB, its network the architecture preset of the same name. ``teacher.partitioned
    = auto`` is resolved as the trainer does: replicated when that plan fits the budget."""
    import dataclasses

    from sidscale.config import load_config
    from sidscale.distributed.ds_config import build_ds_config
    from sidscale.perf.memory_plan import plan

    cfg = load_config(config, overrides or [])
    ds = build_ds_config(cfg, gpus)
    setting = cfg.teacher.partitioned
    for partitioned in ((False, True) if setting == "auto" else (setting == "true",)):
        inp = dataclasses.replace(plan_input_for_run(cfg, ds, gpus, partitioned), preset=config,
                                  gpu_mem_gib=gpu_mem_gib)
        result = plan(inp, micro_batch=inp.micro_batch)
        if result.total <= result.budget:
            break
    return result


def placement_numbers(teacher: Any, cfg: Any, ds_config: dict, world: int, device: torch.device) -> dict:
    """Bytes per rank the decision compares: model states with the teacher replicated / partitioned, the
    partitioned teacher's gathered layers, the generator step's activations (None: not measurable) and
    the usable device memory."""
    zs = {"reduce_bucket_size": 500_000_000, **ds_config["zero_optimization"]}
    counts = counts_of(teacher.net, int(teacher_zero_settings(zs)["stage3_param_persistence_threshold"]))
    encoders = [teacher.conditioner] if isinstance(teacher.conditioner, torch.nn.Module) else []
    text_params = sum(p.numel() for e in encoders for p in e.parameters())
    largest_text = max((sum(p.numel() for p in m.parameters(recurse=False)) for e in encoders for m in e.modules()),
                       default=0)
    out: dict = {"zero_stage": int(zs["stage"]), "world": world, "micro_batch": cfg.train.micro_batch}
    for partitioned in (False, True):
        terms, _, _ = static_terms(plan_input_for_run(cfg, ds_config, world, partitioned), counts.params, text_params,
                                   counts.buffers, counts.largest_module, largest_text, zs)
        key = "partitioned" if partitioned else "replicated"
        out[f"{key}_model_states"] = sum(terms.values())
        out[f"{key}_teacher"] = sum(v for k, v in terms.items() if k.startswith("teacher"))
        out[f"{key}_gather"] = terms.get("zero3_gathered_params", 0.0)
    try:
        out["activations"] = generator_step_activation_bytes(teacher, cfg)
    except Exception as e:  # noqa: BLE001 - any failure of the meta run only removes one term
        out["activations"], out["activations_error"] = None, f"{type(e).__name__}: {e}"
    out["fraction"] = float(getattr(cfg.train, "memory_fraction", DEFAULT_BUDGET_FRACTION))
    out["capacity"] = usable_bytes(device, out["fraction"])
    out["device"] = device.type
    return out


def replicated_teacher_fits(teacher: Any, cfg: Any, ds_config: dict, world: int,
                            device: torch.device) -> tuple[bool, str]:
    """(fits with a replicated teacher, the numbers as one sentence for the log)."""
    n = placement_numbers(teacher, cfg, ds_config, world, device)
    acts = n["activations"]
    replicated = n["replicated_model_states"] + (acts or 0.0)
    act_text = (f"{acts / GIB:.3f} GiB generator-step activations at micro-batch {n['micro_batch']}"
                if acts is not None else f"activations not counted (meta run failed: {n['activations_error']})")
    detail = (f"memory plan, {world} rank(s), ZeRO-{n['zero_stage']}: with the teacher replicated "
              f"{n['replicated_model_states'] / GIB:.3f} GiB model states "
              f"(teacher {n['replicated_teacher'] / GIB:.3f}) "
              f"+ {act_text} = {replicated / GIB:.3f} GiB vs {n['capacity'] / GIB:.1f} GiB usable "
              f"({n['fraction']:.0%} of the {n['device']} memory per rank"
              f"{', less the GPU reserve' if n['device'] == 'cuda' else ''}); partitioned: "
              f"{n['partitioned_model_states'] / GIB:.3f} GiB model states "
              f"(teacher {n['partitioned_teacher'] / GIB:.3f}) "
              f"(incl. {n['partitioned_gather'] / GIB:.3f} GiB gathered layers)")
    return replicated <= n["capacity"], detail

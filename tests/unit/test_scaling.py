"""The scaling model (sidscale/bench/scaling.py): its byte counts against a real 2-rank run, the ring formulas
against a simulated ring, its FLOP count against FlopCounterMode on a real iteration, and consistency checks;
the memory plan's partitioned teacher / text encoder terms in closed form."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from sidscale.bench.scaling import (
    NetProfile,
    Setup,
    forward_equivalents_per_sample,
    iteration_cost,
    preset_profile,
    ring_wire_bytes,
)

REPO = Path(__file__).resolve().parents[2]
# the worker's trainer: tiny preset, bf16, micro-batch 2, accumulation 2, 2 ranks (tests/helpers/scaling_comm_worker.py)
TINY_RUN = Setup(gpus=2, zero=2, micro_batch=2, global_batch=8, precision="bf16")


@pytest.fixture(scope="module")
def two_rank_counts(tmp_path_factory) -> dict:
    """The one 2-rank launch of this file: per rank, per case, {op: {message bytes: count}}."""
    from tests.helpers.dist_launch import run_script_ranks

    out = tmp_path_factory.mktemp("scaling_comm")
    # no warm-up: in the exact regime the first iteration moves the same bytes (checked: bench/results)
    proc = run_script_ranks(REPO / "tests" / "helpers" / "scaling_comm_worker.py", [str(out), "zero2,zero3", "0"],
                            timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)}


def measured_bytes(counts: dict) -> dict[str, int]:
    return {op: sum(int(size) * n for size, n in sizes.items()) for op, sizes in counts.items()}


def predicted_bytes(zero: int) -> dict[str, float]:
    cost = iteration_cost(preset_profile("tiny"), dataclasses.replace(TINY_RUN, zero=zero))
    out = cost.msg_bytes_by_op()
    del out["gather"]  # the EMA gather happens at previews only: none in these iterations
    return out


@pytest.mark.slow
@pytest.mark.parametrize("zero", [2, 3])
def test_predicted_bytes_equal_the_two_rank_run(two_rank_counts, zero):
    """Every collective DeepSpeed issued in one iteration, summed per kind, on each rank, equals the model's count
    byte for byte. ZeRO-3's trace checks (int64 broadcasts of module ids) are the one unmodelled kind; they are
    control traffic, < 1% of the bytes."""
    for rank in (0, 1):
        got = measured_bytes(two_rank_counts[rank][f"zero{zero}"])
        control = got.pop("broadcast", 0)
        assert got == pytest.approx(predicted_bytes(zero), rel=0, abs=0), (rank, got, predicted_bytes(zero))
        assert control < 0.01 * sum(got.values())
        if zero == 2:
            assert control == 0


@pytest.mark.slow
def test_two_rank_message_structure(two_rank_counts):
    """Per call, what the model's totals are made of: ZeRO-2 all-reduces the whole bf16 gradient once per
    micro-batch per engine (2 x 2 calls) and all-gathers a half (one partition) per engine after the step;
    ZeRO-3 reduce-scatters the whole padded gradient per micro-batch per engine."""
    p = preset_profile("tiny").num_params
    z2, z3 = two_rank_counts[0]["zero2"], two_rank_counts[0]["zero3"]
    assert z2["all_reduce"][str(2 * p)] == 4
    assert z2["all_gather_into_tensor"] == {str(2 * math.ceil(p / 4) * 2): 2}
    assert z3["reduce_scatter_tensor"] == {str(2 * preset_profile("tiny").padded_zero3(2)): 4}


def simulated_ring(op: str, n: int, chunk_bytes: int) -> list[int]:
    """Bytes each rank sends in a ring collective over n chunks, by running the ring step by step."""
    sent = [0] * n
    have = [{r} for r in range(n)]  # all-gather: which chunks each rank holds
    steps = {"all_gather_into_tensor": n - 1, "reduce_scatter_tensor": n - 1, "all_reduce": 2 * (n - 1)}[op]
    for s in range(steps):
        for r in range(n):
            sent[r] += chunk_bytes  # each step every rank forwards one chunk to rank r + 1
            if op == "all_gather_into_tensor":
                have[(r + 1) % n].add((r - s) % n)
    if op == "all_gather_into_tensor":
        assert all(len(h) == n for h in have)
    return sent


@pytest.mark.parametrize("op", ["all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"])
@pytest.mark.parametrize("n", [1, 2, 3, 8, 64])
def test_ring_formulas_match_a_simulated_ring(op, n):
    chunk = 1000
    assert ring_wire_bytes(op, chunk * n, n) == max(simulated_ring(op, n, chunk))


def _profile(calls, params, flops=1) -> NetProfile:
    return NetProfile("toy", tuple(params), tuple(calls), flops)


def test_zero3_gathers_follow_the_module_calls():
    """A hand-made profile: 3 modules, one only on the text path (no backward when frozen), one checkpointed.
    Per micro-batch, n=4: G 2 forwards + 1 trainable backward, F 2 forwards + 1 trainable + 1 frozen backward."""
    calls = [((10, 6), True, True, False), ((8,), True, False, False), ((7,), True, True, True)]
    prof = _profile(calls, [10, 6, 8, 7])
    n = 4
    fwd = (3 + 2) + 2 + 2  # ceil(10/4) + ceil(6/4), ceil(8/4), ceil(7/4)
    frozen = 5 + 2
    s = Setup(gpus=n, zero=3, micro_batch=1, global_batch=12)  # accumulation 3
    ops = iteration_cost(prof, s).ops
    assert ops["param_all_gather_generator"].msg_bytes == 3 * 2 * (2 * fwd + fwd)
    assert ops["param_all_gather_fake"].msg_bytes == 3 * 2 * (2 * fwd + fwd + frozen)
    assert ops["grad_reduce_scatter"].msg_bytes == 2 * 3 * 2 * (12 + 8 + 8 + 8)  # each padded to 4
    # checkpointing: one more gather of the checkpointed module per backward (G 1, F 2)
    ck = iteration_cost(prof, dataclasses.replace(s, grad_checkpointing=True)).ops
    assert ck["param_all_gather_generator"].msg_bytes - ops["param_all_gather_generator"].msg_bytes == 3 * 2 * 2
    assert ck["param_all_gather_fake"].msg_bytes - ops["param_all_gather_fake"].msg_bytes == 3 * 2 * 2 * 2


def test_consistency_on_sd15():
    """On SD1.5's real module profile: the partitioned teacher gathers exactly what the frozen fake net gathers in
    the generator step (the teacher does not run in the fake step); ZeRO-3's gradient reduce-scatter is half
    ZeRO-2's all-reduce on the wire (up to per-parameter padding); ZeRO-3 moves ZeRO-2's gradient bytes minus
    that half plus its gathers, minus ZeRO-2's post-step all-gather; more GPUs at a fixed global batch never
    lower samples/s while the link stays the same (crossing the node boundary can: ZeRO-3 gathers per
    micro-batch); K-step generators add G forwards only."""
    prof = preset_profile("sd15")
    n, a = 8, 4
    base = Setup(gpus=n, zero=3, micro_batch=2, global_batch=n * 2 * a)
    z3 = iteration_cost(prof, base)
    pt = iteration_cost(prof, dataclasses.replace(base, teacher_partitioned=True))
    teacher = pt.ops["param_all_gather_teacher"].msg_bytes
    assert teacher == a * 2 * (prof.gathered(n, "fwd") + prof.gathered(n, "bwd_frozen"))
    fake_step = a * 2 * (prof.gathered(n, "fwd") + prof.gathered(n, "bwd_trainable"))  # F's own step
    fake_gen_step = z3.ops["param_all_gather_fake"].msg_bytes - fake_step
    assert teacher == fake_gen_step
    assert prof.gathered(n, "bwd_frozen") < prof.gathered(n, "bwd_trainable") == prof.gathered(n, "fwd")
    z2 = iteration_cost(prof, dataclasses.replace(base, zero=2))
    rs, ar = z3.ops["grad_reduce_scatter"].wire_bytes, z2.ops["grad_all_reduce"].wire_bytes
    assert rs == pytest.approx(ar / 2, rel=1e-4)
    gathers = sum(o.wire_bytes for k, o in z3.ops.items() if k.startswith("param_all_gather"))
    total = {c.setup.zero: sum(o.wire_bytes for k, o in c.ops.items() if k != "scalars") for c in (z2, z3)}
    after_step = z2.ops["param_all_gather_after_step"].wire_bytes
    assert total[3] == pytest.approx(total[2] - ar + rs + gathers - after_step, rel=1e-12)
    for sizes in ((1, 2, 4, 8), (16, 32, 64, 256, 512)):  # one link class each: inside a node, across nodes
        sps = [iteration_cost(prof, dataclasses.replace(base, gpus=g, micro_batch=1, global_batch=512)).samples_per_s
               for g in sizes]
        assert sps == sorted(sps), (sizes, sps)
    k4 = iteration_cost(prof, dataclasses.replace(base, generator_steps=4))
    assert k4.ops["param_all_gather_fake"].msg_bytes == z3.ops["param_all_gather_fake"].msg_bytes
    assert k4.ops["param_all_gather_generator"].msg_bytes - z3.ops["param_all_gather_generator"].msg_bytes == (
        a * 2 * 2 * 1.5 * prof.gathered(n, "fwd"))  # mean k 2.5 instead of 1, in both steps


def test_flop_model_matches_a_counted_iteration():
    """FlopCounterMode on one real fp32 iteration of the plain-PyTorch SiD loop (tiny UNet, CFG 1.5 on all three
    nets: every guided call a doubled batch), prompts encoded before counting: the UNet FLOPs the model predicts
    (forward equivalents x one forward's FLOPs, counted on meta) within 4%. The backward of a frozen net counts
    as 1 forward (input gradients) and of a trainable one 2: attention's backward is ~2.5x its forward, which
    the rule misses (measured: the iteration is 1-3% above the rule)."""
    import torch

    from sidscale.bench.bench import net_forward_flops_per_sample
    from sidscale.bench.cases import BenchCase, case_config
    from sidscale.data.prompts import IndexedPromptSource
    from sidscale.families.presets import build_preset_teacher
    from sidscale.families.toy.mixture import ToyMixture
    from sidscale.method.sid_lsg import MethodSettings
    from sidscale.perf.flops import count_flops
    from sidscale.testing.reference import OptimSettings, ReferenceLoop

    cfg = case_config(BenchCase("tiny", precision="fp32"), 1)
    teacher = build_preset_teacher("tiny", "cpu", "fp32", 0)
    settings = MethodSettings.from_config(cfg.method)
    batch = 2
    opt = OptimSettings(1e-5, (0.0, 0.999), 1e-8, 0.0)
    prompts = IndexedPromptSource(ToyMixture().prompts, 0)

    class Precomputed(ReferenceLoop):
        cache: dict = {}

        def _inputs(self, phase: int):  # the text encoder runs outside the count
            if phase not in self.cache:
                self.cache[phase] = super()._inputs(phase)
            return self.cache[phase]

    with torch.random.fork_rng():
        loop = Precomputed(teacher.net, teacher.conditioner, teacher.schedule, settings, opt, opt, batch,
                           teacher.latent_shape, 0, prompts.prompts_for, prediction_fn=teacher.family.prediction_fn)
        for phase in (0, 1):
            loop._inputs(phase)
        flops, _ = count_flops(loop.step)
    s = Setup(cfg_scales=(settings.cfg_train_fake, settings.cfg_eval_fake, settings.cfg_eval_real),
              generator_steps=settings.generator_steps)
    predicted = forward_equivalents_per_sample(s) * net_forward_flops_per_sample("tiny") * batch
    assert forward_equivalents_per_sample(s) == 18.0  # 1 + 2x3 (fake step), 3 + 2x2 + 2x2 (generator step)
    print(f"counted / predicted FLOPs: {flops / predicted:.4f}")
    assert flops == pytest.approx(predicted, rel=0.04), flops / predicted


def test_partitioned_teacher_and_text_encoders_in_the_memory_plan():
    """teacher.partitioned: the teacher term is its padded 1/N partition (closed form on the preset's counts),
    plus one gathered module and prefetch bucket; text encoders partitioned / off likewise; nothing else moves."""
    from sidscale.perf.memory_plan import GIB, PlanInput, plan
    from sidscale.perf.preset_costs import buffer_elements, largest_module_params, param_counts
    from sidscale.perf.zero_terms import ds_zero_settings

    p, text = param_counts("sd15")
    big_net, big_text = largest_module_params("sd15")
    n = 8
    base = PlanInput("sd15", gpus=n, zero=2, micro_batch=1)
    rep = plan(base, micro_batch=1).terms
    part = plan(dataclasses.replace(base, teacher_partitioned=True, text_encoders="partitioned"), micro_batch=1).terms
    off = plan(dataclasses.replace(base, text_encoders="off"), micro_batch=1).terms
    assert rep["teacher_net"] == 2 * p and part["teacher_net"] == 2 * math.ceil(p / n)
    assert part["text_encoders"] == 2 * math.ceil(text / n) and "text_encoders" not in off
    prefetch = ds_zero_settings(3)["stage3_prefetch_bucket_size"]
    assert part["zero3_gathered_params"] == 2 * max(min(big_net + prefetch, p), min(big_text + prefetch, text))
    assert "zero3_gathered_params" not in rep and buffer_elements("sd15") == 0
    same = {k for k in rep if k not in ("teacher_net", "text_encoders")}
    assert all(part[k] == rep[k] for k in same if k in part)
    # ZeRO-3 previews hold one saved working partition (the EMA is swapped into the generator), not a network
    z3 = plan(PlanInput("sd15", gpus=n, zero=3, micro_batch=1, grad_checkpointing=True), micro_batch=1)
    z3p = z3.phases["preview"]
    assert z3p["saved_working_partition"] == 2 * p / n and "preview_net" not in z3p
    # plus the largest of the preview's steps (generation, decode, teacher reference), which run one by one
    assert sum(v > 0 for k, v in z3p.items() if k != "saved_working_partition") == 1
    # previews off drops rank 0's preview network, the peak of a memory-tight ZeRO-2 plan
    flux_like = PlanInput("sd15", gpus=64, zero=2, micro_batch=1, grad_checkpointing=True, teacher_partitioned=True,
                          text_encoders="off")
    with_p = plan(flux_like, micro_batch=1)
    without = plan(dataclasses.replace(flux_like, previews=False), micro_batch=1)
    assert with_p.peak_phase == "preview" and "preview" not in without.phases
    static = sum(v for k, v in with_p.terms.items() if "(" not in k)
    assert with_p.total - static == pytest.approx(sum(with_p.phases["preview"].values()))
    assert without.total - static == pytest.approx(max(sum(v.values()) for v in without.phases.values()))
    assert 0 < without.total / GIB < with_p.total / GIB
    with pytest.raises(ValueError, match="text_encoders"):
        PlanInput("sd15", text_encoders="gpu")


def test_memory_table_recommends_the_cheapest_setting_that_fits():
    """tools/scaling_model.py --memory on SD1.5 (the big presets take long on meta): with 24 GiB per GPU the
    cheapest setting (no checkpointing, ZeRO-2, everything replicated) is recommended on 8 GPUs; with 10 GiB
    (a budget of 7: 90 % less the 2 GiB reserve) the recommendation is the first in the preference order that
    fits, and every setting before it does not fit."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("scaling_model", REPO / "tools" / "scaling_model.py")
    scaling_model = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling_model)

    rows = {}
    for mem in (24.0, 10.0):
        args = argparse.Namespace(memory_presets=["sd15"], memory_gpus=[8, 64], gpu_mem_gib=mem)
        rows[mem] = scaling_model.memory_table(args)
    order = scaling_model.memory_candidates()
    assert order[0] == (False, 2, False, "replicated") and order[-1] == (True, 3, True, "partitioned")
    assert [(r["grad_checkpointing"], r["zero"], r["teacher_partitioned"], r["text_encoders"]) for r in rows[24.0]] \
        == order
    assert rows[24.0][0].get("recommended_8") and rows[24.0][0]["max_mb_8"] >= 1
    small = rows[10.0]
    rec = [i for i, r in enumerate(small) if r.get("recommended_8")]
    assert len(rec) == 1 and rec[0] > 0, [(r["max_mb_8"]) for r in small]
    assert all(r["max_mb_8"] == 0 for r in small[:rec[0]]) and small[rec[0]]["max_mb_8"] >= 1
    assert sum(bool(r.get("recommended_64")) for r in small) <= 1


def test_pure_bf16_and_sida_in_the_memory_plan():
    """pure_bf16: per parameter 2 B weights + a 2 B master and 2 x 2 B Adam moments per 1/N partition, bf16
    gradients, no fp32 gradient copy, the EMA still fp32 (closed forms on the preset's count). SiDA: the fake
    phase adds one trainable conditional forward on the micro-batch of real samples (the measured per-sample
    bytes of a trainable forward, the same number the DSM call's term uses) and the real captions' encoded
    conditioning (counted from the tensor shapes: SD1.5's 77 x 768 CLIP states + its int64 timestep); the real
    latents' prefetch is host memory: latent elements x 4 B x micro-batch x prefetch x workers."""
    from sidscale.perf.memory_plan import PlanInput, plan
    from sidscale.perf.preset_costs import activation_bytes_per_sample, param_counts

    p, _ = param_counts("sd15")
    n, mb = 8, 2
    bf = plan(PlanInput("sd15", gpus=n, zero=2, micro_batch=mb), micro_batch=mb)
    pure = plan(PlanInput("sd15", gpus=n, zero=2, micro_batch=mb, precision="pure_bf16"), micro_batch=mb)
    assert pure.terms["generator_params"] == bf.terms["generator_params"] == 2 * p
    assert pure.terms["generator_bf16_master"] == 2 * p / n and "generator_fp32_master" not in pure.terms
    assert pure.terms["fake_adam_states"] == 4 * p / n and bf.terms["fake_adam_states"] == 8 * p / n
    assert pure.terms["ema_fp32"] == bf.terms["ema_fp32"] == 4 * p / n
    assert pure.phases["optimizer_step"] == {"grads": 2 * p / n, "bf16_grad_copy": 2 * p / n}
    assert bf.phases["optimizer_step"]["grads"] == 4 * p / n  # fp32 accumulation in bf16 mode
    static = {k: v for k, v in bf.terms.items() if "(" not in k}
    pure_static = {k: v for k, v in pure.terms.items() if "(" not in k}
    assert sum(static.values()) - sum(pure_static.values()) == pytest.approx(2 * (2 + 4) * p / n)
    assert pure.host == {} and bf.phases["fake_backward"].keys() == {"activations", "grads", "grad_buckets"}

    sida = plan(PlanInput("sd15", gpus=n, zero=2, micro_batch=mb, adversarial=True, real_workers=3),
                micro_batch=mb)
    fb = sida.phases["fake_backward"]
    assert fb["real_call_activations"] == mb * activation_bytes_per_sample("sd15", "bf16", True, False)
    assert fb["real_call_activations"] == pytest.approx(bf.phases["fake_backward"]["activations"] / 2)  # CFG: 2 mb
    assert fb["real_text_condition"] == mb * (2 * 77 * 768 + 8)  # bf16 CLIP states + the int64 timestep
    assert sida.host == {"real_latent_prefetch": 4 * 4 * 64 * 64 * mb * 2 * 3}
    others = {k: v for k, v in sida.phases.items() if k != "fake_backward"}
    assert others == {k: v for k, v in bf.phases.items() if k != "fake_backward"}  # the G phase: no new call
    assert sida.max_micro_batch <= bf.max_micro_batch


def test_sida_and_pure_bf16_in_the_scaling_model():
    """SiDA adds one forward and one trainable backward of the fake net per micro-batch (FLOPs: 3 forwards'
    worth, 4 with checkpointing; ZeRO-3: one more gather of F's modules in each); pure_bf16 halves the
    optimizer partitions a checkpoint writes (2 B master + 4 B Adam instead of 4 + 8)."""
    from sidscale.bench.scaling import checkpoint_bytes_per_rank, net_calls_per_micro_batch

    for ck in (False, True):
        base = Setup(gpus=8, zero=3, grad_checkpointing=ck)
        sida = dataclasses.replace(base, adversarial=True)
        assert forward_equivalents_per_sample(sida) - forward_equivalents_per_sample(base) == 3 + ck
        plain, adv = net_calls_per_micro_batch(base), net_calls_per_micro_batch(sida)
        assert adv["fake"] == {"fwd": plain["fake"]["fwd"] + 1, "bwd_trainable": plain["fake"]["bwd_trainable"] + 1,
                               "bwd_frozen": plain["fake"]["bwd_frozen"]}
        assert adv["generator"] == plain["generator"] and adv["teacher"] == plain["teacher"]
    p, n = 10**9, 8
    for zero in (2, 3):
        s = Setup(gpus=n, zero=zero)
        working = 2 * p / n if zero == 3 else 2 * p
        assert checkpoint_bytes_per_rank(p, s) == 2 * (12 * p / n + working) + 4 * p / n
        assert checkpoint_bytes_per_rank(p, dataclasses.replace(s, precision="pure_bf16")) == (
            2 * (6 * p / n + working) + 4 * p / n)

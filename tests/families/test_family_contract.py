"""The family contract, run on every registered family (``sidscale.families.SPECS``) automatically.

Each family's tiny teacher is written by its spec and loaded through the real loader; then:
encoding = diffusers' own ``encode_prompt`` of the family's pipeline (where it has one); the
prediction function = a direct call of the network (timestep convention, latent packing, v -> eps);
the teacher's sampler in one step = ``to_x0`` of one prediction at the first level; an export loads in
plain diffusers with its weights and samples as the network does; every bench /
plan preset of the family resolves to networks and a memory-plan entry; the config rules of the
spec raise the config's own messages."""

from __future__ import annotations

import pytest
import torch

from sidscale.config import load_config
from sidscale.families import SPECS, family_for_kind, spec_for_preset, validate_family_config

PROMPTS = ["a red circle", "photo of a dog zebra", " ".join(["red circle"] * 50)]  # the last one truncates
FAMILIES = sorted(SPECS)


def tiny_config(spec, path):
    return load_config("toy", [*spec.tiny_overrides, f"teacher.path={path}", "teacher.dtype=fp32"])


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """family name -> (config, teacher) of its tiny teacher, each written and loaded once per session."""
    cache = {}

    def get(name):
        if name not in cache:
            spec = SPECS[name]
            path = spec.write_tiny(tmp_path_factory.mktemp(f"contract-{name}") / "teacher", seed=0)
            cfg = tiny_config(spec, path)
            cache[name] = cfg, family_for_kind(spec.tiny_kind).load_teacher(cfg, "cpu")
        return cache[name]

    return get


# --------------------------------------------------------------- diffusers' own encode_prompt, per pipeline
def _sd_reference(teacher, prompts):
    from diffusers import StableDiffusionPipeline

    c = teacher.conditioner
    pipe = StableDiffusionPipeline(vae=teacher.vae, text_encoder=c.text_encoder, tokenizer=c.tokenizer,
                                   unet=teacher.net, scheduler=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
    return {"encoder_hidden_states": embeds}, 0.0


def _sd3_reference(teacher, prompts):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(teacher.path, local_files_only=True)
    length = teacher.conditioner.max_sequence_length
    pe, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                          max_sequence_length=length)
    return {"encoder_hidden_states": pe, "pooled_projections": pooled}, 1e-6


def _flux_reference(teacher, prompts):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(teacher.path, local_files_only=True)
    pe, pooled, _ = pipe.encode_prompt(prompts, None, max_sequence_length=teacher.conditioner.max_sequence_length)
    return {"encoder_hidden_states": pe, "pooled_projections": pooled}, 0.0


# pipeline class -> (conditioning it encodes, tolerance); a family with a new pipeline adds its line here
ENCODE_REFERENCE = {"StableDiffusionPipeline": _sd_reference, "StableDiffusion3Pipeline": _sd3_reference,
                    "FluxPipeline": _flux_reference}


@pytest.mark.parametrize("name", FAMILIES)
def test_encode_is_the_pipelines_encode_prompt(tiny, name):
    cfg, teacher = tiny(name)
    pipeline = teacher.family.pipeline_class_name(teacher.kind)
    if pipeline is None:  # the toy teachers are no diffusers pipeline: the CLIP encoder's last states
        with torch.no_grad():
            c = teacher.conditioner
            ids = c.tokenizer(PROMPTS, padding="max_length", max_length=c.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
            want, tol = {"encoder_hidden_states": c.text_encoder(ids)[0]}, 0.0
    else:
        assert pipeline in ENCODE_REFERENCE, f"{pipeline}: add how to call its encode_prompt to ENCODE_REFERENCE"
        with torch.no_grad():
            want, tol = ENCODE_REFERENCE[pipeline](teacher, PROMPTS)
    got = teacher.conditioner.encode(PROMPTS)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=tol)
    # the trainer's path (ids from the data workers) gives the same conditioning
    again = teacher.conditioner.encode_ids(teacher.conditioner.tokenize(PROMPTS))
    assert all(torch.equal(again[k], v) for k, v in got.items())


# --------------------------------------------------------------- prediction function = the network's call
def _direct_prediction(teacher, cfg, x, level, cond):
    """The network called by hand, as its diffusers pipeline calls it, in the schedule's convention."""
    net, name = teacher.net, type(teacher.net).__name__
    if name == "UNet2DConditionModel":
        from sidscale.families.shared.clip import unet_kwargs
        from sidscale.families.toy.fit import TIME_SCALE as FITTED  # the flow toy is fitted with timestep 1000 sigma

        if hasattr(teacher.schedule, "alphas_cumprod"):  # VP: timestep t, eps (v-prediction converted)
            out = net(x, level, **unet_kwargs(cond)).sample
            return teacher.schedule.model_output_to_eps(x, out, level)
        assert FITTED == 1000.0
        return net(x, level * 1000.0, **unet_kwargs(cond)).sample
    if name == "SD3Transformer2DModel":  # StableDiffusion3Pipeline: timestep = 1000 sigma
        return net(hidden_states=x, encoder_hidden_states=cond["encoder_hidden_states"],
                   pooled_projections=cond["pooled_projections"], timestep=level * 1000.0).sample
    if name == "FluxTransformer2DModel":
        from diffusers import FluxPipeline

        b, c, h, w = x.shape
        text = cond["encoder_hidden_states"]
        guidance = torch.full((b,), teacher.schedule.guidance["teacher"]) if net.config.guidance_embeds else None
        # FluxPipeline: timestep = sigma (its 0..1000 scheduler timesteps / 1000)
        out = net(hidden_states=FluxPipeline._pack_latents(x, b, c, h, w), encoder_hidden_states=text,
                  pooled_projections=cond["pooled_projections"], timestep=level, guidance=guidance,
                  img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype),
                  txt_ids=torch.zeros(text.shape[1], 3)).sample
        return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)
    raise AssertionError(f"{name}: add how its pipeline calls it to _direct_prediction")


def _first_level(teacher):
    """The sampler's first noise level: t = T - 1 (VP DDIM) or sigma = 1 (flow)."""
    return float(teacher.schedule.num_train_timesteps - 1) if hasattr(teacher.schedule, "alphas_cumprod") else 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_prediction_fn_is_the_network_call(tiny, name):
    cfg, teacher = tiny(name)
    cond = teacher.conditioner.encode(PROMPTS[:2])
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(0))
    vp = hasattr(teacher.schedule, "alphas_cumprod")
    level = torch.tensor([999, 300]) if vp else torch.tensor([0.9, 0.3])
    with torch.no_grad():
        got = teacher.family.prediction_fn(teacher.net, teacher.schedule, role="teacher")(x, level, cond)
        want = _direct_prediction(teacher, cfg, x, level, cond)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_teacher_sampler_one_step_is_x0_of_one_prediction(tiny, name):
    """One step of the teacher's sampler from x_T (DDIM from T - 1; flow Euler from sigma = 1 to 0, on
    the family's own sigma grid) is the x0 its prediction at the first level implies."""
    cfg, teacher = tiny(name)
    cond = teacher.conditioner.encode(PROMPTS[:2])
    x_T = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(1))
    got = teacher.family.teacher_sampler(teacher, cond, None, 1.0, 1, x_T=x_T)
    level = _first_level(teacher)
    vp = hasattr(teacher.schedule, "alphas_cumprod")
    levels = torch.full((2,), int(level)) if vp else torch.full((2,), level)
    with torch.no_grad():
        pred = _direct_prediction(teacher, cfg, x_T, levels, cond).float()
    want = teacher.schedule.eps_to_x0(x_T, pred, int(level)) if vp else x_T - level * pred
    assert got.shape == x_T.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_discriminator_readout_is_the_features_before_the_decoder(tiny, name):
    """The adversarial method's logits (``discriminator_readout``) for a CFG call of the prediction function:
    the conditional half of the features entering the UNet's mid block (channel mean, one logit per position)
    or the transformer's proj_out (token mean, one logit per channel), read here by a pre-hook."""
    from sidscale.method.guidance import guided_eps

    cfg, teacher = tiny(name)
    net = teacher.net
    cond, uncond = teacher.conditioner.encode(PROMPTS[:2]), teacher.conditioner.empty(2)
    x = torch.randn(2, *teacher.latent_shape, generator=torch.Generator().manual_seed(2))
    vp = hasattr(teacher.schedule, "alphas_cumprod")
    level = torch.tensor([700, 200]) if vp else torch.tensor([0.8, 0.2])
    unet = type(net).__name__ == "UNet2DConditionModel"
    seen = []
    pool = (lambda h: h.float().mean(1).flatten(1)) if unet else (lambda h: h.float().mean(1))
    handle = (net.mid_block if unet else net.proj_out).register_forward_pre_hook(
        lambda m, args: seen.append(pool(args[0])))
    fn = teacher.family.prediction_fn(net, teacher.schedule, role="fake")
    try:
        with torch.no_grad():
            _, logits = teacher.family.discriminator_readout(net).logits(
                lambda: guided_eps(fn, x, level, cond, uncond, 2.0), 2)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0].shape[0] == 4  # one call of batch [uncond; cond]
    torch.testing.assert_close(logits, seen[0][2:])
    if not unet:  # one logit per channel of the transformer's width
        assert logits.shape[1] == net.config.num_attention_heads * net.config.attention_head_dim


# --------------------------------------------------------------- export round trip
@pytest.mark.parametrize("name", FAMILIES)
def test_export_loads_in_plain_diffusers_and_samples_with_its_weights(tiny, name, tmp_path):
    """A generator exported as training exports it (``export_generator`` with the run's ``sampling_meta``):
    plain diffusers loads its network folder, by the class its config names, with exactly the exported
    weights (and the whole pipeline, where the family has a diffusers pipeline); the export's sampler
    (``FewStepPipeline.from_export``: network, text side and schedule read back from the export) gives the
    K-step generation of those weights with the teacher's own conditioner and schedule."""
    import copy
    import json
    from types import SimpleNamespace

    import diffusers

    from sidscale.export import export_generator, read_export_meta
    from sidscale.method.sid_lsg import MethodSettings, multi_step_generate
    from sidscale.outputs import sampling_meta
    from sidscale.sample import FewStepPipeline, seeded_generator_noises

    cfg, teacher = tiny(name)
    family = teacher.family
    g = torch.Generator().manual_seed(4)
    # every weight moved, as a trained generator's EMA is: an export of the teacher's own weights would fail
    ema = {k: (v.detach() + 0.01 * torch.randn(v.shape, generator=g)) for k, v in teacher.net.named_parameters()}
    settings = MethodSettings.from_config(cfg.method)
    run = SimpleNamespace(teacher=teacher, settings=settings, schedule=teacher.schedule, family=family, cfg=cfg,
                          step=7, images_seen=56)
    out = export_generator(ema, dict(teacher.net.config), tmp_path / "export", sampling_meta(run))

    folder = out / family.network_folder
    cls = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
    nets = [cls.from_pretrained(folder)]
    pipeline = family.pipeline_class_name(cfg.teacher.kind)
    if pipeline is not None:
        pipe = diffusers.DiffusionPipeline.from_pretrained(out, local_files_only=True)
        assert type(pipe).__name__ == pipeline
        nets.append(getattr(pipe, family.network_folder))
    for net in nets:
        loaded = dict(net.named_parameters())
        assert loaded.keys() == ema.keys()
        assert all(torch.equal(loaded[k], v) for k, v in ema.items())
    meta = read_export_meta(out)
    assert (meta["teacher_kind"], meta["generator_steps"], meta["step"]) == (cfg.teacher.kind,
                                                                              settings.generator_steps, 7)

    prompts, seeds = PROMPTS[:2], [3, 4]
    got = FewStepPipeline.from_export(out).latents(prompts, seeds)
    generator = copy.deepcopy(teacher.net)
    generator.load_state_dict(ema, strict=False)  # parameters only: buffers are the teacher's (unchanged)
    noises = seeded_generator_noises(seeds, teacher.latent_shape, settings.generator_steps)
    with torch.no_grad():
        want = multi_step_generate(family.prediction_fn(generator, teacher.schedule), teacher.schedule, noises,
                                   teacher.conditioner.encode(prompts), settings)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- presets: networks and a memory-plan entry
@pytest.mark.parametrize("name", FAMILIES)
def test_every_preset_has_networks_and_a_memory_plan_entry(name):
    from sidscale.families.presets import latent_shape, preset_nets
    from sidscale.perf.preset_costs import param_counts

    spec = SPECS[name]
    for preset in spec.presets:
        assert spec_for_preset(preset) is spec
        nets = preset_nets(preset)
        assert len(latent_shape(preset)) == 3 and nets.teacher_kind(preset) in spec.kinds
        net_params, text_params = param_counts(preset)
        assert net_params > 0 and text_params > 0
    if spec.presets:
        assert spec.checkpoint_block_types()  # gradient checkpointing knows which blocks to wrap


# --------------------------------------------------------------- config rules: the spec's = the config's
@pytest.mark.parametrize(("kind", "changes"), [
    ("flux", {"teacher.t5": False}),
    ("flux", {"teacher.max_sequence_length": 600}),
    ("sd", {"distilled_guidance.teacher": 2.0}),
    ("toy", {"distilled_guidance.mode": "bogus"}),
    ("flux", {"distilled_guidance.mode": "official", "distilled_guidance.teacher": 2.0}),
    ("flux", {"distilled_guidance.fake": -1.0}),
    ("sd3", {"distilled_guidance.generator": -1.0}),
])
def test_spec_config_rules_raise_the_configs_messages(kind, changes):
    from sidscale.config import ConfigError, validate

    cfg = load_config("toy", [f"teacher.kind={kind}", "teacher.path=/x"])
    validate_family_config(cfg)  # valid as loaded
    for key, value in changes.items():  # set after loading: load_config validates
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as by_config:
        validate(cfg)
    with pytest.raises(ConfigError) as by_spec:
        validate_family_config(cfg)
    assert str(by_spec.value) == str(by_config.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_tiny_config_passes_the_family_rules(tiny, name):
    cfg, _ = tiny(name)
    validate_family_config(cfg)


def test_register_family_adds_an_out_of_tree_family(monkeypatch):
    import dataclasses

    import sidscale.families as families

    monkeypatch.setattr(families, "SPECS", dict(SPECS))
    monkeypatch.setattr(families, "TEACHER_KINDS", families.TEACHER_KINDS)
    sd3 = SPECS["sd3"]
    with pytest.raises(ValueError, match="taken"):
        families.register_family(dataclasses.replace(sd3, name="mine"))  # kind sd3 is served already
    mine = dataclasses.replace(sd3, name="mine", adapters={"mine": sd3.adapters["sd3"]}, presets=())
    families.register_family(mine)
    assert families.TEACHER_KINDS[-1] == "mine" and families.spec_for_kind("mine") is mine
    assert family_for_kind("mine") is family_for_kind("sd3") and families.SPECS["mine"] is mine

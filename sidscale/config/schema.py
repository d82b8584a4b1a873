"""The run configuration's schema: one dataclass per section, every field with its default.

Field names are an interface: other modules read them directly (``cfg.train.max_steps``). The
defaults are the authors' SD1.5 SiD-LSG recipe. Loading (YAML, presets, ``--set``) is
``sidscale.config.loading``; the checks of values are ``sidscale.config.checks``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The built-in toy teachers (fitted once, cached under teacher.cache_dir when teacher.path is ""):
# toy = VP / eps, toy_flow = rectified flow / velocity (sidscale/families/toy/fit.py).
TOY_KINDS = ("toy", "toy_flow")


@dataclass
class TeacherConfig:
    # toy | sd | sdxl (UNet, VP) | sd3 (SD3 / SD3.5 MMDiT, rectified flow) | flux (FLUX.1, rectified flow)
    # | toy_flow (UNet, flow)
    kind: str = "toy"
    path: str = ""  # local diffusers directory; "" only for kinds toy / toy_flow (built-in teachers)
    cache_dir: str = "~/.cache/sidscale"  # where the toy teacher is fitted and cached
    dtype: str = "bf16"  # frozen teacher + text encoders: fp32 | bf16 | fp16
    prediction_type: str = "auto"  # auto (teacher's scheduler) | epsilon | v_prediction
    resolution: int = 512  # image size in pixels
    grad_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa (torch SDPA, diffusers AttnProcessor2_0) | eager (reference, more memory)
    channels_last: bool = False  # teacher UNet weights in NHWC (GPU conv speed; the teacher only)
    # SD3 family: the T5 encoder (off: zeros in its place, as diffusers does without text_encoder_3,
    # and 9 GB of T5-XXL never loaded) and its token count (SiD-DiT: 77; diffusers' pipeline: 256).
    # FLUX: T5 is its only text sequence (t5 must stay true); SiD-DiT and FluxPipeline use 512 tokens.
    t5: bool = True
    max_sequence_length: int = 77
    # Where the text encoders run: gpu (on every rank's device) | cpu (host memory; only their outputs go
    # to the device: saves T5-XXL's 9 GB per GPU, costs CPU encodes in the critical path; models/host_conditioner.py)
    text_encoders: str = "gpu"
    # The frozen teacher network: true = partitioned across the ranks by an optimizer-less ZeRO-3
    # engine (1/N of its weights per rank, gathered layer by layer while it runs); false = a full copy
    # per rank; auto = replicated where the memory plan (sidscale/perf) says the run fits, else
    # partitioned (the choice is logged). YAML's true/false are accepted as well as the strings.
    partitioned: str = "auto"

    @property
    def is_toy(self) -> bool:
        """A built-in toy teacher (pixel space, exact mixture samples: the toy evaluation applies)."""
        return self.kind in TOY_KINDS


@dataclass
class ScheduleConfig:
    # Training never reads these: the teacher's scheduler_config.json is the schedule (the VP family
    # warns when they differ from it). They stay keys: presets, dumped run configs and checkpoints carry
    # them, and method.t_* are checked against num_train_timesteps.
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"  # scaled_linear | linear


@dataclass
class AdversarialConfig:
    """Data-aided adversarial SiD (SiDA; SiD-DiT's Diffusion-GAN): real latents + captions from
    ``data.real_shards``; the fake score net doubles as the discriminator (its own features, pooled to
    logits: no new parameters), trained in the fake phase; the generator adds a non-saturating term.
    docs/adversarial.md. Defaults: the authors' SiD-DiT values."""

    enabled: bool = False
    disc_scale: float = 1.0  # lsd: the discriminator's BCE term beside the fake net's DSM loss
    gen_scale: float = 1.0  # lsg_gan: the generator's adversarial term (SiDA on EDM UNets: 0.01)
    disc_warmup_kimg: float = 20.0  # no generator step while images_seen <= this x 1000 (discriminator warm-up)
    mix_after_kimg: float = 40.0  # SiD loss only until then; after: (1 - mix_weight) L_sid + mix_weight L_adv
    mix_weight: float = 0.5
    logit_clamp: float = 10.0  # logits clamped to [-c, c] before the BCE (zero gradient outside)


@dataclass
class MethodConfig:
    name: str = "sid_lsg"
    cfg_train_fake: float = 1.5  # k1: CFG on the fake net in its own DSM loss
    cfg_eval_fake: float = 1.5  # k2 = k3: CFG on the fake net inside the generator loss
    cfg_eval_real: float = 1.5  # k4: CFG on the teacher inside the generator loss
    alpha: float = 1.0
    t_init: int = 625  # the generator's single timestep
    t_min: int = 20  # t ~ UniformInt{t_min .. t_max - 1}
    t_max: int = 980
    prompt_dropout: float = 0.1
    fake_loss_scale: float = 1.0
    gen_loss_scale: float = 1.0
    # K-step generator (1 = SiD-LSG's one step). Each iteration trains step k for one k in 1..K.
    generator_steps: int = 1
    # generator loss weighting lambda per sample (docs/method.md): sid_legacy (divide by SiD-LSG's mean
    # |x_g - y_real|), one_minus_sigma (SiD-DiT's default for flow teachers), one_minus_sigma_squared,
    # one_over_sigma, one_over_sigma_squared, snr_sqrt, snr (sigma: the flow noise level of the loss
    # timestep; a VP teacher's flow equivalent). The authors' spellings (1_minus_sigma, ...) are accepted.
    gen_weighting: str = "sid_legacy"
    # the noise each step i >= 1 of a K-step generator adds: fresh (a new draw per step), fixed (the
    # initial z again), ddim (the noise the previous step's prediction implies). Training and sampling.
    noise_type: str = "fresh"
    # false = Zero-CFG's fake net: always called with the empty prompt (set cfg_eval_real: 1 with it).
    # Anti-CFG is a negative cfg_train_fake / cfg_eval_fake.
    fake_text: bool = True
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    # flow-matching teachers (SD3): the generator's first sigma and the loss sigmas' logit-normal
    sigma_init: float = 1.0
    sigma_logit_mean: float = 0.6931471805599453  # ln 2 (median sigma 2/3), SiD-DiT
    sigma_logit_std: float = 1.6


@dataclass
class DistilledGuidanceConfig:
    """Guidance-distilled teachers (teacher.kind flux with guidance_embeds, FLUX.1-dev): the guidance
    scale each net gets as its guidance EMBEDDING (an input of the network, not CFG).
    mode official (the flux_dev preset, SiD-DiT's FLUX code): teacher and fake net take each call's
    method.cfg_* scale as embedding AND as true-CFG scale (teacher / fake below are not read);
    mode per_role: the fixed embeddings below, true CFG on top = the cfg_* scales (1 = off)."""

    mode: str = "per_role"
    teacher: float = 3.5  # FLUX.1-dev's default (FluxPipeline guidance_scale)
    fake: float | None = None  # null = the teacher's: the fake net models G's output at the teacher's guidance
    generator: float = 1.0  # SiD-DiT calls the generator with embedding 1.0, in training and sampling


@dataclass
class NetConfig:
    """Optimizer and memory settings of one trainable net (generator or fake score)."""

    lr: float = 1e-6
    betas: tuple[float, float] = (0.0, 0.999)
    # Adam eps; null = the method's default: 1e-8, or 1e-6 when train.precision = fp16, 1e-4 when pure_bf16
    # (docs/method.md 6, docs/precision.md).
    eps: float | None = None
    weight_decay: float = 0.0
    # Clip every gradient entry to [-v, v] right before Adam (after loss-scale unscaling, accumulation
    # and the data-parallel reduction); null = 1.0 when train.precision = fp16 or pure_bf16 (docs/precision.md), off
    # otherwise; 0 = off.
    grad_clip_value: float | None = None
    grad_checkpointing: bool = False


@dataclass
class TrainConfig:
    global_batch: int = 512
    micro_batch: int = 1  # per rank
    max_steps: int = 20000
    seed: int = 0
    # fp32 | bf16 (fp32 masters + Adam, bf16 compute) | fp16 | pure_bf16 (the authors' bf16: bf16 weights,
    # gradients and Adam states; Adam eps 1e-4 and gradient value clip 1 by default: docs/precision.md)
    precision: str = "bf16"
    ema_halflife_kimg: float = 50.0
    ema_rampup_ratio: float = 0.05  # halflife = min(halflife, ratio * images_seen); 0 disables
    log_every: int = 10
    preview_every: int = 500
    ckpt_every: int = 500
    keep_last: int = 3
    export_at_end: bool = True
    # the export copies the teacher's text encoders / tokenizers / VAE / scheduler (self-contained);
    # true: symlinks them instead (no disk, but the export then needs the teacher directory)
    export_link_frozen: bool = False
    # torch.compile of the three UNets (generator, fake, teacher). Off by default: measure it
    # first (tools/bench.py --compile); the first iterations pay the compilation. ZeRO-1/2 only.
    compile: bool = False
    compile_backend: str = "inductor"  # a torch.compile backend: inductor | aot_eager | eager
    # share of each device the memory plan may fill (teacher.partitioned=auto, tools/memory_plan.py): the rest
    # is the caching allocator's fragmentation; a GPU also keeps a fixed reserve (sidscale/perf/memory_plan.py)
    memory_fraction: float = 0.9


@dataclass
class DataConfig:
    shards: str = ""  # brace pattern of webdataset tars, a manifest.json, or "toy"
    # real (latent or image, caption) pairs for method.adversarial: tars of KEY.latent.npy or KEY.{png,jpg,
    # webp} + KEY.txt (tools/make_real_shards.py), a manifest.json, or "toy" (the toy mixture's exact samples)
    real_shards: str = ""
    num_workers: int = 2
    shuffle_buffer: int = 1000
    resampled: bool = True


@dataclass
class DeepSpeedSection:
    config: str = "ds_configs/zero2.json"  # relative: against the cwd, then the repo root


def _default_preview_prompts() -> list[str]:
    return [
        "a photo of an astronaut riding a horse on the moon",
        "a red fox sitting in fresh snow, highly detailed",
        "a bowl of fruit on a wooden table, studio lighting",
        "a lighthouse on a cliff at sunset, oil painting",
    ]


@dataclass
class PreviewConfig:
    prompts: list[str] = field(default_factory=_default_preview_prompts)
    seeds_per_prompt: int = 2


@dataclass
class EvalConfig:
    num_samples: int = 2000  # toy Frechet sample count; 0 = no toy evaluation at the end
    teacher_steps: int = 25


@dataclass
class DistConfig:
    # Seconds any collective may wait for the slowest rank before the job fails (NCCL: the watchdog
    # ends the process; gloo: the call raises). It bounds a hang on a stuck rank, and must exceed
    # the longest rank-0-only work the other ranks wait for (checkpoint pruning, export, previews,
    # the toy evaluation, fitting the toy teacher): raise it for slow filesystems.
    timeout_s: int = 600


@dataclass
class Config:
    resume: bool = True  # resume from RUN/checkpoints/latest; false refuses a non-empty run dir
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    generator: NetConfig = field(default_factory=NetConfig)
    fake: NetConfig = field(default_factory=NetConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    distilled_guidance: DistilledGuidanceConfig = field(default_factory=DistilledGuidanceConfig)

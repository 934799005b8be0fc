"""Typed configuration: dataclasses, layered TOML files and `key=value` overrides.

Precedence (later wins): the dataclass defaults (DDPO's settings for SD v1.x; each algorithm's
section is defined, with its validation, in its own module under herd_jax/algorithms/) <
`--config FILE` (repeatable, e.g. configs/tiny.toml) < command-line `section.key=value`
overrides. Unknown keys, wrong types and values outside a `Literal`'s choices are one-line
`ConfigError`s that name the valid keys or choices; `validate` checks ranges and divisibility.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import tomllib
import typing
from typing import Any, Literal, Sequence

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


from herd_jax.algorithms.ddpg import DdpgConfig
from herd_jax.algorithms.dpok import DpokConfig
from herd_jax.algorithms.grpo import GrpoConfig
from herd_jax.algorithms.herd import HerdConfig
from herd_jax.errors import ConfigError  # re-exported: config.ConfigError
from herd_jax.metrics import LogWith
from herd_jax.trainable import Mode as TrainableMode


@dataclasses.dataclass
class SampleConfig:
    """Rollouts: DDIM sampling with eta > 0 and classifier-free guidance."""

    num_steps: int = 50
    eta: float = 1.0
    guidance_scale: float = 5.0
    batch_size: int = 8  # samples per rollout call, over all devices
    num_batches_per_epoch: int = 4
    negative_prompt: str = ""


@dataclasses.dataclass
class TrainConfig:
    """Policy updates (DDPO defaults)."""

    learning_rate: float = 1e-5
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    batch_size: int = 4  # samples per optimizer update (minibatch)
    num_inner_epochs: int = 1
    timestep_fraction: float = 1.0  # fraction of each trajectory's steps trained on
    timestep_batch: int = 1  # timesteps one gradient call stacks along the batch (at most: the largest divisor of the trained steps); same update, faster on small models, activation memory grows with it
    estimator: Literal["is", "sf"] = "is"  # "is": clipped importance sampling; "sf": score function (on-policy only)
    clip_range: float = 1e-4  # ε of the ratio clip: PPO's (ddpo, ddpg, herd, grpo) and DPOK's clamp
    adv_clip: float = 5.0
    per_prompt_stats: bool = True
    stats_window: int = 16
    stats_min_count: int = 16
    update_loop: Literal["auto", "scan", "host"] = "auto"  # scan: one jitted update (lax.scan loops); host: Python loops over jitted steps (faster on XLA:CPU); auto: host on CPU, else scan
    trainable: TrainableMode = "all"  # all | filter (params matching trainable_pattern) | lora (adapters on them)
    trainable_pattern: str = "attn[12]/to_(q|k|v|out_0)/kernel$"  # regex over UNet param paths "a/b/kernel"
    lora_rank: int = 4
    lora_alpha: float = 4.0


@dataclasses.dataclass
class RewardConfig:
    """Which reward scores the images, and where its weights live."""

    name: str = "imagereward"
    # aesthetic: CLIP ViT-L/14 (diffusers/transformers directory or hub id) + LAION MLP head (.pth).
    aesthetic_clip: str = "openai/clip-vit-large-patch14"
    aesthetic_head: str = ""
    batch_size: int = 32  # images per forward pass of a model-based reward (aesthetic)
    # imagereward: checkpoint (local ImageReward.pt or hub name), its med_config.json, a local BERT vocab
    # directory (offline), and the python of the environment built by install_image_reward.sh.
    imagereward_checkpoint: str = "ImageReward-v1.0"
    imagereward_med_config: str = ""
    imagereward_bert: str = ""
    imagereward_python: str = ""
    timeout_s: float = 300.0
    max_restarts: int = 3
    # color_success: 1 when the named colour's score (0-1) exceeds this; 1/8 is a grey image's score.
    success_threshold: float = 0.125


@dataclasses.dataclass
class AlgorithmConfig:
    """Which algorithm turns rewards into updates (see README and DESIGN.md)."""

    name: str = "herd"


@dataclasses.dataclass
class EvalConfig:
    """Evaluation during training: fixed prompts × fixed seeds, the same noise every time (logged as eval/, grids in run_dir/samples/)."""

    every: int = 10  # epochs between evaluations (0: never); also before the first epoch and after the last
    prompts: str = ""  # a prompt set or file; default: the run's first `num_prompts` prompts
    num_prompts: int = 8
    seeds: int = 4  # seeds 0..seeds-1 per prompt

    def validate(self, cfg: Any, num_devices: int) -> None:
        for key in ("every",):
            if getattr(self, key) < 0:
                raise ConfigError(f"eval.{key} must be >= 0 (0: no evaluation), got {getattr(self, key)}")
        for key in ("num_prompts", "seeds"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be positive, got {getattr(self, key)}")


@dataclasses.dataclass
class LoggingConfig:
    log_with: LogWith = "wandb"  # wandb (offline without login), tensorboard or none
    image_every: int = 10  # log an image grid every N epochs (0: never)


@dataclasses.dataclass
class CheckpointConfig:
    """Orbax checkpoints of the whole TrainState in run_dir/checkpoints (see herd_jax/checkpoint.py)."""

    save_every: int = 10  # save every N epochs and at the end (0: no checkpoints)
    keep: int = 3  # keep the newest K checkpoints
    async_save: bool = True  # write in a background thread while training goes on


@dataclasses.dataclass
class ModelOptions:
    """How the models compute and store their weights (none of it changes the params or, beyond float noise, the results)."""

    attention: Literal["auto", "xla", "cudnn", "chunked"] = "auto"  # auto: cuDNN flash attention on a GPU in bf16, else XLA; chunked: memory-efficient (long sequences on TPU/CPU)
    remat: Literal["none", "blocks", "dots"] = "blocks"  # UNet rematerialisation in the train step (rollouts never need it): blocks recomputes each resnet/transformer block in the backward pass (~1.3x the step's FLOPs; SD v1.5 at 512 px does not fit a GPU without it); none: fastest where memory allows
    frozen_dtype: Literal["float32", "bfloat16"] = "float32"  # dtype the frozen copies are stored in: VAE, the LoRA base UNet, the pretrained UNet of ddpg/dpok/grpo with KL


@dataclasses.dataclass
class ParallelConfig:
    """How the devices share the work: the batch is always split over the `data` mesh axis."""

    fsdp: bool = False  # also shard UNet params, gradients and optimizer state (and the frozen UNet copies) over `data` (FSDP/ZeRO-3); XLA gathers each weight where it is used


@dataclasses.dataclass
class Config:
    """Everything a run needs; saved beside each checkpoint."""

    model: str = DEFAULT_MODEL  # diffusers-format SD v1.x directory, hub id, or "tiny"
    prompts: str = "animals"  # a built-in prompt set (animals, color) or a text file, one prompt per line
    run_dir: str = ""  # default: runs/<timestamp>
    seed: int = 0
    num_epochs: int = 100
    precision: Literal["fp32", "bf16"] = "fp32"  # fp32 | bf16: compute dtype of rollouts and training (params, log-probs stay float32)
    model_options: ModelOptions = dataclasses.field(default_factory=ModelOptions)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    ddpg: DdpgConfig = dataclasses.field(default_factory=DdpgConfig)
    herd: HerdConfig = dataclasses.field(default_factory=HerdConfig)
    dpok: DpokConfig = dataclasses.field(default_factory=DpokConfig)
    grpo: GrpoConfig = dataclasses.field(default_factory=GrpoConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Checks (and where lossless, converts) a value to the field's type."""
    if typ is bool:
        if isinstance(value, bool):
            return value
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif typ is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(typ) is Literal:
        choices = typing.get_args(typ)
        if value in choices:
            return value
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(map(str, choices))}")
    elif typing.get_origin(typ) is list:
        (item,) = typing.get_args(typ)
        if isinstance(value, list):
            return [_coerce(v, item, key) for v in value]
    else:
        raise TypeError(f"unsupported config type {typ} for {key}")
    name = getattr(typ, "__name__", str(typ))
    raise ConfigError(f"{key} must be {name}, got {value!r}")


def _merge(cls: type, base: Any, updates: dict[str, Any], prefix: str = "") -> Any:
    """Returns a copy of dataclass `base` with `updates` (a nested dict) applied and type-checked."""
    fields = _fields(cls)
    changes = {}
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in fields:
            valid = ", ".join(f"{prefix}{k}" for k in fields)
            raise ConfigError(f"unknown config key {path!r}; valid keys: {valid}")
        typ = fields[key]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} is a section; set its keys as {path}.KEY=VALUE")
            changes[key] = _merge(typ, getattr(base, key), value, f"{path}.")
        else:
            changes[key] = _coerce(value, typ, path)
    return dataclasses.replace(base, **changes)


def nested(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": v} -> {"a": {"b": v}}."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _parse_override(text: str | dict[str, Any]) -> dict[str, Any]:
    """`a.b=value` -> {"a": {"b": value}}; the value is read as TOML, else taken as a string."""
    if isinstance(text, dict):
        return text
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. train.learning_rate=3e-4)")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return nested({key.strip(): value})


def read_toml(path: str | pathlib.Path) -> dict[str, Any]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"cannot parse {path}: {e}") from None


def load_config(files: Sequence[str | dict[str, Any]] = (), overrides: Sequence[str | dict[str, Any]] = ()) -> Config:
    """Builds a Config: the dataclass defaults, `files` in order, then `overrides`.

    `files` are TOML paths or nested dicts (e.g. a checkpoint's saved config, see
    herd_jax/checkpoint.py). Overrides are `section.key=value` strings or nested dicts.
    """
    layers = [dict(f) if isinstance(f, dict) else read_toml(f) for f in files] + [_parse_override(o) for o in overrides]
    cfg = Config()
    for layer in layers:
        cfg = _merge(Config, cfg, layer)
    return cfg


# Keys of older versions' saved configs, dropped when a checkpoint's config is read back (its params
# stay evaluable and exportable); the value says where the setting lives now.
REMOVED_KEYS = {
    ("dpok", "clip_range"): "train.clip_range",
    ("dpok", "buffer_transitions"): "dpok.buffer_epochs",
}


def upgrade(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config (nested dict) without the keys this version removed (REMOVED_KEYS)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for section, key in REMOVED_KEYS:
        out.get(section, {}).pop(key, None)
    return out


def validate(cfg: Config, num_devices: int) -> None:
    """Checks what the types cannot (ranges, divisibility, names), the running algorithm's section
    included; raises a one-line ConfigError."""
    from herd_jax import algorithms
    from herd_jax.rewards import reward_names

    def require(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(message)

    s, t = cfg.sample, cfg.train
    for key, value in [
        ("num_epochs", cfg.num_epochs),
        ("sample.num_steps", s.num_steps),
        ("sample.batch_size", s.batch_size),
        ("sample.num_batches_per_epoch", s.num_batches_per_epoch),
        ("train.batch_size", t.batch_size),
        ("train.num_inner_epochs", t.num_inner_epochs),
        ("train.stats_window", t.stats_window),
        ("train.lora_rank", t.lora_rank),
        ("train.timestep_batch", t.timestep_batch),
        ("train.learning_rate", t.learning_rate),
    ]:
        require(value > 0, f"{key} must be positive, got {value}")
    require(s.eta > 0, f"sample.eta must be > 0 for a stochastic policy, got {s.eta}")
    require(0 < t.timestep_fraction <= 1, f"train.timestep_fraction must be in (0, 1], got {t.timestep_fraction}")
    require(cfg.checkpoint.save_every >= 0, f"checkpoint.save_every must be >= 0 (0: no checkpoints), got {cfg.checkpoint.save_every}")
    require(cfg.checkpoint.keep >= 1, f"checkpoint.keep must be >= 1, got {cfg.checkpoint.keep}")
    require(cfg.reward.name in reward_names(), f"reward.name={cfg.reward.name!r} is not one of: {', '.join(reward_names())}")
    require(0 <= cfg.reward.success_threshold < 1, f"reward.success_threshold must be in [0, 1), got {cfg.reward.success_threshold}")
    samples = s.batch_size * s.num_batches_per_epoch
    require(samples % t.batch_size == 0, f"samples per epoch ({samples}) must be a multiple of train.batch_size ({t.batch_size})")
    for key, value in [("sample.batch_size", s.batch_size), ("train.batch_size", t.batch_size)]:
        require(value % num_devices == 0, f"{key}={value} must be a multiple of the number of devices ({num_devices})")
    if t.estimator == "sf":
        # REINFORCE without a ratio is unbiased only on data the current params sampled: one
        # gradient step per epoch on fresh, own-goal, on-policy trajectories.
        biased = [
            (cfg.algorithm.name == "ddpg", "ddpg (its ε-greedy epochs are sampled by the frozen pretrained model)"),
            (cfg.algorithm.name not in ("ddpo", "herd", "ddpg"), f"{cfg.algorithm.name} (its loss has no sf form)"),
            (cfg.algorithm.name == "herd", "herd (replayed and relabeled trajectories come from other params or goals)"),
            (t.num_inner_epochs > 1, f"train.num_inner_epochs={t.num_inner_epochs} (after the first step the data is off-policy)"),
            (samples > t.batch_size, f"{samples // t.batch_size} minibatches per epoch (after the first step the data is off-policy)"),
        ]
        reasons = [why for bad, why in biased if bad]
        require(not reasons, f"train.estimator=sf is biased with {reasons[0] if reasons else ''}; use train.estimator=is")
    cfg.eval.validate(cfg, num_devices)
    entry = algorithms.get(cfg.algorithm.name)
    if entry.section is not None:
        getattr(cfg, entry.section).validate(cfg, num_devices)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_toml(cfg: Config) -> str:
    """The resolved config as TOML (JSON scalars are valid TOML for str/int/float/bool/lists)."""
    top, sections = [], []
    for key, value in to_dict(cfg).items():
        if isinstance(value, dict):
            sections.append(f"\n[{key}]")
            sections += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        else:
            top.append(f"{key} = {json.dumps(value)}")
    return "\n".join(top + sections) + "\n"


_BASE_HEADER = """\
# Every config key with its built-in default, generated from herd_jax/config.py and the algorithms'
# config dataclasses:
#   python -m herd_jax.config > configs/base.toml      (tests/test_checkpoint.py checks it is in sync)
# A reference, not a starting point: put only the keys you change in your own file.
# Precedence: defaults < --config files < flags < section.key=value overrides."""


def _key_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in a dataclass's source."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    source = textwrap.dedent(inspect.getsource(cls))
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    (node,) = ast.parse(source).body
    return {
        field.target.id: comments[field.end_lineno]
        for field in node.body
        if isinstance(field, ast.AnnAssign) and field.end_lineno in comments
    }


def documented_toml(cfg: Config | None = None) -> str:
    """`cfg` (default: the built-in defaults) as TOML, with each section's docstring and each key's comment."""
    cfg = Config() if cfg is None else cfg

    def lines(obj: Any) -> list[str]:
        comments = _key_comments(type(obj))
        out = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                continue
            line = f"{f.name} = {json.dumps(value)}"
            out.append(f"{line}  # {comments[f.name]}" if f.name in comments else line)
        return out

    text = [_BASE_HEADER, "", *lines(cfg)]
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            doc = (type(section).__doc__ or "").strip().splitlines()
            doc = [] if doc and doc[0].startswith(f"{type(section).__name__}(") else doc  # dataclass's generated one
            text += ["", *(f"# {line}" for line in doc[:1]), f"[{f.name}]", *lines(section)]
    return "\n".join(text) + "\n"


if __name__ == "__main__":
    print(documented_toml(), end="")

"""Training configuration: nested dataclasses, named presets, YAML/JSON files and ``key=value`` overrides.

A run is described by one :class:`TrainConfig`. It is built from a preset (``demo``, ``gcc-yfcc``) or a YAML/JSON
file, then ``key=value`` overrides with dotted keys are applied::

    cfg = load_config(preset="demo", overrides=["optim.epochs=2", "data.batch_size=16", "model.vision.depths=[1,1,1]"])

Values are parsed as YAML scalars/lists (``8``, ``1e-3``, ``true``, ``[1, 1, 1]``, ``null``) and checked against the
field's type; unknown keys raise ``ValueError`` naming the key and the known ones. ``model.*`` keys other than
``model.preset`` are overrides of :class:`groupvit.GroupViTConfig` (validated by ``groupvit.config.get_config``).

Learning rates are given for a global batch of 4096 (the recipe's) and scaled linearly by ``global_batch / 4096``
(docs/groupvit.md §8).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from groupvit.imageio import DEFAULT_MAX_PIXELS

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKENDS = ("eager", "triton")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class DataConfig:
    train_shards: list[str] = field(default_factory=list)  # webdataset shard patterns (brace-expanded), mixed
    dataset_length: int | None = None  # samples in one epoch over all shard sets (for steps_per_epoch)
    batch_size: int = 256  # per process (per GPU); global batch = batch_size * world_size
    num_workers: int = 6  # data-loader worker processes per rank
    img_size: int = 224  # training crop; also sets the model's vision.img_size
    multi_label: int = 3  # K noun prompts per caption (0: captions only); also sets the model's multi_label
    shuffle_buffer: int = 10000  # sample shuffle buffer per worker
    augment: bool = True  # recipe augmentation (random resized crop, flip, RandAugment, erasing); False: resize only
    augment_on: str = "cpu"  # "cpu": whole transform in the workers (timm semantics); "gpu": workers decode + crop
    #                          to uint8, flip/RandAugment/normalise/erasing run batched on the device
    #                          (train.gpu_augment)
    max_pixels: int = DEFAULT_MAX_PIXELS  # images above this many pixels (decompression bombs) are skipped and counted
    synthetic_train: int = 0  # >0: generate this many coloured-shape samples (train.synthetic) on first use and
    #                           add their shards to train_shards
    synthetic_val: int = 0  # held-out synthetic samples written beside them (for zero-shot segmentation)
    synthetic_dir: str = ""  # where the synthetic shards go ("" = output_dir/data)
    synthetic_empty_every: int = 0  # >0: every n-th synthetic training image shows no object ("a grey background")


@dataclass
class ModelConfig:
    preset: str = "groupvit-s"  # groupvit.PRESETS name
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted GroupViTConfig overrides, e.g. vision.depths

    def __post_init__(self) -> None:
        # tuples -> lists so that a config equals its YAML/JSON round trip
        self.overrides = {str(k): _listify(v) for k, v in dict(self.overrides).items()}


@dataclass
class OptimConfig:
    base_lr: float = 1.6e-3  # peak lr at global batch 4096
    warmup_lr: float = 4e-6  # lr at step 0, at global batch 4096
    min_lr: float = 4e-5  # final lr of the cosine, at global batch 4096
    lr_ref_batch: int = 4096  # the three lrs above are multiplied by global_batch / lr_ref_batch
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    epochs: int = 30
    warmup_epochs: float = 2.0
    steps_per_epoch: int | None = None  # None: data.dataset_length // global batch
    clip_grad: float = 5.0  # global grad-norm clip (0 disables clipping; the norm is still measured)
    # steps during which the grouping path (GroupViT.grouping_parameters: what decides the token-to-group
    # assignment) is not updated, so that the texts learn to name the initial groups first (the demo: docs/demo.md §6)
    freeze_grouping_steps: int = 0


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU; or fp32 | bf16 | fp16 (fp16 uses GradScaler)
    backend: str = "eager"  # groupvit.ops backend: eager | triton
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu
    output_dir: str = "runs/groupvit"
    log_interval: int = 10  # steps between JSONL/TensorBoard records (the progress bar updates every step)
    ckpt_interval: int = 1000  # steps between checkpoints (latest.pt); one is also written at the end
    seed: int = 0  # process seed = seed + rank; data order depends on (seed, epoch) only
    resume: str | None = None  # path to a checkpoint, 'auto' (output_dir/latest.pt if present) or None
    overwrite: bool = False  # a run without resume may replace a checkpoint already in output_dir
    skip_nonfinite: bool = False  # skip (and count) steps whose loss or gradient norm is not finite; else raise
    check_finite: bool = False  # also check the fused loss's inputs (raises naming the non-finite input; one more
    #                             host sync per loss call on a GPU); the step's own check (above) is always on
    compile: bool = False  # torch.compile the forward + losses (train.loop.compile_forward_loss)
    compile_mode: str = "default"  # torch.compile mode: default | reduce-overhead (CUDA graphs: one recorded per
    #                                shape, so pair it with model.text.trim_multiple=0) | max-autotune
    threads: int | None = None  # torch intra-op CPU threads; None: the CPU cores of this process (split between
    #                             ranks on one machine) minus data.num_workers, at least 1
    max_steps: int | None = None  # stop after this many global steps (the schedule still spans all epochs)
    time_limit_s: float | None = None  # stop (with a checkpoint) after this much training wall time
    tensorboard: bool = False  # also log to output_dir/tb (needs the tensorboard package)
    progress: bool = True  # tqdm progress bar on rank 0
    micro_batch: int | None = None  # run the towers this many samples at a time (train.gradcache): the contrastive
    #                                 batch stays data.batch_size per rank at the memory of micro_batch; None/0: off

    def __post_init__(self) -> None:
        for name, cls in (("data", DataConfig), ("model", ModelConfig), ("optim", OptimConfig)):
            v = getattr(self, name)
            if isinstance(v, Mapping):
                setattr(self, name, _build(cls, v, name))
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` on values that cannot work (checked again after every override)."""
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: choose one of {PRECISIONS}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r}: choose one of {BACKENDS}")
        d, o = self.data, self.optim
        for name, v in (
            ("data.batch_size", d.batch_size),
            ("optim.epochs", o.epochs),
            ("log_interval", self.log_interval),
            ("ckpt_interval", self.ckpt_interval),
            ("optim.lr_ref_batch", o.lr_ref_batch),
        ):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if min(d.num_workers, d.shuffle_buffer, d.multi_label, d.synthetic_train, d.synthetic_val) < 0:
            raise ValueError(
                "data.num_workers, shuffle_buffer, multi_label, synthetic_train and synthetic_val must be >= 0"
            )
        if d.synthetic_empty_every < 0 or o.freeze_grouping_steps < 0:
            raise ValueError(
                f"data.synthetic_empty_every ({d.synthetic_empty_every}) and optim.freeze_grouping_steps "
                f"({o.freeze_grouping_steps}) must be >= 0 (0: off)"
            )
        if d.augment_on not in ("cpu", "gpu"):
            raise ValueError(f"data.augment_on {d.augment_on!r}: choose 'cpu' or 'gpu'")
        if d.max_pixels < 1:
            raise ValueError(f"data.max_pixels must be >= 1, got {d.max_pixels}")
        if o.warmup_epochs < 0 or o.warmup_epochs > o.epochs:
            raise ValueError(f"optim.warmup_epochs {o.warmup_epochs} must lie in [0, epochs={o.epochs}]")
        if o.steps_per_epoch is not None and o.steps_per_epoch < 1:
            raise ValueError(f"optim.steps_per_epoch must be >= 1, got {o.steps_per_epoch}")
        if len(o.betas) != 2:
            raise ValueError(f"optim.betas must have two entries, got {o.betas}")
        if o.clip_grad < 0:
            raise ValueError(f"optim.clip_grad must be >= 0, got {o.clip_grad}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or null: the whole schedule), got {self.max_steps}")
        if self.check_finite and self.skip_nonfinite:
            raise ValueError(
                "check_finite=true raises at the first non-finite loss input, so skip_nonfinite=true "
                "could never skip: set one of them (the step's own check catches NaN/Inf either way)"
            )
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode {self.compile_mode!r}: choose one of {COMPILE_MODES}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 (or null: cores minus data workers), got {self.threads}")
        if self.micro_batch is not None and self.micro_batch < 0:
            raise ValueError(f"micro_batch must be >= 0 (0 or null: off), got {self.micro_batch}")
        if self.compile and self.micro_batch and self.micro_batch < d.batch_size:
            raise ValueError(
                "compile=true does not apply to micro-batched steps (micro_batch < data.batch_size run "
                "the towers eagerly, train.gradcache): set compile=false or micro_batch=null"
            )

    # ---- derived quantities ------------------------------------------------------------------------------------

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Optimizer steps per epoch: given, or ``dataset_length // (batch_size * world_size)``."""
        if self.optim.steps_per_epoch is not None:
            return self.optim.steps_per_epoch
        if self.data.dataset_length is None:
            raise ValueError("set optim.steps_per_epoch or data.dataset_length (samples per epoch)")
        n = self.data.dataset_length // (self.data.batch_size * world_size)
        if n < 1:
            raise ValueError(
                f"data.dataset_length {self.data.dataset_length} is smaller than one global batch "
                f"({self.data.batch_size} x {world_size})"
            )
        return n

    def scaled_lrs(self, world_size: int = 1) -> tuple[float, float, float]:
        """``(base, warmup, min)`` lr scaled linearly by ``global_batch / lr_ref_batch``."""
        s = self.data.batch_size * world_size / self.optim.lr_ref_batch
        return self.optim.base_lr * s, self.optim.warmup_lr * s, self.optim.min_lr * s

    def torch_threads(self, local_ranks: int = 1) -> int:
        """Intra-op threads for this process: ``threads``, or the usable CPU cores divided between the ranks on this
        machine (``local_ranks``) minus the data workers, at least 1 (workers and torch threads do not
        oversubscribe)."""
        if self.threads is not None:
            return self.threads
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, cores // max(1, local_ranks) - self.data.num_workers)

    def model_overrides(self) -> dict[str, Any]:
        """Overrides for ``groupvit.create_model``: the user's plus ``vision.img_size`` and ``multi_label`` from
        the data section (the data pipeline and the model must agree on them)."""
        ov = dict(self.model.overrides)
        for key, value in (("vision.img_size", self.data.img_size), ("multi_label", self.data.multi_label)):
            if key in ov and ov[key] != value:
                raise ValueError(f"model override {key}={ov[key]!r} conflicts with data ({value!r}); set it in data.")
            ov[key] = value
        return ov

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        return _build(cls, d, "")


# ---- presets ------------------------------------------------------------------------------------------------------

# Official gcc-yfcc 30-epoch recipe (docs/groupvit.md §8-9); shard paths follow the release's local_data layout.
_GCC_YFCC = dict(
    data=dict(
        train_shards=[
            "local_data/gcc3m_shards/gcc-train-{000000..00436}.tar",
            "local_data/gcc12m_shards/gcc-conceptual-12m-{000000..001943}.tar",
            "local_data/yfcc14m_shards/yfcc14m-{000000..001888}.tar",
        ],
        dataset_length=2_891_445 + 11_156_203 + 14_615_499,
        batch_size=256,
        num_workers=6,
        img_size=224,
        multi_label=3,
        shuffle_buffer=10000,
    ),
    model=dict(preset="groupvit-s"),
    optim=dict(epochs=30, warmup_epochs=2),
    output_dir="runs/gcc-yfcc",
    log_interval=10,
    ckpt_interval=2000,
)

# The embedded CPU default (train/demo.py): a small GroupViT on generated coloured shapes at 64x64, 1000 steps in about
# 3-4 minutes on 2 CPU cores. The image tower is cut down to what makes the image embedding a linear average of its
# segments: patch embedding -> one grouping block (256 patches -> 16 segments) -> mean -> linear projector, with no
# transformer blocks and no pre-assign cross-attention (both let every group token read the whole image). With any
# of these global read-outs back, the contrastive loss is solved on this toy data without pure segments (docs/demo.md:
# measured ablations; two grouping stages learned too slowly there). The mean runs over the groups in use
# (vision.pool="used"): over all 16, the constant outputs of the ~10 empty ones let the background segments drift to
# a colour's text (docs/demo.md §6). Real presets keep the official architecture.
DEMO_MODEL_OVERRIDES: dict[str, Any] = {
    "vision.patch_size": 4,
    "vision.embed_dim": 64,
    "vision.depths": [0, 0],
    "vision.num_heads": 2,
    "vision.num_group_tokens": [16, 0],
    "vision.num_output_groups": [16],
    "vision.pre_assign_attn": False,
    "vision.pool": "used",
    "text.width": 64,
    "text.layers": 2,
    "text.heads": 2,
    "text.context_length": 24,
    "output_dim": 64,
    "proj_num_layers": 1,
}
_DEMO = dict(
    data=dict(
        train_shards=[],
        batch_size=64,
        num_workers=1,
        img_size=64,
        multi_label=3,
        shuffle_buffer=1000,
        augment=False,
        synthetic_train=8000,
        synthetic_val=200,
        synthetic_empty_every=5,  # object-free images: negatives that keep the background's segments off the colours
    ),
    model=dict(preset="groupvit-tiny", overrides=DEMO_MODEL_OVERRIDES),
    # lr reference batch 64 instead of 4096: the recipe's 1.6e-3 peak at this small global batch. The grouping path
    # stays as initialised for 150 steps (the texts learn the initial groups first; docs/demo.md §6)
    optim=dict(
        epochs=8, warmup_epochs=1, steps_per_epoch=125, lr_ref_batch=64, clip_grad=5.0, freeze_grouping_steps=150
    ),
    # time limit: a safety net far above the ~3-4 minutes; a loaded machine must still finish the schedule
    precision="fp32",
    output_dir="runs/demo",
    log_interval=25,
    ckpt_interval=250,
    time_limit_s=1200,
    overwrite=True,  # `make demo` retrains from scratch each time (resume=auto continues instead)
)

PRESETS: dict[str, dict[str, Any]] = {"demo": _DEMO, "gcc-yfcc": _GCC_YFCC}


# ---- building and overriding ----------------------------------------------------------------------------------------


def load_config(
    path: str | Path | None = None, *, preset: str | None = None, overrides: Sequence[str] | Mapping[str, Any] = ()
) -> TrainConfig:
    """Preset, then file (YAML or JSON; a nested mapping like :meth:`TrainConfig.to_dict`), then overrides.

    ``overrides`` is a list of ``"dotted.key=value"`` strings or a mapping ``{"dotted.key": value}``.
    """
    d: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown training preset {preset!r}; choose one of {sorted(PRESETS)}")
        d = _deepcopy(PRESETS[preset])
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file {p} does not exist")
        text = p.read_text()
        loaded = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, Mapping):
            raise ValueError(f"config file {p} must hold a mapping at the top level, got {type(loaded).__name__}")
        _merge(d, loaded)
    items = overrides.items() if isinstance(overrides, Mapping) else (_split(o) for o in overrides)
    model_touched = False
    for key, value in items:  # all overrides first, then one validation (intermediate states may be invalid)
        _set_dotted(d, key, value)
        model_touched |= key.startswith("model.")
    cfg = TrainConfig.from_dict(d)
    if model_touched:
        check_model_overrides(cfg)
    return cfg


def apply_override(cfg: TrainConfig, key: str, value: Any) -> TrainConfig:
    """Return a copy of ``cfg`` with the dotted ``key`` set to ``value`` (a string is parsed as YAML)."""
    d = cfg.to_dict()
    _set_dotted(d, key, value)
    new = TrainConfig.from_dict(d)
    if key.startswith("model."):
        check_model_overrides(new)
    return new


def _set_dotted(d: dict[str, Any], key: str, value: Any) -> None:
    """Set ``key`` (dotted) in the nested config dict ``d``; unknown keys raise ``ValueError``."""
    if isinstance(value, str):
        value = parse_value(value)
    parts = key.split(".")
    d.setdefault("model", {}).setdefault("overrides", {})
    if parts[0] == "model" and len(parts) >= 2 and parts[1] not in ("preset", "overrides"):
        d["model"]["overrides"][".".join(parts[1:])] = value  # model.vision.depths=... -> GroupViTConfig override
        return
    if parts[:2] == ["model", "overrides"] and len(parts) > 2:
        d["model"]["overrides"][".".join(parts[2:])] = value
        return
    node: Any = d
    spec: Any = TrainConfig  # keys are checked against the dataclass fields (d may be partial)
    for i, part in enumerate(parts[:-1]):
        hint = typing.get_type_hints(spec).get(part)
        if hint is None or not dataclasses.is_dataclass(hint):
            sections = [n for n, h in typing.get_type_hints(TrainConfig).items() if dataclasses.is_dataclass(h)]
            raise ValueError(
                f"unknown config key {key!r}: {'.'.join(parts[: i + 1])!r} is not a section; sections: {sections}"
            )
        spec = hint
        node = node.setdefault(part, {})
    known = sorted(f.name for f in fields(spec))
    if parts[-1] not in known:
        raise ValueError(f"unknown config key {key!r}; known keys here: {known}")
    node[parts[-1]] = value


def check_model_overrides(cfg: TrainConfig) -> None:
    """Fail early (ValueError) when the model preset or its overrides are invalid."""
    from groupvit.config import get_config

    get_config(cfg.model.preset, **cfg.model_overrides())


def parse_value(text: str) -> Any:
    """YAML scalar/list parsing plus numbers YAML 1.1 leaves as strings (``1e-3``) and lists of brace patterns."""
    try:
        v = yaml.safe_load(text)
    except yaml.YAMLError:
        t = text.strip()
        if t.startswith("[") and t.endswith("]"):  # e.g. [a-{000..009}.tar, b.tar]: braces break YAML flow lists
            return [parse_value(x.strip()) for x in t[1:-1].split(",") if x.strip()]
        return text
    if isinstance(v, str):
        try:
            return float(v) if any(c in v.lower() for c in ".e") or v.lower() in ("inf", "nan") else int(v)
        except ValueError:
            return v
    return v


def _split(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} must look like dotted.key=value")
    return key.strip(), value


def _merge(dst: dict[str, Any], src: Mapping[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, Mapping) and isinstance(dst.get(k), dict) and k != "overrides":
            _merge(dst[k], v)
        elif k == "overrides" and isinstance(v, Mapping) and isinstance(dst.get(k), dict):
            dst[k].update(v)
        else:
            dst[k] = _deepcopy(v)


def _listify(v: Any) -> Any:
    return [_listify(x) for x in v] if isinstance(v, (list, tuple)) else v


def _deepcopy(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _deepcopy(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_deepcopy(x) for x in v]
    return v


def _build(cls: type, d: Mapping[str, Any], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"config section {where or 'top level'} must be a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(
            f"unknown config key(s) {[f'{where}.{b}'.lstrip('.') for b in bad]}; "
            f"known keys{' in ' + where if where else ''}: {sorted(known)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        key = f"{where}.{name}".lstrip(".")
        hint = hints[name]
        if dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            kwargs[name] = _build(hint, value, key)
        elif dataclasses.is_dataclass(hint) and dataclasses.is_dataclass(value):
            kwargs[name] = value
        else:
            kwargs[name] = _coerce(value, hint, key)
    return cls(**kwargs)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint; convert int->float and list->tuple where the hint asks."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {value!r}")
    if hint is Any:
        return value
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            (a,) = typing.get_args(hint) or (Any,)
            return [_coerce(v, a, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is tuple:
        if isinstance(value, (list, tuple)):
            args = typing.get_args(hint)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_coerce(v, args[0], key) for v in value)
            if len(args) == len(value):
                return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    elif origin is dict:
        if isinstance(value, Mapping):
            return dict(value)
    else:
        return value
    raise ValueError(f"config key {key!r}: expected {_hint_name(hint)}, got {value!r} ({type(value).__name__})")


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")

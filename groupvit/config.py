"""Model configuration: frozen dataclasses, named presets and the bridge from the official YAML ``model:`` section.

The backend (eager / triton) is deliberately *not* part of the model config: it is a runtime choice
(see :mod:`groupvit.ops`) and never changes parameters or state-dict keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


@dataclass(frozen=True)
class VisionConfig:
    img_size: int = 224  # training resolution; the pos-embed grid is img_size // patch_size
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384  # C, constant through all stages (the released models use no reduction)
    depths: tuple[int, ...] = (6, 3, 3)  # transformer blocks per stage
    num_heads: int = 6  # heads of the self- and pre-assign cross-attention (the assign attention has one)
    num_group_tokens: tuple[int, ...] = (64, 8, 0)  # learned group tokens per stage (0 = no grouping)
    num_output_groups: tuple[int, ...] = (64, 8)  # G produced by each grouping block
    mlp_ratio: float = 4.0
    group_mlp_ratio: tuple[float, float] = (0.5, 4.0)  # token-mixing hidden = 0.5*C, channel MLP hidden = 4*C
    qkv_bias: bool = True
    drop_path_rate: float = 0.1  # linearly spaced over all blocks of all stages
    hard_assignment: bool = True
    gumbel_tau: float = 1.0
    assign_eps: float = 1.0
    # The group tokens cross-attend to the image before the assignment (official: always). Off only in the toy demo
    # preset, where that global read-out lets the contrastive loss ignore the segments (docs/demo.md).
    pre_assign_attn: bool = True
    # The image embedding averages the final groups: "all" of them (official), or only the "used" ones, those that
    # received at least one image token. Used only in the toy demo preset: there most groups are empty in any one
    # image, and their constant outputs let the background segments take any text direction (docs/demo.md §6).
    pool: str = "all"

    def __post_init__(self) -> None:
        if self.pool not in ("all", "used"):
            raise ValueError(f"vision pool must be 'all' (official) or 'used', got {self.pool!r}")
        object.__setattr__(self, "depths", tuple(self.depths))
        object.__setattr__(self, "num_group_tokens", tuple(self.num_group_tokens))
        object.__setattr__(self, "num_output_groups", tuple(self.num_output_groups))
        object.__setattr__(self, "group_mlp_ratio", tuple(self.group_mlp_ratio))
        n = len(self.depths)
        if len(self.num_group_tokens) != n:
            raise ValueError(f"num_group_tokens {self.num_group_tokens} must have one entry per stage ({n})")
        grouping = [g for g in self.num_group_tokens if g > 0]
        if self.num_group_tokens[-1] != 0 or any(g == 0 for g in self.num_group_tokens[:-1]):
            raise ValueError(f"num_group_tokens {self.num_group_tokens}: every stage but the last needs group tokens")
        if len(self.num_output_groups) != len(grouping):
            raise ValueError(f"num_output_groups {self.num_output_groups} needs one entry per grouping stage")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by num_heads {self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} not divisible by patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 256
    layers: int = 12
    heads: int = 4
    mlp_ratio: float = 4.0
    trim_multiple: int = 16  # run each sequence only up to its EOT, rounded up to a multiple of this (exact; few
    #                          shapes for torch.compile); 0: always the full padded length

    def __post_init__(self) -> None:
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} not divisible by heads {self.heads}")
        if self.trim_multiple < 0:
            raise ValueError(f"text trim_multiple must be >= 0 (0: no trimming), got {self.trim_multiple}")


@dataclass(frozen=True)
class GroupViTConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    output_dim: int = 256  # D, the joint embedding size
    proj_num_layers: int = 2  # projector MLP depth (2 = Linear-BN-ReLU-Linear)
    proj_hidden_dim: int = 4096
    multi_label: int = 3  # K noun prompts per caption; 0 disables the multi-label loss and its temperature
    contrast_temperature: float = 0.07  # logit scales start at log(1 / T)

    def __post_init__(self) -> None:
        if isinstance(self.vision, Mapping):
            object.__setattr__(self, "vision", VisionConfig(**self.vision))
        if isinstance(self.text, Mapping):
            object.__setattr__(self, "text", TextConfig(**self.text))
        if self.proj_num_layers < 1:
            raise ValueError("proj_num_layers must be >= 1")

    @property
    def logit_scale_init(self) -> float:
        return math.log(1.0 / self.contrast_temperature)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GroupViTConfig":
        return cls(**d)

    def replace(self, **overrides: Any) -> "GroupViTConfig":
        """Copy with overrides; nested fields by dotted name (``vision.depths=(1, 1, 1)``) or by a dict."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {"vision": {}, "text": {}}
        for key, value in overrides.items():
            head, _, rest = key.partition(".")
            if rest:
                if head not in nested:
                    raise ValueError(f"unknown config section {head!r} in override {key!r}")
                nested[head][rest] = value
            elif key in nested and isinstance(value, Mapping):
                nested[key].update(value)
            else:
                top[key] = value
        names = {f.name for f in fields(self)}
        for key in top:
            if key not in names:
                raise ValueError(f"unknown GroupViTConfig field {key!r}; known: {sorted(names)}")
        for sec, vals in nested.items():
            known = {f.name for f in fields(getattr(self, sec))}
            bad = set(vals) - known
            if bad:
                raise ValueError(f"unknown {sec} config field(s) {sorted(bad)}; known: {sorted(known)}")
            if vals:
                top[sec] = dataclasses.replace(getattr(self, sec), **vals)
        return dataclasses.replace(self, **top)

    @classmethod
    def from_official(cls, model_cfg: Mapping[str, Any]) -> "GroupViTConfig":
        """Build from the ``model:`` section of an official GroupViT YAML config (plain dict or OmegaConf).

        Field names as in the official configs: ``img_encoder.{embed_dim, depths, num_heads, num_group_tokens,
        num_output_groups, img_size, patch_size, drop_path_rate, ...}``, ``text_encoder.{width, layers,
        context_length, vocab_size, heads}``, ``output_dim``, ``proj_num_layers``, ``multi_label``,
        ``contrast_temperature``. Options the released models do not use (embed factors != 1, dimension-changing
        reductions, Fourier pos-embed) raise ``ValueError``.
        """
        m = _plain(model_cfg)
        img = dict(m.get("img_encoder", {}))
        txt = dict(m.get("text_encoder", {}))
        heads = img.get("num_heads", 6)
        if isinstance(heads, (list, tuple)):
            if len(set(heads)) != 1:
                raise ValueError(f"per-stage num_heads {heads} differ; only a constant head count is supported")
            heads = heads[0]
        factors = img.get("embed_factors", [1] * len(img.get("depths", (6, 3, 3))))
        if any(f != 1 for f in factors):
            raise ValueError(f"embed_factors {factors}: only constant width (all 1) is supported")
        if img.get("pos_embed_type", "simple") != "simple":
            raise ValueError(f"pos_embed_type {img['pos_embed_type']!r} is not supported (only 'simple')")
        vkeys = {
            "img_size",
            "patch_size",
            "in_chans",
            "embed_dim",
            "depths",
            "num_group_tokens",
            "num_output_groups",
            "mlp_ratio",
            "qkv_bias",
            "drop_path_rate",
            "hard_assignment",
        }
        vision = {k: (tuple(v) if isinstance(v, list) else v) for k, v in img.items() if k in vkeys}
        vision["num_heads"] = int(heads)
        tkeys = {"context_length", "vocab_size", "width", "layers", "heads", "mlp_ratio"}
        text = {k: v for k, v in txt.items() if k in tkeys}
        if "heads" not in text and "width" in text:
            text["heads"] = max(1, int(text["width"]) // 64)  # the official TextTransformer uses width // 64 heads
        ml = m.get("multi_label", 0)
        if isinstance(ml, str):  # unresolved interpolation such as ${data.text_aug.multi_label}
            raise ValueError(f"multi_label {ml!r} is unresolved; resolve the config (OmegaConf.resolve) first")
        return cls(
            vision=VisionConfig(**vision),
            text=TextConfig(**text),
            output_dim=int(m.get("output_dim", 256)),
            proj_num_layers=int(m.get("proj_num_layers", 2)),
            multi_label=int(ml or 0),
            contrast_temperature=float(m.get("contrast_temperature", 0.07)),
        )


def _plain(cfg: Any) -> dict[str, Any]:
    """OmegaConf / yacs / nested mappings -> plain dicts."""
    if hasattr(cfg, "_content") or type(cfg).__name__ == "DictConfig":  # OmegaConf without importing it
        from omegaconf import OmegaConf  # type: ignore

        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    if isinstance(cfg, Mapping):
        return {k: _plain(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    raise TypeError(f"expected a mapping for the model config, got {type(cfg).__name__}")


PRESETS: dict[str, GroupViTConfig] = {
    # gcc-yfcc 30e release: 55,726,610 parameters.
    "groupvit-s": GroupViTConfig(),
    # Tiny model for tests and the CPU demo (about 0.9 M parameters with a small vocabulary).
    "groupvit-tiny": GroupViTConfig(
        vision=VisionConfig(
            img_size=32,
            patch_size=4,
            embed_dim=64,
            depths=(1, 1, 1),
            num_heads=2,
            num_group_tokens=(8, 4, 0),
            num_output_groups=(8, 4),
            drop_path_rate=0.0,
        ),
        text=TextConfig(context_length=16, vocab_size=49408, width=64, layers=2, heads=2),
        output_dim=32,
        proj_hidden_dim=128,
        multi_label=3,
    ),
}


def get_config(preset_or_config: str | GroupViTConfig | Mapping[str, Any], **overrides: Any) -> GroupViTConfig:
    """Resolve a preset name, a config or a dict, then apply overrides (see :meth:`GroupViTConfig.replace`)."""
    if isinstance(preset_or_config, GroupViTConfig):
        cfg = preset_or_config
    elif isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(f"unknown preset {preset_or_config!r}; choose one of {sorted(PRESETS)}")
        cfg = PRESETS[preset_or_config]
    elif isinstance(preset_or_config, Mapping):
        cfg = GroupViTConfig.from_dict(preset_or_config)
    else:
        raise TypeError(f"expected a preset name, GroupViTConfig or dict, got {type(preset_or_config).__name__}")
    return cfg.replace(**overrides) if overrides else cfg

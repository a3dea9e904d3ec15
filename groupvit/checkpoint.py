"""Checkpoint compatibility: official NVlabs release files, bare state dicts, HuggingFace ``GroupViTModel`` state
dicts and this project's own checkpoints, all loaded with strict key checking.

Our parameter names *are* the official layout (``img_encoder.*``, ...), so official weights need no renaming.
The HuggingFace port renames modules, splits the fused ``qkv`` / ``in_proj`` projections and stores the projector
convolutions as Linear weights; :func:`to_hf_state_dict` and :func:`from_hf_state_dict` convert exactly (a round trip
is bit-identical). Key mapping facts: docs/groupvit.md §11.1.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from groupvit.config import GroupViTConfig, TextConfig, VisionConfig
from groupvit.model import GroupViT

FORMAT = "groupvit-triton/1"
StateDict = dict[str, Tensor]

# Renames as (official template, HF template); {name} slots match digits ({i} {j} {l} {n} {h}) or a dotted tail.
_RENAMES: list[tuple[str, str]] = [
    ("img_encoder.pos_embed", "vision_model.embeddings.position_embeddings"),
    ("img_encoder.patch_embed.proj.{leaf}", "vision_model.embeddings.patch_embeddings.projection.{leaf}"),
    ("img_encoder.patch_embed.norm.{leaf}", "vision_model.embeddings.layernorm.{leaf}"),
    (
        "img_encoder.layers.{i}.blocks.{j}.norm{n}.{leaf}",
        "vision_model.encoder.stages.{i}.layers.{j}.layer_norm{n}.{leaf}",
    ),
    (
        "img_encoder.layers.{i}.blocks.{j}.attn.proj.{leaf}",
        "vision_model.encoder.stages.{i}.layers.{j}.self_attn.out_proj.{leaf}",
    ),
    ("img_encoder.layers.{i}.blocks.{j}.mlp.{leaf}", "vision_model.encoder.stages.{i}.layers.{j}.mlp.{leaf}"),
    (
        "img_encoder.layers.{i}.downsample.pre_assign_attn.attn.proj.{leaf}",
        "vision_model.encoder.stages.{i}.downsample.pre_assign_attn.attn.out_proj.{leaf}",
    ),
    ("img_encoder.layers.{i}.downsample.{leaf}", "vision_model.encoder.stages.{i}.downsample.{leaf}"),
    ("img_encoder.layers.{i}.group_token", "vision_model.encoder.stages.{i}.group_token"),
    ("img_encoder.layers.{i}.group_projector.{leaf}", "vision_model.encoder.stages.{i}.group_projector.{leaf}"),
    ("img_encoder.norm.{leaf}", "vision_model.layernorm.{leaf}"),
    ("text_encoder.token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    ("text_encoder.positional_embedding", "text_model.embeddings.position_embedding.weight"),
    (
        "text_encoder.transformer.resblocks.{l}.attn.out_proj.{leaf}",
        "text_model.encoder.layers.{l}.self_attn.out_proj.{leaf}",
    ),
    ("text_encoder.transformer.resblocks.{l}.ln_{n}.{leaf}", "text_model.encoder.layers.{l}.layer_norm{n}.{leaf}"),
    ("text_encoder.transformer.resblocks.{l}.mlp.c_fc.{leaf}", "text_model.encoder.layers.{l}.mlp.fc1.{leaf}"),
    ("text_encoder.transformer.resblocks.{l}.mlp.c_proj.{leaf}", "text_model.encoder.layers.{l}.mlp.fc2.{leaf}"),
    ("text_encoder.ln_final.{leaf}", "text_model.final_layer_norm.{leaf}"),
    ("img_projector.linear_hidden.{h}.{leaf}", "visual_projection.{h}.{leaf}"),
    ("img_projector.linear_out.{leaf}", "visual_projection.3.{leaf}"),
    ("text_projector.linear_hidden.{h}.{leaf}", "text_projection.{h}.{leaf}"),
    ("text_projector.linear_out.{leaf}", "text_projection.3.{leaf}"),
    ("logit_scale", "logit_scale"),
]
# Fused projections (official) <-> separate q/k/v projections (HF); {p} is q, k or v.
_SPLITS: list[tuple[str, str]] = [
    (
        "img_encoder.layers.{i}.blocks.{j}.attn.qkv.{leaf}",
        "vision_model.encoder.stages.{i}.layers.{j}.self_attn.{p}_proj.{leaf}",
    ),
    (
        "text_encoder.transformer.resblocks.{l}.attn.in_proj_{leaf}",
        "text_model.encoder.layers.{l}.self_attn.{p}_proj.{leaf}",
    ),
]
_CONV_PROJ = re.compile(r"(img|text)_projector\.(linear_hidden\.0|linear_out)\.weight")
_SLOT = {"i": r"\d+", "j": r"\d+", "l": r"\d+", "n": r"\d", "h": r"[01]", "p": r"[qkv]", "leaf": r"[\w.]+"}


def _regex(template: str) -> re.Pattern[str]:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_SLOT[p]})" for i, p in enumerate(parts)))


_FWD = [(_regex(a), b) for a, b in _RENAMES]
_BWD = [(_regex(b), a) for a, b in _RENAMES]
_SPLIT_FWD = [(_regex(a), b) for a, b in _SPLITS]
_SPLIT_BWD = [(_regex(b), a) for a, b in _SPLITS]


def _rename(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for rx, template in table:
        m = rx.fullmatch(key)
        if m:
            return template.format(**m.groupdict())
    return None


def to_hf_state_dict(sd: Mapping[str, Tensor]) -> StateDict:
    """Official / our layout -> HuggingFace ``GroupViTModel`` layout. ``multi_label_logit_scale`` has no HF
    counterpart and is dropped; projectors must have 2 layers (all HF supports)."""
    out: StateDict = {}
    for key, val in sd.items():
        if key == "multi_label_logit_scale":
            continue
        for rx, template in _SPLIT_FWD:
            m = rx.fullmatch(key)
            if m:
                for p, part in zip("qkv", val.chunk(3, dim=0)):
                    out[template.format(p=p, **m.groupdict())] = part.clone()
                break
        else:
            new = _rename(key, _FWD)
            if new is None:
                raise ValueError(f"no HuggingFace name for key {key!r} (HF GroupViT supports 2-layer projectors only)")
            out[new] = val.squeeze(-1) if _CONV_PROJ.fullmatch(key) else val
    return out


def from_hf_state_dict(hf: Mapping[str, Tensor]) -> StateDict:
    """HuggingFace ``GroupViTModel`` layout -> official / our layout (exact inverse of :func:`to_hf_state_dict`)."""
    out: StateDict = {}
    pending: dict[str, dict[str, Tensor]] = {}
    for key, val in hf.items():
        if key.endswith("position_ids"):
            continue  # a derived buffer some HF versions store
        for rx, template in _SPLIT_BWD:
            m = rx.fullmatch(key)
            if m:
                g = m.groupdict()
                pending.setdefault(template.format(**g), {})[g["p"]] = val
                break
        else:
            new = _rename(key, _BWD)
            if new is None:
                raise ValueError(f"unknown HuggingFace GroupViT key {key!r}")
            out[new] = val.unsqueeze(-1) if _CONV_PROJ.fullmatch(new) else val
    for fused, parts in pending.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete q/k/v projections for {fused}: have {sorted(parts)}")
        out[fused] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


# ---- detection, inference and loading ------------------------------------------------------------------------------


def detect_layout(sd: Mapping[str, Any]) -> str:
    """``"hf"`` or ``"official"`` (which is also ours) from the keys; raises on anything else."""
    keys = list(sd)
    if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
        return "hf"
    if any(k.startswith("img_encoder.") for k in keys):
        return "official"
    raise ValueError(
        f"unknown checkpoint layout: expected official GroupViT keys (img_encoder.*, text_encoder.*) "
        f"or HuggingFace GroupViTModel keys (vision_model.*, text_model.*); first keys: {keys[:5]}"
    )


def infer_config(sd: Mapping[str, Tensor]) -> GroupViTConfig:
    """Architecture from an official-layout state dict's shapes (used when a file carries no config)."""
    try:
        pos = sd["img_encoder.pos_embed"]
        conv = sd["img_encoder.patch_embed.proj.weight"]
        dim, patch = conv.shape[0], conv.shape[-1]
        grid = int(round(pos.shape[1] ** 0.5))
        stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"img_encoder\.layers\.(\d+)\.", k))})
        depths = tuple(
            len({m.group(1) for k in sd if (m := re.match(rf"img_encoder\.layers\.{i}\.blocks\.(\d+)\.", k))})
            for i in stages
        )
        tokens = tuple(
            sd[f"img_encoder.layers.{i}.group_token"].shape[1] if f"img_encoder.layers.{i}.group_token" in sd else 0
            for i in stages
        )
        outputs = tuple(
            sd[f"img_encoder.layers.{i}.downsample.mlp_inter.fc2.weight"].shape[0] for i in stages if tokens[i] > 0
        )
        if tokens[-1] > 0:  # a last stage without blocks has no parameters of its own
            depths, tokens = depths + (0,), tokens + (0,)
        heads_guess = max(1, dim // 64)
        width = sd["text_encoder.token_embedding.weight"].shape[1]
        layers = len({m.group(1) for k in sd if (m := re.match(r"text_encoder\.transformer\.resblocks\.(\d+)\.", k))})
        hidden_keys = [k for k in sd if re.fullmatch(r"img_projector\.linear_hidden\.\d+\.weight", k)]
        proj_layers = 1 + sum(1 for k in hidden_keys if sd[k].dim() == 3)
        proj_hidden = sd["img_projector.linear_out.weight"].shape[1] if proj_layers > 1 else 4096
        fc1_key = re.compile(r"img_encoder\.layers\.\d+\.blocks\.\d+\.mlp\.fc1\.weight")
        fc1 = next((v for k, v in sd.items() if fc1_key.fullmatch(k)), None)  # None: no transformer blocks at all
        pre_assign = any(".downsample.pre_assign_attn." in k for k in sd)
        vision = VisionConfig(
            img_size=grid * patch,
            patch_size=patch,
            in_chans=conv.shape[1],
            embed_dim=dim,
            depths=depths,
            num_heads=heads_guess,
            num_group_tokens=tokens,
            num_output_groups=outputs,
            mlp_ratio=fc1.shape[0] / dim if fc1 is not None else 4.0,
            pre_assign_attn=pre_assign,
        )
        text = TextConfig(
            context_length=sd["text_encoder.positional_embedding"].shape[0],
            vocab_size=sd["text_encoder.token_embedding.weight"].shape[0],
            width=width,
            layers=layers,
            heads=max(1, width // 64),
        )
        return GroupViTConfig(
            vision=vision,
            text=text,
            output_dim=sd["img_projector.linear_out.weight"].shape[0],
            proj_num_layers=proj_layers,
            proj_hidden_dim=proj_hidden,
            multi_label=3 if "multi_label_logit_scale" in sd else 0,
        )
    except KeyError as e:
        raise ValueError(f"cannot infer the architecture: key {e} missing; pass model= explicitly") from e


# ---- reading files: weights only, never code ----------------------------------------------------------------------


class CheckpointReadError(ValueError):
    """A checkpoint that cannot be read safely: not a checkpoint, truncated, or pickling objects outside the
    allow-list (loading those would run code from the file)."""


class _Inert:
    """Stand-in for a class named in an official release file's pickled OmegaConf config. The weights-only unpickler
    creates it instead of the original class (nothing is imported, no code of the file's choosing runs); it only
    records the pickled state, which :func:`_plain_config` turns into plain values."""

    def __new__(cls, *args: Any, **kwargs: Any) -> "_Inert":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


# The globals an official release file's config pickles (OmegaConf 2.0/2.1 containers, value nodes, their metadata
# and the type markers inside it), each read as an inert record. Measured by pickling an OmegaConf 2.1.1 DictConfig.
_OFFICIAL_CONFIG_GLOBALS = (
    "omegaconf.dictconfig.DictConfig",
    "omegaconf.listconfig.ListConfig",
    "omegaconf.base.Metadata",
    "omegaconf.base.ContainerMetadata",
    "omegaconf.nodes.AnyNode",
    "omegaconf.nodes.StringNode",
    "omegaconf.nodes.IntegerNode",
    "omegaconf.nodes.FloatNode",
    "omegaconf.nodes.BooleanNode",
    "typing.Any",
    "collections.defaultdict",
    "builtins.dict",
    "builtins.list",
    "builtins.int",
    "builtins.float",
    "builtins.str",
    "builtins.bool",
    "builtins.object",
)
_TRUST_HINT = (
    "if you trust the file's source, pass trust_checkpoint=True (CLI: --trust-checkpoint), which unpickles "
    "it fully and so runs any code it contains"
)


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${a.b.c}: an absolute OmegaConf reference


def _resolve(node: Any, root: Any, depth: int = 0) -> Any:
    """Replace values that are exactly ``${a.b.c}`` by the value at that path of ``root`` (as
    ``OmegaConf.to_container(resolve=True)``); other interpolations stay as written."""
    if isinstance(node, dict):
        return {k: _resolve(v, root, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, root, depth) for v in node]
    m = _INTERPOLATION.fullmatch(node) if isinstance(node, str) and depth < 16 else None
    if m is None:
        return node
    target = root
    for part in m.group(1).split("."):
        if not isinstance(target, dict) or part not in target:
            return node
        target = target[part]
    return _resolve(target, root, depth + 1)


def _plain_config(obj: Any) -> Any:
    """Inert OmegaConf records -> plain dicts / lists / values (containers keep ``_content``, nodes ``_val``;
    metadata and parent links are dropped; a root container's ``${a.b}`` references are resolved)."""
    if isinstance(obj, _Inert):
        state = obj.state if isinstance(obj.state, dict) else {}
        if "_val" in state:
            return _plain_config(state["_val"])
        if "_content" in state:
            plain = _plain_config(state["_content"])
            return _resolve(plain, plain) if state.get("_parent") is None else plain
        return None
    if isinstance(obj, dict):
        return {k: _plain_config(v) for k, v in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_plain_config(v) for v in obj)
    return obj


def safe_torch_load(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` and the official config classes read as inert records; full
    unpickling only with ``trust`` (and a warning). Raises :class:`CheckpointReadError` naming the problem."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # a zip archive or a protocol-2+ pickle
        raise CheckpointReadError(
            f"{path} is not a torch checkpoint (it starts with bytes {head!r}; an image or "
            f"text file?): give a .pt/.pth/.bin/.safetensors file or a HuggingFace model folder"
        )
    if trust:
        warnings.warn(f"trust_checkpoint: unpickling {path} fully; a crafted file can run arbitrary code", stacklevel=3)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise CheckpointReadError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from e
    try:
        with torch.serialization.safe_globals([(_Inert, name) for name in _OFFICIAL_CONFIG_GLOBALS]):
            return _plain_config(torch.load(path, map_location="cpu", weights_only=True))
    except pickle.UnpicklingError as e:
        parts = [
            p.strip()
            for p in str(e).split("\n\n")  # drop torch's advice to set weights_only=False
            if p.strip() and not p.strip().startswith(("Weights only load failed", "Check the documentation"))
        ]
        detail = (parts[0] if parts else str(e)).removeprefix("WeightsUnpickler error:").strip()
        found = re.search(r"GLOBAL (\S+)", detail)
        if found or "reduce for unrecognized function" in detail:
            what = f"the object {found.group(1)}" if found else "a call of a function"
            raise CheckpointReadError(
                f"{path} pickles {what}, which is neither a tensor nor part of an official GroupViT release file; "
                f"it was not loaded, because unpickling it could run code from the file. {_TRUST_HINT}"
            ) from None
        raise CheckpointReadError(
            f"{path} is not a readable torch checkpoint (truncated or corrupt?): {detail}"
        ) from None
    except Exception as e:
        raise CheckpointReadError(f"{path} is not a readable torch checkpoint (truncated or corrupt?): {e}") from None


def _load_safetensors(path: Path) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError as e:
        raise CheckpointReadError(
            f"{path}: reading .safetensors files needs the safetensors package (pip install safetensors)"
        ) from e
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointReadError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from e


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_hf_folder(folder: Path, trust: bool) -> dict[str, Any]:
    """A folder as ``save_pretrained`` writes it -> ``{"model": HF state dict, "hf_config": config.json}``."""
    config = folder / "config.json"
    weights = next((folder / n for n in _HF_WEIGHTS if (folder / n).is_file()), None)
    if not config.is_file() or weights is None:
        raise CheckpointReadError(
            f"{folder} is a folder but not a HuggingFace model folder: expected config.json and "
            f"one of {', '.join(_HF_WEIGHTS)} (as GroupViTModel.save_pretrained writes)"
        )
    try:
        hf_config = json.loads(config.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointReadError(f"{config} is not valid JSON: {e}") from e
    files = [weights]
    if weights.name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
        try:
            files = [folder / n for n in sorted(set(json.loads(weights.read_text())["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise CheckpointReadError(f"{weights} is not a valid shard index (no weight_map?): {e!r}") from e
    sd: StateDict = {}
    for f in files:
        sd.update(_load_safetensors(f) if f.suffix == ".safetensors" else safe_torch_load(f, trust))
    return {"model": sd, "hf_config": hf_config}


def _download_hf(repo_id: str) -> Path:
    """``hf:ORG/NAME`` -> a local folder with its ``config.json`` and weights (from the HuggingFace Hub cache)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointReadError(
            f"hf:{repo_id} needs the huggingface_hub package (pip install huggingface_hub), or "
            f"download the model folder yourself and pass its path"
        ) from None
    try:
        config = Path(hf_hub_download(repo_id, "config.json"))
        for name in ("model.safetensors", "pytorch_model.bin"):
            try:
                hf_hub_download(repo_id, name)
                return config.parent
            except LocalEntryNotFoundError:
                raise  # offline and not cached
            except EntryNotFoundError:
                continue  # the repository has no such file
    except Exception as e:
        raise CheckpointReadError(
            f"cannot fetch hf:{repo_id} from the HuggingFace Hub (offline, or no such "
            f"repository?): {type(e).__name__}: {e}. With network access run "
            f"`huggingface-cli download {repo_id} --local-dir DIR` and pass DIR"
        ) from None
    raise CheckpointReadError(f"hf:{repo_id} has neither model.safetensors nor pytorch_model.bin")


def read_checkpoint(spec: str | os.PathLike | Mapping[str, Any], trust_checkpoint: bool = False) -> Mapping[str, Any]:
    """A checkpoint spec -> its payload (a mapping; :func:`load_checkpoint` accepts it). See :func:`load_checkpoint`
    for the accepted specs; extra entries (e.g. the demo's ``"segmentation"`` settings) are kept."""
    if isinstance(spec, Mapping):
        return spec
    if isinstance(spec, str) and spec.startswith("hf:"):
        return _read_hf_folder(_download_hf(spec[3:]), trust_checkpoint)
    path = Path(spec)
    if path.is_dir():
        return _read_hf_folder(path, trust_checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    obj = safe_torch_load(path, trust_checkpoint)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    return obj


def load_checkpoint(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    model: GroupViT | None = None,
    *,
    strict: bool = True,
    trust_checkpoint: bool = False,
) -> GroupViT:
    """Load weights into ``model`` (or into a new model built from the checkpoint's config) and return it.

    Accepts (a) an official release ``.pth`` (a dict with ``model`` and an OmegaConf ``config``), (b) a bare official
    state dict, (c) a HuggingFace transformers ``GroupViTModel`` state dict, as a mapping, a torch file or a
    ``.safetensors`` file, (d) a HuggingFace model folder (``config.json`` + ``model.safetensors`` or
    ``pytorch_model.bin``, as ``save_pretrained`` writes), (e) ``"hf:ORG/NAME"``, fetched with ``huggingface_hub``,
    (f) this project's checkpoints. Files are read with ``torch.load(weights_only=True)`` (tensors and plain values;
    an official file's config classes become plain dicts); a file pickling anything else raises
    :class:`CheckpointReadError` unless ``trust_checkpoint=True``, which unpickles fully and so can run code from
    the file. Keys are checked strictly: missing or unexpected keys raise ``ValueError`` listing them. The one
    documented exception: HF weights have no ``multi_label_logit_scale``; a multi-label model keeps its initial value.
    """
    obj = read_checkpoint(path_or_state_dict, trust_checkpoint)
    cfg: GroupViTConfig | None = None
    sd: Mapping[str, Any] = obj
    if "model" in obj and isinstance(obj["model"], Mapping):
        sd = obj["model"]
        if obj.get("format") == FORMAT:
            raw = obj.get("config")
            if isinstance(raw, Mapping):
                cfg = GroupViTConfig.from_dict(raw)
            elif model is None:
                raise CheckpointReadError(
                    f"the checkpoint's config is {type(raw).__name__}, not a dict: pass the "
                    f"architecture (a model, or --preset NAME) to load its weights"
                )
        elif isinstance(obj.get("hf_config"), Mapping):
            cfg = config_from_hf(obj["hf_config"])
        elif obj.get("config") is not None:
            raw = obj["config"]
            section = raw.get("model") if hasattr(raw, "get") else None
            if section is not None:
                cfg = GroupViTConfig.from_official(section)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"state dict entries that are not tensors: {bad[:5]}")
    layout = detect_layout(sd)
    if layout == "hf":
        sd = from_hf_state_dict(sd)
    if model is None:
        model = GroupViT(cfg or infer_config(sd))
    own = model.state_dict()
    if layout == "hf" and "multi_label_logit_scale" in own and "multi_label_logit_scale" not in sd:
        sd["multi_label_logit_scale"] = own["multi_label_logit_scale"]
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if strict and (missing or unexpected):
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:10]}{' ...' if len(missing) > 10 else ''}"
            f" ({len(missing)}), unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}"
            f" ({len(unexpected)}). Check that the config matches the checkpoint."
        )
    shape_bad = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if shape_bad:
        raise ValueError(f"checkpoint/config shape mismatch (key, checkpoint, model): {shape_bad[:5]}")
    model.load_state_dict(sd, strict=strict)
    return model


def save_model(model: GroupViT, path: str | os.PathLike, **extra: Any) -> None:
    """Write ``{"format", "config", "model", **extra}`` atomically (temp file + rename: a crash never leaves a
    half-written file under ``path``)."""
    payload = {"format": FORMAT, "config": model.cfg.to_dict(), "model": model.state_dict(), **extra}
    atomic_save(payload, path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _check_hf_compatible(cfg: GroupViTConfig) -> None:
    if not cfg.vision.pre_assign_attn:
        raise ValueError(
            "HF GroupViT always has the pre-assign cross-attention; a model built with "
            "vision.pre_assign_attn=False (the demo preset) has no HuggingFace equivalent"
        )
    if cfg.vision.pool != "all":
        raise ValueError(
            f"HF GroupViT averages all final groups; a model built with vision.pool={cfg.vision.pool!r} (the demo "
            "preset) has no HuggingFace equivalent"
        )


def export_hf(model: GroupViT, folder: str | os.PathLike | None = None) -> StateDict:
    """The model's weights in the HuggingFace ``GroupViTModel`` layout. With ``folder``, also written there as
    ``save_pretrained`` does (``config.json`` + ``model.safetensors``): ``transformers.GroupViTModel.from_pretrained``
    and :func:`load_checkpoint` read it. HF GroupViT has no ``multi_label_logit_scale``: it is dropped, with a warning.
    """
    _check_hf_compatible(model.cfg)
    sd = model.state_dict()
    if "multi_label_logit_scale" in sd:
        warnings.warn(
            f"export_hf: HuggingFace GroupViT has no multi-label temperature; multi_label_logit_scale "
            f"(exp = {sd['multi_label_logit_scale'].exp().item():.4g}) is not exported",
            stacklevel=2,
        )
    hf = to_hf_state_dict(sd)
    if folder is not None:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {"architectures": ["GroupViTModel"], "model_type": "groupvit", **hf_config_kwargs(model.cfg)}
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in hf.items()},
            str(folder / "model.safetensors"),
            metadata={"format": "pt"},
        )
    return hf


def hf_config_kwargs(cfg: GroupViTConfig) -> dict[str, Any]:
    """Keyword arguments for ``transformers.GroupViTConfig`` describing the same architecture."""
    _check_hf_compatible(cfg)
    v, t = cfg.vision, cfg.text
    return dict(
        projection_dim=cfg.output_dim,
        projection_intermediate_dim=cfg.proj_hidden_dim,
        logit_scale_init_value=cfg.logit_scale_init,
        text_config=dict(
            vocab_size=t.vocab_size,
            hidden_size=t.width,
            intermediate_size=int(t.width * t.mlp_ratio),
            num_hidden_layers=t.layers,
            num_attention_heads=t.heads,
            max_position_embeddings=t.context_length,
            hidden_act="quick_gelu",
        ),
        vision_config=dict(
            hidden_size=v.embed_dim,
            intermediate_size=int(v.embed_dim * v.mlp_ratio),
            depths=list(v.depths),
            num_attention_heads=v.num_heads,
            num_group_tokens=list(v.num_group_tokens),
            num_output_groups=list(v.num_output_groups) + [v.num_output_groups[-1]],
            image_size=v.img_size,
            patch_size=v.patch_size,
            num_channels=v.in_chans,
            assign_eps=v.assign_eps,
            assign_mlp_ratio=list(v.group_mlp_ratio),
        ),
    )


# transformers.GroupViTConfig defaults (save_pretrained writes only the values that differ from them)
_HF_TEXT = dict(
    vocab_size=49408,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=12,
    num_attention_heads=4,
    max_position_embeddings=77,
)
_HF_VISION = dict(
    hidden_size=384,
    intermediate_size=1536,
    depths=[6, 3, 3],
    num_attention_heads=6,
    num_group_tokens=[64, 8, 0],
    num_output_groups=[64, 8, 8],
    image_size=224,
    patch_size=16,
    num_channels=3,
    assign_eps=1.0,
    assign_mlp_ratio=[0.5, 4],
)


def config_from_hf(hf: Mapping[str, Any]) -> GroupViTConfig:
    """A ``transformers.GroupViTConfig`` as a dict (a model folder's ``config.json``) -> our config (the inverse of
    :func:`hf_config_kwargs`; no multi-label head: HF has none)."""
    t = {**_HF_TEXT, **hf.get("text_config", {})}
    v = {**_HF_VISION, **hf.get("vision_config", {})}
    tokens = tuple(v["num_group_tokens"])
    vision = VisionConfig(
        img_size=v["image_size"],
        patch_size=v["patch_size"],
        in_chans=v["num_channels"],
        embed_dim=v["hidden_size"],
        depths=tuple(v["depths"]),
        num_heads=v["num_attention_heads"],
        num_group_tokens=tokens,
        num_output_groups=tuple(o for o, g in zip(v["num_output_groups"], tokens) if g > 0),
        mlp_ratio=v["intermediate_size"] / v["hidden_size"],
        group_mlp_ratio=tuple(v["assign_mlp_ratio"]),
        assign_eps=v["assign_eps"],
        drop_path_rate=0.0,
    )  # HF GroupViT has no stochastic depth
    text = TextConfig(
        context_length=t["max_position_embeddings"],
        vocab_size=t["vocab_size"],
        width=t["hidden_size"],
        layers=t["num_hidden_layers"],
        heads=t["num_attention_heads"],
        mlp_ratio=t["intermediate_size"] / t["hidden_size"],
    )
    return GroupViTConfig(
        vision=vision,
        text=text,
        output_dim=hf.get("projection_dim", 256),
        proj_hidden_dim=hf.get("projection_intermediate_dim", 4096),
        multi_label=0,
        contrast_temperature=math.exp(-hf.get("logit_scale_init_value", 2.6592)),
    )

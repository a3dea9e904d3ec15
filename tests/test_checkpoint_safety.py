"""Checkpoints never run code: crafted pickles are refused by every entry point, official release files (an
OmegaConf config pickled next to the weights) still load, and HuggingFace folders / safetensors / ``hf:`` specs."""

from __future__ import annotations

import collections
import os
import sys
import types
import typing
import warnings
from pathlib import Path

import pytest
import torch

import groupvit
from groupvit import seg_datasets, segment_cli
from groupvit.checkpoint import CheckpointReadError, hf_config_kwargs, load_checkpoint
from groupvit.config import GroupViTConfig
from tests.helpers import official_tiny_model_section
from train.checkpoint import load_training_checkpoint, resolve_resume
from train.rundir import check_fresh_start

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker's config object would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def tiny() -> groupvit.GroupViT:
    torch.manual_seed(5)
    return groupvit.create_model("groupvit-tiny").eval()


@pytest.fixture()
def crafted(tiny, tmp_path) -> tuple[Path, Path]:
    """A file with valid weights plus a code-running config; returns (file, marker the payload would create)."""
    marker = tmp_path / "pwned"
    path = tmp_path / "crafted.pth"
    torch.save({"model": tiny.state_dict(), "config": _Payload(marker)}, path)
    return path, marker


def test_crafted_file_never_runs_through_any_entry_point(crafted, tmp_path, capsys):
    path, marker = crafted
    with pytest.raises(CheckpointReadError, match="trust_checkpoint=True") as e:
        groupvit.load_checkpoint(path)
    assert "posix.system" in str(e.value) and "weights_only=False" not in str(e.value)
    img = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 30, 30)).save(img)
    rc = segment_cli.main(["--checkpoint", str(path), "--classes", "red", "--out", str(tmp_path / "o"), str(img)])
    assert rc == 2 and "trust-checkpoint" in capsys.readouterr().err
    with pytest.raises(CheckpointReadError):
        load_training_checkpoint(path)
    assert not marker.exists()
    # the opt-in really unpickles (so the refusal above is what kept the payload from running), with a warning
    with pytest.warns(UserWarning, match="arbitrary code"):
        groupvit.load_checkpoint(path, trust_checkpoint=True)
    assert marker.exists()


def test_crafted_file_never_runs_through_dataset_evaluation(crafted, shared_data, capsys):
    path, marker = crafted
    rc = seg_datasets.main(
        [
            "--dataset",
            "voc",
            "--root",
            str(shared_data / "vocmini"),
            "--checkpoint",
            str(path),
            "--limit",
            "1",
            "--no-progress",
            "--device",
            "cpu",
        ]
    )
    assert rc == 2 and "trust-checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def _install_fake_omegaconf(monkeypatch) -> dict[str, type]:
    """Classes named as OmegaConf's, with the state layout OmegaConf 2.1 pickles (``_metadata``, ``_parent``,
    ``_content`` / ``_val``), so a config pickled with them looks like one in a release file."""
    classes: dict[str, type] = {}
    for mod, names in {
        "omegaconf.dictconfig": ["DictConfig"],
        "omegaconf.listconfig": ["ListConfig"],
        "omegaconf.nodes": ["AnyNode"],
        "omegaconf.base": ["Metadata", "ContainerMetadata"],
    }.items():
        module = types.ModuleType(mod)
        for name in names:
            cls = type(name, (), {"__module__": mod})
            setattr(module, name, cls)
            classes[name] = cls
        monkeypatch.setitem(sys.modules, mod, module)
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    return classes


def _omegaconf_like(value, c: dict[str, type], parent=None, key=None):
    def meta(kind: str):
        m = c[kind]()
        m.__dict__.update(
            ref_type=typing.Any,
            object_type=dict if kind == "ContainerMetadata" else None,
            optional=True,
            key=key,
            flags={},
            flags_root=False,
            resolver_cache=collections.defaultdict(dict),
            key_type=typing.Any,
            element_type=typing.Any,
        )
        return m

    if isinstance(value, dict):
        node = c["DictConfig"]()
        node.__dict__.update(_metadata=meta("ContainerMetadata"), _parent=parent)
        node._content = {k: _omegaconf_like(v, c, node, k) for k, v in value.items()}
    elif isinstance(value, list):
        node = c["ListConfig"]()
        node.__dict__.update(_metadata=meta("ContainerMetadata"), _parent=parent)
        node._content = [_omegaconf_like(v, c, node, i) for i, v in enumerate(value)]
    else:
        node = c["AnyNode"]()
        node.__dict__.update(_metadata=meta("Metadata"), _parent=parent, _val=value)
    return node


def test_official_release_layout_still_loads(tmp_path, monkeypatch):
    official = {
        "model": official_tiny_model_section(multi_label="${data.text_aug.multi_label}"),
        "data": {"text_aug": {"multi_label": 2}},
        "tag": None,
    }
    src = groupvit.GroupViT(GroupViTConfig.from_official({**official["model"], "multi_label": 2}))
    with monkeypatch.context() as m:
        c = _install_fake_omegaconf(m)
        payload = {
            "model": src.state_dict(),
            "config": _omegaconf_like(official, c),
            "epoch": 29,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "params": [0, 1]}]},
            "max_miou": 52.3,
            "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}},
        }
        torch.save(payload, tmp_path / "release.pth")
    assert "omegaconf.dictconfig" not in sys.modules  # loading must not need (or import) omegaconf
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_checkpoint(tmp_path / "release.pth")  # the architecture comes from the config
    assert model.cfg == src.cfg and model.cfg.vision.depths == (1, 1, 1) and model.cfg.vision.num_heads == 2
    assert model.cfg.multi_label == 2  # the release configs' ${data.text_aug.multi_label} reference, resolved
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in src.state_dict().items())


def test_not_a_checkpoint_gives_no_unsafe_advice(tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(CheckpointReadError, match="not a torch checkpoint") as e:
        load_checkpoint(png)
    assert "weights_only" not in str(e.value)
    rc = segment_cli.main(["--checkpoint", str(png), "--classes", "a", "--out", str(tmp_path / "o"), str(png)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a torch checkpoint" in err and "weights_only" not in err
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(CheckpointReadError, match="holds a list"):
        load_checkpoint(tmp_path / "list.pt")


def test_resume_rejects_directory_latest(tmp_path):
    (tmp_path / "latest.pt").mkdir()
    with pytest.raises(IsADirectoryError, match="not a file"):
        resolve_resume("auto", tmp_path)
    with pytest.raises(IsADirectoryError, match="not a file"):
        resolve_resume(str(tmp_path), tmp_path)
    with pytest.raises(IsADirectoryError, match="not a file"):  # a fresh run could never save its checkpoint there
        check_fresh_start(tmp_path, resuming=False, overwrite=True)


# ---- HuggingFace folders, safetensors, hf: -------------------------------------------------------------------------


def _hf_random(cfg):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(11)
    hf = transformers.GroupViTModel(transformers.GroupViTConfig(**hf_config_kwargs(cfg))).eval()
    with torch.no_grad():  # HF starts group tokens and pos-embed at zero: randomise them
        for name, p in hf.named_parameters():
            if "group_token" in name or "position" in name:
                p.normal_(0, 0.5)
    return hf


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_huggingface_folder_loads_with_its_config(tmp_path, safe):
    cfg = groupvit.PRESETS["groupvit-tiny"].replace(**{"vision.num_heads": 4, "text.heads": 4})  # heads not guessable
    hf = _hf_random(cfg)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    if not safe:  # the hub's nvidia/groupvit-* repos ship pytorch_model.bin (transformers 5 writes safetensors only)
        (folder / "model.safetensors").unlink()
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    ours = load_checkpoint(folder).eval()
    assert ours.cfg.vision == cfg.vision and ours.cfg.text == cfg.text and ours.cfg.multi_label == 0
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf.get_image_features(pixel_values=images).pooler_output
        torch.testing.assert_close(ours.encode_image(images), ref, atol=1e-5, rtol=1e-5)


def test_safetensors_file_and_export_folder(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    with pytest.warns(UserWarning, match="multi_label_logit_scale"):
        sd = groupvit.export_hf(tiny, tmp_path / "export")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    back = load_checkpoint(tmp_path / "w.safetensors", groupvit.create_model("groupvit-tiny"))
    assert all(
        torch.equal(v, back.state_dict()[k]) for k, v in tiny.state_dict().items() if k != "multi_label_logit_scale"
    )
    hf = transformers.GroupViTModel.from_pretrained(tmp_path / "export").eval()  # the folder is save_pretrained's
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            hf.get_image_features(pixel_values=images).pooler_output, tiny.encode_image(images), atol=1e-5, rtol=1e-5
        )
    assert load_checkpoint(tmp_path / "export").cfg.vision == tiny.cfg.vision
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointReadError, match="config.json"):
        load_checkpoint(tmp_path / "empty")


def test_hf_spec_reads_the_hub_cache_and_says_clearly_when_it_cannot_fetch(tmp_path, monkeypatch):
    constants = pytest.importorskip("huggingface_hub.constants")  # read at import: patch the values themselves
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # holds one repository, as downloads do
    cfg = groupvit.PRESETS["groupvit-tiny"]
    repo = tmp_path / "hub" / "models--someone--tiny-groupvit"
    _hf_random(cfg).save_pretrained(repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert load_checkpoint("hf:someone/tiny-groupvit").cfg.vision == cfg.vision
    with pytest.raises(CheckpointReadError, match="cannot fetch hf:nvidia/groupvit-gcc-yfcc.*huggingface-cli download"):
        load_checkpoint("hf:nvidia/groupvit-gcc-yfcc")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(CheckpointReadError, match="pip install huggingface_hub"):
        load_checkpoint("hf:nvidia/groupvit-gcc-yfcc")

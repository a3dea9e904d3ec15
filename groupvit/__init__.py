"""GroupViT with fused Triton kernels.

Quick start::

    import groupvit
    model = groupvit.create_model("groupvit-s")            # or "groupvit-tiny", a GroupViTConfig, overrides
    model = groupvit.load_checkpoint("group_vit_gcc_yfcc_30e-879422e0.pth")  # official, HF or ours
    with groupvit.ops.use_backend("triton"):               # fused kernels (CUDA)
        emb = model.encode_image(images)
"""

from groupvit import ops
from groupvit.checkpoint import export_hf, load_checkpoint, save_model
from groupvit.config import PRESETS, GroupViTConfig, TextConfig, VisionConfig
from groupvit.loss import GroupViTLoss
from groupvit.model import GroupViT, GroupViTOutput, ImageGroups, create_model
from groupvit.segmentation import SegConfig, ZeroShotSegmenter

__all__ = [
    "GroupViT",
    "GroupViTConfig",
    "GroupViTLoss",
    "GroupViTOutput",
    "ImageGroups",
    "PRESETS",
    "TextConfig",
    "SegConfig",
    "VisionConfig",
    "ZeroShotSegmenter",
    "create_model",
    "export_hf",
    "load_checkpoint",
    "ops",
    "save_model",
]

"""GroupViT's training objective: image-text InfoNCE + multi-label InfoNCE, through
:func:`groupvit.ops.contrastive_loss`.

Under ``torch.distributed`` each rank scores its local rows against all-gathered columns (labels offset by rank,
gradients through the gather); with the ``triton`` backend the fused kernel never builds the logits matrix.
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from groupvit import ops
from groupvit.model import GroupViTOutput


class GroupViTLoss(nn.Module):
    """``L = L_itc + multi_label_weight * L_ml`` (docs/groupvit.md §7). Returns a dict of 0-dim tensors."""

    def __init__(self, multi_label_weight: float = 1.0, group=None) -> None:
        super().__init__()
        self.multi_label_weight = multi_label_weight
        self.group = group

    def forward(self, out: GroupViTOutput) -> dict[str, Tensor]:
        itc = ops.contrastive_loss(out.image_embeds, out.text_embeds, out.logit_scale, group=self.group)
        losses = {"loss_itc": itc}
        total = itc
        if out.prompt_embeds is not None:
            k = out.prompt_embeds.shape[0] // out.image_embeds.shape[0]
            ml = ops.contrastive_loss(
                out.image_embeds, out.prompt_embeds, out.multi_label_logit_scale, num_prompts=k, group=self.group
            )
            losses["loss_ml"] = ml
            total = total + self.multi_label_weight * ml
        losses["loss"] = total
        return losses

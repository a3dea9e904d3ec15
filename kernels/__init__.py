"""Fused Triton kernels for GroupViT and their eager references.

Ops (one file each): ``assign_attention`` (grouping assignment with straight-through Gumbel-softmax) and
``contrastive_loss`` (image-text and multi-label InfoNCE without materialising the logits).
``kernels.reference`` is the eager spec; ``kernels.registry`` lists ops, shapes and cost models.

Nothing here imports triton at package import time: the Triton modules are loaded lazily by
:mod:`groupvit.ops`, so ``import groupvit`` works on machines where triton cannot launch.

Dim letters: B batch, G groups, N image tokens, C channels, H heads, L sequence length, D embedding dim,
K prompts per image, W world size.
"""

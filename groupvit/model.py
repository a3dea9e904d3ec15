"""GroupViT: hierarchical grouping image encoder, CLIP-style text encoder, MLP projectors, learnable temperatures.

Parameter names reproduce the official release's state-dict layout (``img_encoder.*``, ``text_encoder.*``,
``img_projector.*``, ``text_projector.*``, ``logit_scale``, ``multi_label_logit_scale``), so official checkpoints
load by name (see :mod:`groupvit.checkpoint`). Shapes use B batch, N image tokens, G groups, C width, L text
length, D embedding dim, K prompts per caption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from groupvit.config import GroupViTConfig, TextConfig, VisionConfig, get_config
from groupvit.grouping import GroupingBlock, GroupingMaps
from groupvit.layers import Block, MixerMlp, TextBlock
from kernels.reference import clamped_scale


class PatchEmbed(nn.Module):
    """Conv patchify ``[B, 3, H, W] -> [B, N, C]`` followed by LayerNorm."""

    def __init__(self, patch_size: int, in_chans: int, dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        x = self.proj(x)  # [B, C, h, w]
        hw = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), hw  # [B, N, C]


class GroupingStage(nn.Module):
    """One stage: (optional) group tokens appended to the image tokens, transformer blocks, then (optional) a
    grouping block that merges the image tokens into the stage's output groups."""

    def __init__(self, cfg: VisionConfig, stage: int, drop_path: list[float]) -> None:
        super().__init__()
        c = cfg.embed_dim
        self.num_group_token = cfg.num_group_tokens[stage]
        self.blocks = nn.ModuleList(
            Block(c, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, drop_path=p) for p in drop_path
        )
        if self.num_group_token > 0:
            self.group_token = nn.Parameter(torch.zeros(1, self.num_group_token, c))
            out_groups = cfg.num_output_groups[stage]
            self.downsample = GroupingBlock(
                c,
                cfg.num_heads,
                self.num_group_token,
                out_groups,
                mlp_ratio=cfg.group_mlp_ratio,
                hard=cfg.hard_assignment,
                tau=cfg.gumbel_tau,
                eps=cfg.assign_eps,
                pre_assign=cfg.pre_assign_attn,
            )
        else:
            self.downsample = None
        if stage > 0 and self.num_group_token > 0:
            prev = cfg.num_output_groups[stage - 1]
            hidden = int(cfg.group_mlp_ratio[0] * c)
            self.group_projector = nn.Sequential(nn.LayerNorm(c), MixerMlp(prev, hidden, self.num_group_token))
        else:
            self.group_projector = None

    def forward(
        self,
        x: Tensor,
        prev_group_tokens: Tensor | None,
        *,
        return_maps: bool = False,
    ) -> tuple[Tensor, Tensor | None, GroupingMaps | None]:
        n = x.shape[1]
        t = None
        if self.num_group_token > 0:
            t = self.group_token.expand(x.shape[0], -1, -1)  # [B, G_in, C]
            if self.group_projector is not None and prev_group_tokens is not None:
                t = t + self.group_projector(prev_group_tokens)
            x = torch.cat([x, t], dim=1)  # image tokens first, group tokens second
        for blk in self.blocks:
            x = blk(x)
        maps = None
        if t is not None:
            x, t = x[:, :n], x[:, n:]
            x, maps = self.downsample(x, t, return_maps=return_maps)  # [B, G, C]
        return x, t, maps


@dataclass
class ImageGroups:
    """Everything the image encoder knows about one batch.

    Attributes:
        embedding: projected image embedding ``[B, D]`` (not normalised).
        group_features: final group tokens after the last LayerNorm ``[B, G_last, C]``.
        maps: per grouping stage, soft and hard assignment maps ``[B, G, N]`` (empty unless requested).
        grid: patch grid ``(h, w)`` of the input.
        group_embeddings: projected per-group embeddings ``[B, G_last, D]`` (only from
        :meth:`GroupViT.encode_image_groups`).
    """

    embedding: Tensor
    group_features: Tensor
    maps: list[GroupingMaps] = field(default_factory=list)
    grid: tuple[int, int] = (0, 0)
    group_embeddings: Tensor | None = None


class VisionEncoder(nn.Module):
    """Patch embed -> stages with grouping -> final LN -> mean over groups."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_chans, c)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid_size**2, c))
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:i]) for i in range(len(cfg.depths))]
        self.layers = nn.ModuleList(
            GroupingStage(cfg, i, dpr[s : s + d]) for i, (s, d) in enumerate(zip(starts, cfg.depths))
        )
        self.norm = nn.LayerNorm(c)

    def pos_embed_for(self, h: int, w: int) -> Tensor:
        """Position embedding resized (bicubic, align_corners=False) from the training grid to ``h x w``."""
        g = self.cfg.grid_size
        if (h, w) == (g, g):
            return self.pos_embed
        pe = self.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def forward(
        self, images: Tensor, *, return_maps: bool = False
    ) -> tuple[Tensor, list[GroupingMaps], tuple[int, int]]:
        self._check(images)
        x, (h, w) = self.patch_embed(images)  # [B, N, C]
        x = x + self.pos_embed_for(h, w)
        t = None
        maps: list[GroupingMaps] = []
        return_maps = return_maps or self.cfg.pool == "used"  # pool() counts each group's tokens from the maps
        for stage in self.layers:
            x, t, m = stage(x, t, return_maps=return_maps)
            if m is not None:
                maps.append(m)
        return self.norm(x), maps, (h, w)  # [B, G_last, C]

    def pool(self, z: Tensor, maps: list[GroupingMaps]) -> Tensor:
        """Final group features ``[B, G, C]`` -> image feature ``[B, C]``: the mean over all groups (``pool="all"``,
        official) or over the groups that hold at least one image token (``pool="used"``; token counts chained
        through every stage's hard map, no gradient through the choice)."""
        if self.cfg.pool == "all":
            return z.mean(dim=1)
        if not maps:
            raise ValueError("VisionEncoder.pool: pool='used' needs the grouping maps of forward()")
        n = torch.ones(z.shape[0], maps[0].hard.shape[-1], 1, device=z.device, dtype=z.dtype)  # [B, N, 1]
        for m in maps:
            n = m.hard.detach().to(z.dtype) @ n  # tokens per group, [B, G, 1]
        used = (n > 0.5).to(z.dtype)
        return (z * used).sum(dim=1) / used.sum(dim=1).clamp(min=1)

    def _check(self, images: Tensor) -> None:
        cfg = self.cfg
        if images.dim() != 4 or images.shape[1] != cfg.in_chans:
            raise ValueError(f"images must be [B, {cfg.in_chans}, H, W], got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised), got {images.dtype}")
        h, w = images.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the patch size {cfg.patch_size}; "
                f"resize or pad it (e.g. to {math.ceil(h / cfg.patch_size) * cfg.patch_size}x"
                f"{math.ceil(w / cfg.patch_size) * cfg.patch_size})"
            )


class TextTransformerStack(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(TextBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers))

    def forward(self, x: Tensor) -> Tensor:
        for blk in self.resblocks:
            x = blk(x)
        return x


@dataclass(frozen=True)
class TextPlan:
    """Which rows of a token batch ``[N, L]`` run at which length: the exact text trimming of :class:`TextEncoder`.

    With causal attention and the feature read at the EOT token, the positions after a sequence's EOT change
    nothing, so each sequence runs only up to its EOT + 1, rounded up to a multiple of ``text.trim_multiple`` (a few
    bucket lengths: few shapes for torch.compile). Built on the host by :meth:`TextEncoder.plan` -- from CPU tokens
    before they are moved, so the training step needs no host read of device memory -- then moved with :meth:`to`.

    Attributes:
        groups: per bucket ``(rows [n] or None for all rows in order, EOT positions [n], length)``.
        inverse: ``[N]`` row of each sequence in the concatenated group outputs (None: already in order).
    """

    groups: tuple[tuple[Tensor | None, Tensor, int], ...]
    inverse: Tensor | None

    def to(self, device: torch.device | str) -> "TextPlan":
        """The same plan with its index tensors on ``device``: one transfer, then views."""
        parts = [t for rows, eot, _ in self.groups for t in (rows, eot) if t is not None]
        parts += [self.inverse] if self.inverse is not None else []
        flat = torch.cat(parts).to(device, non_blocking=True)
        views = iter(flat.split([t.numel() for t in parts]))
        groups = tuple((None if rows is None else next(views), next(views), length) for rows, _, length in self.groups)
        return TextPlan(groups, next(views) if self.inverse is not None else None)

    def mark_dynamic(self) -> "TextPlan":
        """Mark the group sizes dynamic for ``torch.compile``: one graph serves every batch with the same number of
        trim lengths (sizes of 1 are still specialised), instead of a recompile when the sizes first change."""
        for rows, eot, _ in self.groups:
            for t in (rows, eot):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)
        return self


class TextEncoder(nn.Module):
    """CLIP-style causal transformer; the feature is taken at the largest token id (EOT) of each sequence.

    Each sequence runs only up to its EOT (rounded up to ``cfg.trim_multiple``, see :class:`TextPlan`); the result
    equals the full-length computation up to float rounding."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.zeros(cfg.context_length, cfg.width))
        self.transformer = TextTransformerStack(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)

    def forward(self, tokens: Tensor, plan: TextPlan | None = None) -> Tensor:
        """Features ``[N, W]`` of token ids ``[N, L]``. ``plan``: from :meth:`plan` of these very tokens (moved to
        their device); without it the plan is made here, with one host read of ``tokens`` (a sync on a GPU)."""
        if plan is None:
            plan = self.plan(tokens).to(tokens.device)
        elif tokens.dim() != 2 or sum(eot.shape[0] for _, eot, _ in plan.groups) != tokens.shape[0]:
            raise ValueError(
                f"the text plan covers {sum(e.shape[0] for _, e, _ in plan.groups)} rows but the tokens "
                f"are {tuple(tokens.shape)}; make it with plan() of these tokens"
            )
        feats = []
        for rows, eot, length in plan.groups:
            t = (tokens if rows is None else tokens.index_select(0, rows))[:, :length]  # [n, l]
            x = self.token_embedding(t) + self.positional_embedding[:length]  # [n, l, W]
            x = self.transformer(x)
            feats.append(x[torch.arange(x.shape[0], device=x.device), eot])  # [n, W]
        x = feats[0] if len(feats) == 1 else torch.cat(feats)
        if plan.inverse is not None:
            x = x.index_select(0, plan.inverse)
        return self.ln_final(x)  # row-wise: the same as normalising every position, then picking the EOT

    @torch.compiler.disable  # host-side planning: runs before the compiled step (train.loop), never inside it
    def plan(self, tokens: Tensor) -> TextPlan:
        """Check token ids ``[N, L]`` and plan their trimmed run; one host read (free for CPU tokens). The plan's
        tensors are on the CPU: move it with :meth:`TextPlan.to`."""
        cfg = self.cfg
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be an integer tensor [N, L], got {tuple(tokens.shape)} {tokens.dtype}")
        n, length = tokens.shape
        if length > cfg.context_length:
            raise ValueError(f"text length {length} exceeds the context length {cfg.context_length}")
        if n == 0 or length == 0:
            raise ValueError(f"empty token batch {tuple(tokens.shape)}")
        cpu = tokens.detach().cpu()
        lo, hi = int(cpu.min()), int(cpu.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got range [{lo}, {hi}]")
        eot = cpu.argmax(dim=-1)  # [N] the EOT is the largest id
        m = cfg.trim_multiple
        if m == 0:
            return TextPlan(((None, eot, length),), None)
        bucket = ((eot + m) // m * m).clamp(max=length)  # EOT + 1 rounded up to a multiple of m, at most L
        lengths = bucket.unique().tolist()  # ascending
        if len(lengths) == 1:
            return TextPlan(((None, eot, lengths[0]),), None)
        groups, order = [], []
        for v in lengths:
            rows = (bucket == v).nonzero().flatten()
            groups.append((rows, eot[rows], v))
            order.append(rows)
        inverse = torch.empty(n, dtype=torch.int64)
        inverse[torch.cat(order)] = torch.arange(n)
        return TextPlan(tuple(groups), inverse)


class ProjectMLP(nn.Module):
    """``in -> [Linear -> BN -> ReLU] x (layers-1) -> Linear -> out``, weights stored as 1x1 Conv1d like the
    official release (``linear_hidden.{3i}`` conv, ``.{3i+1}`` BN, ``linear_out``)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            mods += [nn.Conv1d(d, hidden, 1), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            d = hidden
        self.linear_hidden = nn.Sequential(*mods)
        self.linear_out = nn.Conv1d(d, out_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1], 1)  # [B', in, 1]
        x = self.linear_out(self.linear_hidden(x))
        return x.reshape(*lead, -1)


@dataclass
class GroupViTOutput:
    """Training-forward result: L2-normalised embeddings and the raw temperature parameters."""

    image_embeds: Tensor  # [B, D]
    text_embeds: Tensor  # [B, D]
    prompt_embeds: Tensor | None  # [B*K, D] (prompt k of image i at row i*K + k) or None
    logit_scale: Tensor  # 0-dim raw theta; the logits use min(exp(theta), 100)
    multi_label_logit_scale: Tensor | None


class GroupViT(nn.Module):
    """GroupViT (Xu et al., CVPR 2022). Build with :func:`groupvit.create_model`."""

    def __init__(self, cfg: GroupViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.img_encoder = VisionEncoder(cfg.vision)
        self.text_encoder = TextEncoder(cfg.text)
        self.img_projector = ProjectMLP(cfg.vision.embed_dim, cfg.proj_hidden_dim, cfg.output_dim, cfg.proj_num_layers)
        self.text_projector = ProjectMLP(cfg.text.width, cfg.proj_hidden_dim, cfg.output_dim, cfg.proj_num_layers)
        self.logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        if cfg.multi_label > 0:
            self.multi_label_logit_scale = nn.Parameter(torch.tensor(cfg.logit_scale_init))
        else:
            self.multi_label_logit_scale = None
        self.reset_parameters()

    # ---- init (docs/groupvit.md §4) ------------------------------------------------------------------------------

    def reset_parameters(self) -> None:
        for m in self.img_encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.img_encoder.pos_embed, std=0.02)
        for i, stage in enumerate(self.img_encoder.layers):
            if stage.num_group_token > 0:
                if i == 0:
                    nn.init.trunc_normal_(stage.group_token, std=0.02)
                else:
                    nn.init.zeros_(stage.group_token)  # the projector of the previous groups supplies the signal
        t, w = self.text_encoder, self.cfg.text.width
        nn.init.normal_(t.token_embedding.weight, std=0.02)
        nn.init.normal_(t.positional_embedding, std=0.01)
        proj_std = w**-0.5 * (2 * self.cfg.text.layers) ** -0.5
        for blk in t.transformer.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=w**-0.5)
            nn.init.zeros_(blk.attn.in_proj_bias)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.out_proj.bias)
            nn.init.normal_(blk.mlp.c_fc.weight, std=(2 * w) ** -0.5)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)

    def grouping_parameters(self) -> list[nn.Parameter]:
        """The parameters that decide which group each image token joins: patch and position embedding, the group
        tokens and their projectors, and in every grouping block the norms, token MLP, pre-assign cross-attention
        and the assignment's query/key projections (not the values or anything after the assignment). Exactly what
        decides a first grouping stage without transformer blocks (the demo's layout); blocks, and for later stages
        the earlier stages' outputs, shape the keys too but are not listed."""
        enc, out = self.img_encoder, []
        out += [enc.pos_embed, *enc.patch_embed.parameters()]
        for stage in enc.layers:
            if stage.downsample is None:
                continue
            ds = stage.downsample
            out.append(stage.group_token)
            if stage.group_projector is not None:
                out += stage.group_projector.parameters()
            for mod in (
                ds.norm_tokens,
                ds.mlp_inter,
                ds.norm_post_tokens,
                ds.norm_x,
                ds.pre_assign_attn,
                ds.assign.q_proj,
                ds.assign.k_proj,
            ):
                if mod is not None:
                    out += mod.parameters()
        return out

    # ---- encoders ------------------------------------------------------------------------------------------------

    def encode_image(self, images: Tensor) -> Tensor:
        """Projected image embedding ``[B, D]`` (not normalised) of normalised images ``[B, 3, H, W]``."""
        z, maps, _ = self.img_encoder(images)  # [B, G_last, C]
        return self.img_projector(self.img_encoder.pool(z, maps))

    def encode_image_groups(self, images: Tensor, *, return_maps: bool = True) -> ImageGroups:
        """Image embedding plus the grouping internals: per-stage soft/hard maps ``[B, G, N]``, the final group
        features ``[B, G_last, C]`` and their projected embeddings ``[B, G_last, D]`` (segmentation uses these)."""
        z, maps, grid = self.img_encoder(images, return_maps=return_maps)
        return ImageGroups(
            embedding=self.img_projector(self.img_encoder.pool(z, maps)),
            group_features=z,
            maps=maps,
            grid=grid,
            group_embeddings=self.img_projector(z),
        )

    def encode_text(self, tokens: Tensor) -> Tensor:
        """Projected text embedding ``[..., D]`` (not normalised) of token ids ``[..., L]``."""
        lead = tokens.shape[:-1]
        x = self.text_encoder(tokens.reshape(-1, tokens.shape[-1]))
        return self.text_projector(x).reshape(*lead, -1)

    def plan_text(self, texts: Tensor) -> TextPlan:
        """:meth:`TextEncoder.plan` of the rows of ``texts [..., L]`` (as :meth:`forward` flattens them), on the CPU."""
        return self.text_encoder.plan(texts.reshape(-1, texts.shape[-1]))

    def logits_per_image(self, images: Tensor, tokens: Tensor) -> Tensor:
        """``min(exp(theta), 100) * normalize(image) @ normalize(text)^T``, ``[B_img, B_txt]``."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(tokens), dim=-1)
        return clamped_scale(self.logit_scale) * img @ txt.t()

    # ---- training forward ---------------------------------------------------------------------------------------

    def forward(self, images: Tensor, texts: Tensor, *, text_plan: TextPlan | None = None) -> GroupViTOutput:
        """Normalised embeddings for the losses: :meth:`project` of :meth:`forward_towers`.

        Args:
            images: ``[B, 3, H, W]``.
            texts: ``[B, L]`` captions, or ``[B, 1+K, L]`` caption followed by K noun prompts.
            text_plan: :meth:`plan_text` of ``texts`` (made on the host before they moved: no host read here);
                None: planned here, with one host read of ``texts``.
        """
        features = self.forward_towers(images, texts, text_plan=text_plan)  # validates the shapes
        return self.project(*features, num_texts=texts.shape[1] if texts.dim() == 3 else 1)

    def forward_towers(
        self, images: Tensor, texts: Tensor, *, text_plan: TextPlan | None = None
    ) -> tuple[Tensor, Tensor]:
        """The two towers up to their pooled outputs, before the projectors (the only cross-sample layers: their
        BatchNorm): image features ``[B, C]`` (mean over the final groups) and text features ``[B*(1+K), W]``
        (row ``b*(1+K) + j``: caption ``j = 0``, prompts ``j >= 1`` of image b). Arguments as :meth:`forward`."""
        if texts.dim() == 2:
            texts = texts[:, None]
        if texts.dim() != 3 or texts.shape[0] != images.shape[0]:
            raise ValueError(
                f"texts must be [B, L] or [B, 1+K, L] with B = {images.shape[0]}, got {tuple(texts.shape)}"
            )
        if texts.shape[1] > 1 and self.multi_label_logit_scale is None:
            raise ValueError(f"texts carry {texts.shape[1] - 1} prompts but the model has multi_label=0")
        z, maps, _ = self.img_encoder(images)  # [B, G_last, C]
        return self.img_encoder.pool(z, maps), self.text_encoder(texts.reshape(-1, texts.shape[-1]), text_plan)

    def project(self, image_features: Tensor, text_features: Tensor, *, num_texts: int) -> GroupViTOutput:
        """Projectors and L2 normalisation of :meth:`forward_towers`' outputs ``[B, C]``, ``[B*num_texts, W]``
        (``num_texts`` = 1+K); BatchNorm statistics span all the rows given."""
        k = num_texts - 1
        img = F.normalize(self.img_projector(image_features), dim=-1)  # [B, D]
        txt = F.normalize(self.text_projector(text_features), dim=-1).reshape(-1, num_texts, img.shape[-1])
        prompts = txt[:, 1:].reshape(-1, txt.shape[-1]) if k > 0 else None  # [B*K, D]
        return GroupViTOutput(
            img, txt[:, 0], prompts, self.logit_scale, self.multi_label_logit_scale if k > 0 else None
        )


def create_model(preset_or_config: str | GroupViTConfig | dict = "groupvit-s", **overrides) -> GroupViT:
    """Build a randomly initialised GroupViT from a preset name (``groupvit-s``, ``groupvit-tiny``), a
    :class:`GroupViTConfig` or a dict, with optional overrides such as ``multi_label=0`` or
    ``**{"vision.depths": (2, 1, 1)}``."""
    return GroupViT(get_config(preset_or_config, **overrides))

"""The eager GroupViT against HuggingFace transformers' independent port, plus config, checkpoint and input checks."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import groupvit
from groupvit.checkpoint import from_hf_state_dict, hf_config_kwargs, load_checkpoint, save_model, to_hf_state_dict
from groupvit.config import GroupViTConfig
from tests.helpers import assert_close, official_tiny_model_section

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _tokens(b: int, length: int, vocab: int, gen: torch.Generator) -> torch.Tensor:
    """SOT, random ids, EOT (the largest id), zero padding: rows of different lengths."""
    t = torch.zeros(b, length, dtype=torch.long)
    for i in range(b):
        n = 2 + int(torch.randint(0, length - 3, (1,), generator=gen))
        t[i, 0] = vocab - 2
        t[i, 1:n] = torch.randint(1, vocab - 2, (n - 1,), generator=gen)
        t[i, n] = vocab - 1
    return t


def _hf_model(cfg: GroupViTConfig):
    hf = transformers.GroupViTModel(transformers.GroupViTConfig(**hf_config_kwargs(cfg))).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # HF starts group tokens / pos-embed at zero and BN at identity: randomise everything
        for name, p in hf.named_parameters():
            p.copy_(
                torch.randn(p.shape, generator=gen) * (0.02 if p.dim() > 1 else 0.1)
                + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
            )
        for name, b in hf.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return hf


@pytest.mark.parametrize("preset", ["groupvit-s", "groupvit-tiny"])
def test_matches_huggingface_port(preset):
    cfg = groupvit.PRESETS[preset]
    hf = _hf_model(cfg)
    ours = load_checkpoint(hf.state_dict(), groupvit.create_model(cfg)).eval()
    gen = torch.Generator().manual_seed(2)
    size = cfg.vision.img_size
    images = torch.randn(2, 3, size, size, generator=gen)
    tokens = _tokens(3, cfg.text.context_length, cfg.text.vocab_size, gen)
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=images, output_attentions=True, return_dict=True)
        img = ours.encode_image(images)
        txt = ours.encode_text(tokens)
        groups = ours.encode_image_groups(images)
        logits = ours.logits_per_image(images, tokens)
    assert_close(img, hf.get_image_features(pixel_values=images).pooler_output, atol=1e-5, name="image")
    assert_close(txt, hf.get_text_features(input_ids=tokens).pooler_output, atol=1e-5, name="text")
    assert_close(F.normalize(img, dim=-1), ref.image_embeds, atol=1e-5, name="image_embeds")
    assert_close(logits, ref.logits_per_image, atol=1e-4, rtol=1e-5, name="logits")
    hf_maps = ref.vision_model_output.attentions
    assert len(hf_maps) == len(groups.maps) == 2
    for ours_m, hf_m in zip(groups.maps, hf_maps):
        assert_close(ours_m.soft, hf_m, atol=1e-5, name="soft map")
        # eval-mode hard map = one-hot of the argmax group of every token
        onehot = F.one_hot(hf_m.argmax(dim=1), hf_m.shape[1]).transpose(1, 2).to(ours_m.hard.dtype)
        assert_close(ours_m.hard, onehot, atol=1e-6, name="hard map")


def test_parameter_count_of_release_preset():
    model = groupvit.create_model("groupvit-s")
    assert sum(p.numel() for p in model.parameters()) == 55_726_610
    assert len(model.state_dict()) == 407  # the official release's key count


def test_hf_round_trip_is_bit_identical():
    sd = groupvit.create_model("groupvit-s").state_dict()
    hf = to_hf_state_dict(sd)
    assert len(hf) == 502  # the HF port's key count
    back = from_hf_state_dict(hf)
    assert set(back) == set(sd) - {"multi_label_logit_scale"}
    for k, v in back.items():
        assert v.dtype == sd[k].dtype and v.shape == sd[k].shape and torch.equal(v, sd[k]), k


def test_load_official_release_layout_and_own_checkpoint(tmp_path):
    src = groupvit.create_model("groupvit-tiny")
    official_cfg = {"model": official_tiny_model_section(multi_label=3)}
    cfg = GroupViTConfig.from_official(official_cfg["model"]).replace(proj_hidden_dim=128)
    assert cfg.vision == src.cfg.vision and cfg.text == src.cfg.text
    path = tmp_path / "release.pth"
    torch.save({"model": src.state_dict(), "config": official_cfg, "epoch": 3}, path)
    loaded = load_checkpoint(path, groupvit.create_model(cfg))
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # bare official state dict, architecture inferred from shapes
    inferred = load_checkpoint(src.state_dict())
    assert inferred.cfg.vision.num_group_tokens == (8, 4, 0) and inferred.cfg.output_dim == 32
    # our own format round-trips config and weights
    save_model(src, tmp_path / "ours.pt")
    ours = load_checkpoint(tmp_path / "ours.pt")
    assert ours.cfg == src.cfg
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in src.state_dict().items())


def test_checkpoint_errors(tmp_path):
    model = groupvit.create_model("groupvit-tiny")
    with pytest.raises(ValueError, match="unknown checkpoint layout"):
        load_checkpoint({"encoder.weight": torch.zeros(2)}, model)
    sd = model.state_dict()
    sd.pop("img_encoder.norm.weight")
    with pytest.raises(ValueError, match="missing.*img_encoder.norm.weight"):
        load_checkpoint(sd, model)
    big = groupvit.create_model("groupvit-tiny", output_dim=16).state_dict()
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checkpoint(big, model)
    broken = tmp_path / "broken.pth"
    torch.save(model.state_dict(), broken)
    broken.write_bytes(broken.read_bytes()[:2000])
    with pytest.raises(ValueError, match="not a readable"):
        load_checkpoint(broken, model)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.pth", model)


def test_bad_inputs_raise_clear_errors():
    model = groupvit.create_model("groupvit-tiny").eval()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model.encode_image(torch.randn(1, 4, 32, 32))
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        model.encode_image(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 49408\)"):
        model.encode_text(torch.tensor([[49406, 49408, 0]]))
    with pytest.raises(ValueError, match="exceeds the context length"):
        model.encode_text(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown preset"):
        groupvit.create_model("groupvit-xl")
    with pytest.raises(ValueError, match="unknown vision config field"):
        groupvit.create_model("groupvit-tiny", **{"vision.depth": 3})


def test_any_input_size_interpolates_position_embedding():
    model = groupvit.create_model("groupvit-tiny").eval()
    with torch.no_grad():
        out = model.encode_image_groups(torch.randn(2, 3, 48, 40))
    assert out.grid == (12, 10)
    assert out.maps[0].soft.shape == (2, 8, 120)
    assert torch.allclose(out.maps[0].soft.sum(1), torch.ones(2, 120), atol=1e-5)
    pe = model.img_encoder.pos_embed_for(8, 8)
    assert torch.equal(pe, model.img_encoder.pos_embed)  # training grid: untouched


def test_train_mode_forward_backward_with_fixed_noise():
    """Train mode: Gumbel noise drawn under a fixed seed gives a reproducible loss; every parameter gets a
    finite gradient; hard maps are exact one-hots of (logits + noise)."""
    model = groupvit.create_model("groupvit-tiny").train()
    loss_fn = groupvit.GroupViTLoss()
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, 32, 32, generator=gen)
    texts = torch.stack([_tokens(4, 16, 49408, gen) for _ in range(4)], dim=1)  # [B, 1+K, L]
    losses = []
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(7)
        out = model(images, texts)
        loss = loss_fn(out)
        loss["loss"].backward()
        losses.append(loss["loss"].item())
        grads = {n: p.grad for n, p in model.named_parameters()}
    assert losses[0] == losses[1]
    missing = [n for n, g in grads.items() if g is None]
    assert missing == [], missing
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["img_encoder.layers.0.group_token"].abs().sum() > 0
    assert grads["multi_label_logit_scale"].abs() > 0
    torch.manual_seed(8)
    groups = model.encode_image_groups(images)
    hard = groups.maps[0].hard
    assert torch.allclose(hard.sum(1), torch.ones_like(hard.sum(1)), atol=1e-6)
    assert ((hard - hard.round()).abs() < 1e-6).all()


@pytest.mark.parametrize("pre_assign", [False, True])
def test_grouping_block_without_pre_assign_reads_only_assigned_tokens(pre_assign):
    """Without the pre-assign cross-attention a group's output depends on the image only through the tokens assigned
    to it: perturbing one group's tokens (assignment unchanged) leaves every other group's output as it was. With
    the official cross-attention the other groups do change (the check can fail)."""
    from groupvit.grouping import GroupingBlock

    torch.manual_seed(0)
    block = GroupingBlock(32, 2, num_group_tokens=6, num_output_groups=4, pre_assign=pre_assign).eval()
    assert (block.pre_assign_attn is not None) == pre_assign
    x, t = torch.randn(2, 21, 32), torch.randn(2, 6, 32)
    with torch.no_grad():
        o, maps = block(x, t, return_maps=True)
        group = maps.hard.argmax(1)  # [B, N]
        k = int(group[0, 0])
        x2 = x.clone()
        x2[0, group[0] == k] += 1e-3 * torch.randn_like(x2[0, group[0] == k])
        o2, maps2 = block(x2, t, return_maps=True)
    assert torch.equal(maps2.hard.argmax(1), group)
    others = [g for g in range(4) if g != k]
    assert not torch.allclose(o2[0, k], o[0, k])
    assert torch.equal(o2[1], o[1])
    assert torch.allclose(o2[0, others], o[0, others], atol=1e-6) != pre_assign


def test_demo_preset_model_without_pre_assign_attention():
    """The demo preset (``vision.pre_assign_attn=False``): no cross-attention weights, the architecture survives a bare
    state dict, and HF export refuses (HF GroupViT always has the cross-attention)."""
    from train.config import load_config

    cfg = load_config(preset="demo")
    model = groupvit.create_model(cfg.model.preset, **cfg.model_overrides())
    assert not model.cfg.vision.pre_assign_attn
    assert not any("pre_assign_attn" in k for k in model.state_dict())
    inferred = load_checkpoint(model.state_dict())
    v, w = inferred.cfg.vision, model.cfg.vision
    assert (v.pre_assign_attn, v.depths, v.num_group_tokens, v.embed_dim) == (
        False,
        w.depths,
        w.num_group_tokens,
        w.embed_dim,
    )
    with pytest.raises(ValueError, match="pre-assign"):
        groupvit.export_hf(model)
    with pytest.raises(ValueError, match="pre-assign"):
        hf_config_kwargs(model.cfg)


def test_pool_used_averages_only_groups_that_hold_tokens():
    """``vision.pool="used"`` (the demo preset): the image feature is the mean of the final groups that received at
    least one patch, counted here per image from the argmax assignment of every stage (independently of
    ``VisionEncoder.pool``'s chained matrix products); ``"all"`` stays the plain mean."""
    torch.manual_seed(3)
    over = {"vision.depths": [0, 0, 0], "vision.num_group_tokens": [16, 6, 0], "vision.num_output_groups": [16, 6]}
    used = groupvit.create_model("groupvit-tiny", **over, **{"vision.pool": "used"}).eval()
    plain = groupvit.create_model("groupvit-tiny", **over).eval()
    plain.load_state_dict(used.state_dict())
    images = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        g = used.encode_image_groups(images, return_maps=True)
        emb_plain = plain.encode_image(images)
    z = g.group_features  # [B, G, C]
    expected, n_used = [], []
    for b in range(images.shape[0]):
        group_of = g.maps[0].hard[b].argmax(0)  # [N] stage-1 group of every patch
        group_of = g.maps[1].hard[b].argmax(0)[group_of]  # [N] final group of every patch
        keep = torch.bincount(group_of, minlength=z.shape[1]) > 0
        n_used.append(int(keep.sum()))
        expected.append(z[b, keep].mean(0))
    assert min(n_used) < z.shape[1], n_used  # some groups are empty: the two pools differ
    with torch.no_grad():
        want = used.img_projector(torch.stack(expected))
        torch.testing.assert_close(g.embedding, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(used.encode_image(images), want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb_plain, plain.img_projector(z.mean(1)), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(emb_plain, g.embedding, atol=1e-3)
    used.train()  # training: the Gumbel-noised assignment decides, gradients flow
    out = used(images, torch.randint(1, 400, (5, 1 + 3, 16)))
    groupvit.GroupViTLoss()(out)["loss"].backward()
    assert all(p.grad is not None for p in used.img_encoder.layers[0].downsample.assign.parameters())
    with pytest.raises(ValueError, match="pool"):
        groupvit.create_model("groupvit-tiny", **{"vision.pool": "nonempty"})
    with pytest.raises(ValueError, match="averages all final groups"):
        groupvit.export_hf(used)


def test_grouping_parameters_are_what_decides_the_assignment():
    """One grouping stage without blocks (the demo's layout): perturbing any parameter *not* in
    ``grouping_parameters()`` leaves the hard assignment unchanged; perturbing the listed ones changes it (the
    demo's ``optim.freeze_grouping_steps`` freezes them)."""
    torch.manual_seed(0)
    over = {"vision.depths": [0, 0], "vision.num_group_tokens": [8, 0], "vision.num_output_groups": [8]}
    model = groupvit.create_model("groupvit-tiny", **over).eval()
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def assignment() -> list[torch.Tensor]:
        with torch.no_grad():
            return [m.hard.argmax(1) for m in model.encode_image_groups(images).maps]

    before = assignment()
    listed = {id(p) for p in model.grouping_parameters()}
    assert len(listed) == len(model.grouping_parameters())  # no duplicates
    names = [n for n, p in model.named_parameters() if id(p) in listed]
    assert any(".assign.q_proj" in n for n in names) and any("pre_assign_attn" in n for n in names)
    assert not any(".assign.v_proj" in n or ".assign.proj" in n or "mlp_channels" in n for n in names)
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in listed:
                p.add_(torch.randn_like(p))
    assert all(torch.equal(a, b) for a, b in zip(before, assignment()))
    with torch.no_grad():
        for p in model.grouping_parameters():
            p.add_(torch.randn_like(p))
    assert not all(torch.equal(a, b) for a, b in zip(before, assignment()))

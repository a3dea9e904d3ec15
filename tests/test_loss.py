"""The reference contrastive losses against a direct formula, the model loss, and real 2-process gloo runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import groupvit
from kernels.reference import contrastive_loss
from tests.dist_utils import run_distributed


def _direct(img: torch.Tensor, txt: torch.Tensor, theta: float, k: int) -> float:
    """GroupViT's loss written out element by element in float64 Python (docs/groupvit.md §7)."""
    s = min(math.exp(theta), 100.0)
    b = img.shape[0]
    x = [[s * float(img[i] @ txt[j]) for j in range(b * k)] for i in range(b)]  # [B, B*K]

    def lse(v):
        m = max(v)
        return m + math.log(sum(math.exp(a - m) for a in v))

    img_side = sum(lse(x[i]) - sum(x[i][i * k + kk] for kk in range(k)) / k for i in range(b)) / b
    txt_side = sum(lse([x[i][j] for i in range(b)]) - x[j // k][j] for j in range(b * k)) / (b * k)
    return 0.5 * (img_side + txt_side)


@pytest.mark.parametrize("b,k,theta", [(5, 1, 2.6592), (4, 3, 1.0), (3, 3, 5.0)])
def test_reference_loss_equals_direct_formula(b, k, theta):
    g = torch.Generator().manual_seed(b * 10 + k)
    img = F.normalize(torch.randn(b, 8, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(b * k, 8, generator=g, dtype=torch.float64), dim=-1)
    got = contrastive_loss(img, txt, torch.tensor(theta, dtype=torch.float64), num_prompts=k)
    assert abs(got.item() - _direct(img, txt, theta, k)) < 1e-12


def test_clamp_blocks_logit_scale_gradient():
    img = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(4, 8, dtype=torch.float64), dim=-1)
    for theta, expect_zero in [(math.log(50.0), False), (math.log(100.0) + 1e-9, True), (6.0, True)]:
        t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
        contrastive_loss(img, txt, t).backward()
        assert (t.grad == 0).item() == expect_zero, theta


def test_bad_loss_inputs():
    img, txt, t = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0)
    with pytest.raises(ValueError, match="dims differ"):
        contrastive_loss(img, torch.randn(4, 7), t)
    with pytest.raises(ValueError, match="B\\*K"):
        contrastive_loss(img, txt, t, num_prompts=3)
    with pytest.raises(ValueError, match="empty batch"):
        contrastive_loss(img[:0], txt[:0], t)


def test_model_loss_is_sum_of_both_terms():
    model = groupvit.create_model("groupvit-tiny").train()
    texts = torch.randint(1, 49000, (16, 4, 16))
    texts[:, :, -1] = 49407
    out = model(torch.randn(16, 3, 32, 32), texts)
    losses = groupvit.GroupViTLoss()(out)
    img, txt, prompts = out.image_embeds, out.text_embeds, out.prompt_embeds
    assert losses["loss_itc"].item() == pytest.approx(
        _direct(img.detach().double(), txt.detach().double(), math.log(1 / 0.07), 1), rel=1e-5
    )
    assert losses["loss_ml"].item() == pytest.approx(
        _direct(img.detach().double(), prompts.detach().double(), math.log(1 / 0.07), 3), rel=1e-5
    )
    assert losses["loss"].item() == pytest.approx(losses["loss_itc"].item() + losses["loss_ml"].item(), rel=1e-6)


def _rank_loss(rank: int, world: int, img: torch.Tensor, txt: torch.Tensor, theta: float, k: int):
    b = img.shape[0] // world
    mine_i = img[rank * b : (rank + 1) * b].clone().requires_grad_(True)
    mine_t = txt[rank * b * k : (rank + 1) * b * k].clone().requires_grad_(True)
    t = torch.tensor(theta, dtype=img.dtype, requires_grad=True)
    loss = contrastive_loss(mine_i, mine_t, t, num_prompts=k)
    loss.backward()
    return loss.detach(), mine_i.grad, mine_t.grad, t.grad


@pytest.mark.parametrize("k", [1, 3])
def test_two_process_gloo_equals_single_process(k):
    """Each rank scores local rows against gathered columns; mean of rank losses = global loss, and each rank's
    feature gradients (through the differentiable gather) = W x the global loss's gradient on its rows."""
    world, b = 2, 3
    g = torch.Generator().manual_seed(11)
    img = F.normalize(torch.randn(world * b, 16, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(world * b * k, 16, generator=g, dtype=torch.float64), dim=-1)
    theta = 2.3
    results = run_distributed(_rank_loss, world, img, txt, theta, k)
    gi, gt = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    t = torch.tensor(theta, dtype=torch.float64, requires_grad=True)
    ref = contrastive_loss(gi, gt, t, num_prompts=k)
    ref.backward()
    assert abs(sum(r[0].item() for r in results) / world - ref.item()) < 1e-12
    for r, (_, di, dt, dtheta) in enumerate(results):
        torch.testing.assert_close(di, world * gi.grad[r * b : (r + 1) * b], rtol=0, atol=1e-12)
        torch.testing.assert_close(dt, world * gt.grad[r * b * k : (r + 1) * b * k], rtol=0, atol=1e-12)
    # the logit-scale gradient is per-rank local; their mean (DDP's average) is the global gradient
    assert abs(sum(r[3].item() for r in results) / world - t.grad.item()) < 1e-12

"""Distillation losses (KD, FitNets, attention transfer, FSP) and meProp in fine-tuning."""

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from autocomp.core.inventory import build_inventory
from autocomp.intake.data import DataSplits, take
from autocomp.intake.models import build_model, load_weights
from autocomp.methods.apply import apply_plan
from autocomp.methods.plan import CompressionPlan
from autocomp.training.config import FinetuneConfig
from autocomp.training.distill import finetune
from autocomp.training.features import FeatureDistiller, FeatureLossWeights, distill_points
from autocomp.training.meprop import meprop
from autocomp.training.train import evaluate

SHAPE = (1, 1, 28, 28)


def _teacher(weights: Path) -> nn.Module:
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    load_weights(model, weights)
    return model.eval()


def _pruned(teacher: nn.Module) -> nn.Module:
    inventory = build_inventory(teacher, SHAPE)
    plan = CompressionPlan.from_json({"layers": {name: {"method": "prune", "ratio": 0.5}
                                                 for name in inventory.prune_leaders()}})
    return apply_plan(teacher, plan, inventory)


def test_points_are_the_ends_of_stages() -> None:
    resnet = build_model("demo-resnet", num_classes=10, in_channels=1)
    assert distill_points(resnet, resnet, torch.randn(*SHAPE)) == ["layer1.relu", "layer2.relu",
                                                                   "layer3.relu"]
    mobilenet = build_model("demo-mobilenetv2", num_classes=10, in_channels=1)
    assert len(distill_points(mobilenet, copy.deepcopy(mobilenet), torch.randn(*SHAPE), 2)) == 2


@pytest.mark.parametrize("weights", [FeatureLossWeights(hint=1.0), FeatureLossWeights(attention=1.0),
                                     FeatureLossWeights(fsp=1.0)])
def test_feature_losses_vanish_for_an_identical_student_and_not_for_a_pruned_one(
        trained_resnet: Path, fmnist: DataSplits, weights: FeatureLossWeights) -> None:
    teacher = _teacher(trained_resnet)
    images = torch.stack([fmnist.val[i][0] for i in range(16)])
    student = copy.deepcopy(teacher)
    same = FeatureDistiller(teacher, student, images[:1], weights)
    with torch.no_grad():
        teacher(images)
        student(images)
    assert same.loss().item() == pytest.approx(0.0, abs=1e-10)
    same.close()

    pruned = _pruned(teacher).train()
    distiller = FeatureDistiller(teacher, pruned, images[:1], weights)
    with torch.no_grad():
        teacher(images)
    pruned(images)
    loss = distiller.loss()
    assert loss.item() > 1e-4
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in pruned.parameters())
    # widths differ after pruning: hints and FSP learn adapters; attention maps need none
    adapters_learn = any(p.grad is not None and p.grad.abs().sum() > 0 for p in distiller.parameters())
    assert adapters_learn == (weights.attention == 0)
    distiller.close()


@pytest.mark.parametrize("losses", [{}, {"hint_weight": 1.0}, {"attention_weight": 10.0},
                                    {"fsp_weight": 1.0}])
def test_finetuning_with_each_loss_recovers_accuracy(trained_resnet: Path, fmnist: DataSplits,
                                                     losses: dict) -> None:
    teacher = _teacher(trained_resnet)
    student = _pruned(teacher)
    val = take(fmnist.val, 1000)
    before = evaluate(student, val)
    finetune(student, teacher, take(fmnist.train, 4000), FinetuneConfig(steps=120, **losses))
    after = evaluate(student, val)
    assert after > before + 0.05
    assert after > 0.65
    # no hooks or adapters are left behind on either network
    assert not any(m._forward_hooks for m in student.modules())
    assert not any(m._forward_hooks for m in teacher.modules())


def test_meprop_at_full_keep_matches_dense_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    x = torch.randn(8, 1, 28, 28)
    model(x).square().sum().backward()
    dense = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with meprop(model, 1.0) as patched:
        model(x).square().sum().backward()
    assert patched == 10  # nine ungrouped convs and the linear head
    for expected, got in zip(dense, model.parameters(), strict=True):
        torch.testing.assert_close(got.grad, expected, rtol=1e-4, atol=1e-5)


def test_meprop_keeps_only_the_top_k_output_gradients() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(32, 40)
    x = torch.randn(16, 32, requires_grad=True)
    with meprop(layer, 0.25):
        out = layer(x)
    weights = torch.randn(16, 40)
    (out * weights).sum().backward()
    chosen = weights.abs().sum(0).topk(10).indices
    rows_with_grad = layer.weight.grad.abs().sum(1).nonzero().flatten()
    assert set(rows_with_grad.tolist()) == set(chosen.tolist())
    expected_x = weights[:, chosen] @ layer.weight.detach()[chosen]
    torch.testing.assert_close(x.grad, expected_x)
    assert "forward" not in layer.__dict__  # the patch is undone on leaving the block


def test_finetuning_with_meprop_still_learns(trained_resnet: Path, fmnist: DataSplits) -> None:
    teacher = _teacher(trained_resnet)
    student = _pruned(teacher)
    val = take(fmnist.val, 1000)
    before = evaluate(student, val)
    finetune(student, teacher, take(fmnist.train, 4000), FinetuneConfig(steps=120, meprop_keep=0.5))
    assert evaluate(student, val) > before + 0.05


def test_unknown_regularizer_is_rejected(trained_resnet: Path, fmnist: DataSplits) -> None:
    teacher = _teacher(trained_resnet)
    with pytest.raises(ValueError, match="unknown regularizer"):
        finetune(copy.deepcopy(teacher), teacher, take(fmnist.train, 64),
                 FinetuneConfig(steps=1, regularizer="tikhonov"))

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autocomp.intake.data import DataSplits, make_loader, take
from autocomp.intake.models import build_model
from autocomp.training.regularizers import (
    COMBINED_MU,
    REGULARIZERS,
    bn_l1,
    combined_group_exclusive,
    exclusive_sparsity,
    group_lasso,
)
from autocomp.training.train import evaluate


def _small() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 1.5, -0.1]))
        model[0].weight[2] = 0  # a filter that group lasso has already removed
    return model


def _grad(value: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, parameter, allow_unused=True, retain_graph=True)
    return grad


def test_registry_names_scalar_differentiable_penalties() -> None:
    assert set(REGULARIZERS) == {"bn_l1", "group_lasso", "exclusive_sparsity", "combined_group_exclusive"}
    for name, regularizer in REGULARIZERS.items():
        value = regularizer(_small())
        assert value.shape == () and value.requires_grad and value.item() > 0, name
    assert bn_l1(nn.Sequential(nn.Linear(3, 2))).item() == 0


def test_bn_l1_pulls_every_gamma_towards_zero() -> None:
    model = _small()
    gamma = model[1].weight
    value = bn_l1(model)
    assert value.item() == pytest.approx(0.5 + 2.0 + 1.5 + 0.1)
    assert torch.equal(_grad(value, gamma), torch.sign(gamma.detach()))
    assert _grad(value, model[0].weight) is None  # only BatchNorm scales are penalised
    with torch.no_grad():
        smaller = gamma - 0.05 * _grad(value, gamma)
    assert (smaller.abs() < gamma.abs()).all()


def test_group_lasso_shrinks_whole_filters_at_the_same_rate() -> None:
    model = _small()
    conv, linear = model[0].weight, model[5].weight
    value = group_lasso(model)
    expected = (conv.flatten(1).norm(dim=1).sum() * 18**0.5 + linear.norm(dim=1).sum() * 4**0.5)
    assert value.item() == pytest.approx(expected.item())
    grad = _grad(value, conv).flatten(1)
    filters = conv.detach().flatten(1)
    live = [0, 1, 3]
    # each live filter's gradient points along the filter, with norm sqrt(filter size) whatever its size
    torch.testing.assert_close(grad[live], 18**0.5 * filters[live] / filters[live].norm(dim=1, keepdim=True))
    torch.testing.assert_close(grad[live].norm(dim=1), torch.full((3,), 18**0.5))
    assert torch.equal(grad[2], torch.zeros(18))  # a zero filter stays put, no NaN


def test_exclusive_sparsity_makes_the_weights_of_a_filter_compete() -> None:
    model = _small()
    conv = model[0].weight
    value = exclusive_sparsity(model)
    l1 = conv.detach().flatten(1).abs().sum(1)
    expected = 0.5 * (l1.square().sum() + model[5].weight.detach().abs().sum(1).square().sum())
    assert value.item() == pytest.approx(expected.item())
    # every weight is pushed towards zero by its whole filter's L1 norm: heavy filters shed inputs fastest
    grad = _grad(value, conv).flatten(1)
    torch.testing.assert_close(grad, l1[:, None] * torch.sign(conv.detach().flatten(1)))


def test_combined_mixes_group_and_exclusive_sparsity() -> None:
    model = _small()
    mixed = combined_group_exclusive(model)
    assert mixed.item() == pytest.approx(
        ((1 - COMBINED_MU) * group_lasso(model) + COMBINED_MU * exclusive_sparsity(model)).item())
    assert combined_group_exclusive(model, mu=1.0).item() == pytest.approx(exclusive_sparsity(model).item())
    assert combined_group_exclusive(model, mu=0.0).item() == pytest.approx(group_lasso(model).item())


@pytest.fixture
def one_thread():
    """Run on one thread: these small convs gain little from more, and on shared CPUs extra
    threads mostly contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(data: DataSplits, bn_weight: float) -> tuple[torch.Tensor, float]:
    """300 Adam steps of demo-resnet from scratch; returns every |gamma| and validation accuracy."""
    torch.manual_seed(0)
    model = build_model("demo-resnet", num_classes=10, in_channels=1).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for images, labels in make_loader(take(data.train, 300 * 64), 64, shuffle=True):
        loss = F.cross_entropy(model(images), labels) + bn_weight * bn_l1(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    gammas = torch.cat([m.weight.detach().abs() for m in model.modules() if isinstance(m, nn.BatchNorm2d)])
    return gammas, evaluate(model, take(data.val, 1000))


@pytest.mark.usefixtures("one_thread")
def test_bn_l1_training_leaves_many_small_gammas(fmnist: DataSplits) -> None:
    plain, plain_accuracy = _train(fmnist, 0.0)
    slim, slim_accuracy = _train(fmnist, 3e-3)
    assert plain.numel() == slim.numel() == 336
    # measured: 0 of 336 below 0.1 without the penalty, 113 with it, at 0.83 and 0.85 accuracy
    assert (plain < 0.1).sum() == 0 and (slim < 0.1).sum() >= 60
    assert slim.median() < 0.5 * plain.median()
    assert slim_accuracy > 0.7 and plain_accuracy > 0.7

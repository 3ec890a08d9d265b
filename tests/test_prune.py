import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from helpers import make_plan
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.graph import prune_graph
from autocomp.core.inventory import build_inventory
from autocomp.intake.data import DataSplits, make_loader, take
from autocomp.intake.models import build_model, load_weights
from autocomp.methods.apply import apply_plan, count_params
from autocomp.methods.prune import kept_channels
from autocomp.training.train import evaluate

TORCHVISION_SHAPE = (1, 3, 64, 64)
TORCHVISION_MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "googlenet", "vgg11_bn",
                      "shufflenet_v2_x0_5"]


def _kept_rows(original: nn.Module, pruned: nn.Module) -> list[int]:
    """Which of the original layer's output filters the pruned layer kept."""
    rows = original.weight.detach().flatten(1)
    return sorted(int(torch.cdist(row[None], rows).argmin()) for row in pruned.weight.detach().flatten(1))


def _silence_channels(model: nn.Module, example: torch.Tensor, outputs: list[nn.Module]) -> None:
    """In every prunable group, zero what an L1 prune at 0.5 should drop (a seeded random half of
    the channels): their filters, batch-norm scale and shift, and every consumer's input weights.

    Those channels then carry nothing, so a correct pruning of exactly them leaves the output
    unchanged, while a group that misses a coupled layer or maps channels wrongly does not.
    """
    generator = torch.Generator().manual_seed(0)
    pruning = prune_graph(model, example, outputs)
    for group in pruning.groups:
        channels = len(group[0].idxs)
        drop = channels - kept_channels(channels, 0.5)
        silenced = set(torch.randperm(channels, generator=generator)[:drop].tolist())
        for item in group:
            module = item.dep.target.module
            local = [i for i, root in zip(item.idxs, item.root_idxs, strict=True) if root in silenced]
            if not local or not isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
                continue
            rows = (isinstance(module, nn.BatchNorm2d) or getattr(module, "groups", 1) > 1
                    or pruning.graph.is_out_channel_pruning_fn(item.dep.handler))
            with torch.no_grad():
                if rows:
                    module.weight[local] = 0
                    if module.bias is not None:
                        module.bias[local] = 0
                else:
                    module.weight[:, local] = 0


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_pruning_every_group_of_torchvision_models_removes_exactly_the_dropped_channels(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(f"torchvision:{name}", num_classes=10).eval()
    inv = build_inventory(model, TORCHVISION_SHAPE)
    assert inv.prune_leaders()
    assert (inv.notes != []) == (name == "shufflenet_v2_x0_5")
    outputs = [model.get_submodule(layer.name) for layer in inv.layers if layer.is_output]
    _silence_channels(model, torch.zeros(TORCHVISION_SHAPE), outputs)
    plan = make_plan({leader: {"method": "prune", "ratio": 0.5} for leader in inv.prune_leaders()})
    pruned = apply_plan(model, plan, inv)
    x = torch.randn(2, *TORCHVISION_SHAPE[1:])
    with torch.no_grad():
        expected, got = model(x), pruned(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert count_params(pruned) < 0.7 * count_params(model)
    torch.export.export(pruned, (x[:1],))


def test_shufflenet_prunes_the_groups_that_never_reach_its_channel_shuffle() -> None:
    model = build_model("torchvision:shufflenet_v2_x0_5", num_classes=10).eval()
    # torch-pruning alone cannot map chunk + concat + channel shuffle
    with pytest.raises(ZeroDivisionError):
        tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(TORCHVISION_SHAPE),
                                              verbose=False)
    inv = build_inventory(model, TORCHVISION_SHAPE)
    assert "channel split, join or shuffle" in inv.notes[0] and "ZeroDivisionError" in inv.notes[0]
    blocks = [f"stage2.{i}" for i in range(4)] + [f"stage3.{i}" for i in range(8)] + [
        f"stage4.{i}" for i in range(4)]
    # the stem, the head, and each block's inner branch channels (1x1 -> depthwise -> 1x1)
    assert inv.prune_leaders() == ["conv1.0", *[f"{block}.branch2.0" for block in blocks], "conv5.0"]
    assert inv.layer("stage2.0.branch1.0").prune_group == "conv1.0"  # the depthwise conv reading the stem
    assert set(inv.layer("stage3.1.branch2.0").coupled) == {"stage3.1.branch2.3"}
    # layers whose outputs are concatenated and shuffled are not offered
    for block in blocks:
        assert inv.layer(f"{block}.branch2.5").prune_group is None
    pruned = apply_plan(model, make_plan({"stage3.1.branch2.0": {"method": "prune", "ratio": 0.5}}), inv)
    assert pruned.stage3[1].branch2[3].out_channels == 24 and pruned.stage3[1].branch2[5].in_channels == 24
    assert pruned.stage3[1].branch2[5].out_channels == 48  # the shuffled trunk keeps its width
    with pytest.raises(AutocompError, match=r"branch2\.5.* no prunable channel group"):
        apply_plan(model, make_plan({"stage3.1.branch2.5": {"method": "prune", "ratio": 0.5}}), inv)


def test_a_group_that_cannot_be_built_is_named_with_its_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_model("torchvision:shufflenet_v2_x0_5", num_classes=10).eval()
    head = model.get_submodule("conv5.0")
    build = tp.DependencyGraph.get_pruning_group

    def failing(graph, module, *args, **kwargs):
        if module is head:
            raise RuntimeError("index mapping lost")
        return build(graph, module, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", failing)
    inv = build_inventory(model, TORCHVISION_SHAPE)
    assert "conv5.0" not in inv.prune_leaders() and inv.layer("conv5.0").prune_group is None
    assert ("conv5.0 is not prunable: torch-pruning could not build its channel group "
            "(RuntimeError: index mapping lost)") in inv.notes


def test_criteria_choose_channels_by_their_own_definitions(fmnist: DataSplits, trained_resnet: Path) -> None:
    model = build_model("demo-resnet", num_classes=10, in_channels=1)
    load_weights(model, trained_resnet)
    model.eval()
    inv = build_inventory(model, (1, 1, 28, 28))
    calib = make_loader(take(fmnist.train, 512), 64, shuffle=False)
    # scores computed here, independently: the group is conv1's filters, its BN, conv2's inputs
    reference = copy.deepcopy(model)
    for images, labels in calib:
        F.cross_entropy(reference(images), labels).backward()
    conv1, bn, conv2 = reference.layer2.conv1[0], reference.layer2.conv1[1], reference.layer2.conv2[0]
    with torch.no_grad():
        scores = {
            "l1": conv1.weight.abs().flatten(1).sum(1) + bn.weight.abs()
            + conv2.weight.abs().transpose(0, 1).flatten(1).sum(1),
            "bn_scale": bn.weight.abs(),
            "taylor": (conv1.weight * conv1.weight.grad).abs().flatten(1).sum(1)
            + (conv2.weight * conv2.weight.grad).abs().transpose(0, 1).flatten(1).sum(1),
        }
    val = take(fmnist.val, 1000)
    kept = {}
    for criterion, score in scores.items():
        plan = make_plan({"layer2.conv1.0": {"method": "prune", "ratio": 0.5, "criterion": criterion}})
        pruned = apply_plan(model, plan, inv, calib=calib)
        kept[criterion] = _kept_rows(model.layer2.conv1[0], pruned.layer2.conv1[0])
        assert kept[criterion] == sorted(torch.argsort(score, descending=True)[:16].tolist()), criterion
        assert evaluate(pruned, val) > 0.55, criterion
        assert all(p.grad is None for p in pruned.parameters())
    assert kept["taylor"] != kept["l1"] and kept["bn_scale"] != kept["l1"]


def test_taylor_needs_calibration_data() -> None:
    model = build_model("demo-resnet", num_classes=10, in_channels=1).eval()
    inv = build_inventory(model, (1, 1, 28, 28))
    plan = make_plan({"layer1.conv1.0": {"method": "prune", "ratio": 0.5, "criterion": "taylor"}})
    with pytest.raises(AutocompError, match=r"layer 'layer1.conv1.0': the taylor prune criterion needs"):
        apply_plan(model, plan, inv)


def test_bn_scale_needs_a_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 10)).eval()
    inv = build_inventory(model, (1, 1, 28, 28))
    pruned = apply_plan(model, make_plan({"0": {"method": "prune", "ratio": 0.5}}), inv)
    assert pruned[0].out_channels == pruned[4].in_features == 4
    with pytest.raises(AutocompError, match=r"layer '0': the bn_scale prune criterion .* BatchNorm"):
        apply_plan(model, make_plan({"0": {"method": "prune", "ratio": 0.5, "criterion": "bn_scale"}}), inv)

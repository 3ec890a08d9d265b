import json

import pytest
import torch
from helpers import make_plan

from autocomp.core.inventory import build_inventory, count_macs
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan


def _inventory(spec: str, shape: tuple[int, ...], classes: int = 1000):
    return build_inventory(build_model(spec, num_classes=classes, in_channels=shape[1]), shape)


def test_mobilenet_v2_published_figures() -> None:
    inv = _inventory("torchvision:mobilenet_v2", (1, 3, 224, 224))
    assert inv.params == 3_504_872
    assert inv.macs == pytest.approx(300e6, rel=0.05)
    assert sum(layer.kind == "dwconv" for layer in inv.layers) == 17


def test_resnet18_published_figures() -> None:
    inv = _inventory("torchvision:resnet18", (1, 3, 224, 224))
    assert inv.params == 11_689_512
    assert inv.macs == pytest.approx(1.81e9, rel=0.03)


def test_layer_figures_are_consistent() -> None:
    inv = _inventory("demo-resnet", (1, 1, 28, 28), classes=10)
    stem = inv.layer("stem.0")
    assert stem.in_shape == [1, 1, 28, 28] and stem.out_shape == [1, 16, 14, 14]
    assert stem.params == 16 * 1 * 3 * 3
    assert stem.macs == 16 * 14 * 14 * 9
    assert stem.act_bytes == 16 * 14 * 14 * 4
    assert inv.layer("fc").is_output


@pytest.mark.parametrize("spec", ["demo-resnet", "demo-mobilenetv2"])
def test_hook_counted_macs_match_the_inventory_before_and_after_compression(spec: str) -> None:
    torch.manual_seed(0)
    model = build_model(spec, num_classes=10, in_channels=1)
    inv = build_inventory(model, (1, 1, 28, 28))
    assert count_macs(model, (1, 1, 28, 28)) == inv.macs
    leaders, plain = inv.prune_leaders(), [layer.name for layer in inv.layers if layer.kind == "conv"]
    plan = make_plan({leaders[0]: {"method": "prune", "ratio": 0.5},
                      plain[-1]: {"method": "lowrank", "rank": 0.5},
                      "fc" if spec == "demo-resnet" else "classifier": {"method": "quant", "w_bits": 8}})
    compressed = apply_plan(model, plan, inv, channel_multiple=4)
    macs = count_macs(compressed, (2, 1, 28, 28))
    assert macs == build_inventory(compressed, (2, 1, 28, 28), coupling=False).macs
    assert macs < 2 * inv.macs


def test_residual_and_depthwise_coupling() -> None:
    resnet = _inventory("demo-resnet", (1, 1, 28, 28), classes=10)
    # the stem output is added to layer1's output: they are pruned together
    assert resnet.layer("layer1.conv2.0").prune_group == "stem.0"
    assert set(resnet.layer("layer2.shortcut.0").coupled) == {"layer2.conv2.0"}
    assert resnet.layer("fc").prune_group is None
    mobilenet = _inventory("demo-mobilenetv2", (1, 1, 28, 28), classes=10)
    expand, depthwise = mobilenet.layer("features.2.conv.0.0"), mobilenet.layer("features.2.conv.1.0")
    assert depthwise.kind == "dwconv"
    assert depthwise.prune_group == expand.prune_group == "features.2.conv.0.0"
    # projections of consecutive residual blocks share one channel group
    assert mobilenet.layer("features.3.conv.2.0").prune_group == "features.2.conv.2.0"


def test_inspect_cli_table_and_json(cli) -> None:
    code, out, _ = cli("inspect", "--model", "torchvision:resnet18", "--input-shape", "1,3,224,224",
                       "--json")
    assert code == 0
    data = json.loads(out)
    assert data["totals"]["params"] == 11_689_512
    assert {"name", "kind", "in_shape", "out_shape", "params", "macs", "act_bytes"} <= set(
        data["layers"][0])
    code, out, _ = cli("inspect", "--model", "demo-mobilenetv2", "--input-shape", "1,1,28,28")
    assert code == 0
    assert "features.1.conv.0.0" in out and "dwconv" in out and "50,410 params" in out


import numpy as np
import pytest
import torch
from helpers import make_plan
from torch import nn

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import build_inventory
from autocomp.hardware.compile.lower import compile_model
from autocomp.hardware.profiles import load_target
from autocomp.intake.data import DataSplits, take
from autocomp.intake.models import build_model
from autocomp.methods.apply import apply_plan, size_bytes
from autocomp.methods.prune import kept_channels
from autocomp.methods.registry import ApplyContext
from autocomp.methods.sparsity import (
    LATENCY_NOTE,
    SPARSE_KERNEL_TARGETS,
    SparseConv2d,
    SparseLayer,
    SparsityConfig,
    apply_sparsity,
    densify,
    magnitude_mask,
    sparsify,
)
from autocomp.training.config import FinetuneConfig
from autocomp.training.distill import finetune

SHAPE = (1, 1, 28, 28)


def _resnet():
    torch.manual_seed(0)
    model = build_model("demo-resnet", num_classes=10, in_channels=1).eval()
    return model, build_inventory(model, SHAPE)


def _counting_linear(out_features: int, in_features: int, bias: bool = True) -> nn.Linear:
    """A Linear whose weights are 1, 2, 3, ... in row-major order, so magnitude order is position order."""
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(1.0, out_features * in_features + 1).view(out_features, in_features))
    return layer


def test_magnitude_mask_drops_exactly_the_smallest_magnitudes() -> None:
    weight = torch.tensor([[-5.0, 1.0, 0.5], [3.0, -0.1, 2.0]])
    assert magnitude_mask(weight, 0.5).tolist() == [[True, False, False], [True, False, True]]
    assert int(magnitude_mask(torch.zeros(10, 7), 0.3).count_nonzero()) == 70 - 21


def test_storage_bytes_follow_the_encoding_formulas() -> None:
    # 4 x 10 float32 weights, the 30 smallest dropped: only row 3 keeps its 10 values
    small = sparsify(_counting_linear(4, 10), 0.75)
    assert small.mask.sum(1).tolist() == [0, 0, 0, 10]
    assert small.weight_encodings() == {"csr": 10 * (4 + 2) + (4 + 1) * 2, "bitmap": 40 // 8 + 10 * 4,
                                        "dense": 40 * 4}
    assert small.encoding == "bitmap" and small.storage_bytes() == 45 + 4 * 4  # plus the dense bias
    assert size_bytes(nn.Sequential(small, nn.ReLU())) == 61
    # rows of 40,000: int32 column indices; 800 nonzeros: int16 row pointers; CSR is the smallest
    wide = sparsify(_counting_linear(2, 40_000, bias=False), 0.99)
    assert wide.weight_encodings() == {"csr": 800 * (4 + 4) + 3 * 2, "bitmap": 10_000 + 800 * 4,
                                       "dense": 320_000}
    assert wide.encoding == "csr" and wide.storage_bytes() == 6406
    # 40,000 nonzeros need int32 row pointers
    half = sparsify(_counting_linear(2, 40_000, bias=False), 0.5)
    assert half.weight_encodings()["csr"] == 40_000 * (4 + 4) + 3 * 4 and half.encoding == "bitmap"
    # at 1% sparsity no sparse encoding pays: the weight is stored dense
    light = sparsify(_counting_linear(64, 64, bias=False), 0.01)
    assert light.weight_encodings() == {"csr": 4055 * (4 + 2) + 65 * 2, "bitmap": 512 + 4055 * 4,
                                        "dense": 4096 * 4}
    assert light.encoding == "dense" and light.storage_bytes() == 4096 * 4
    # a conv is an out x (in * kh * kw) matrix: 4 rows of 27
    conv = sparsify(nn.Conv2d(3, 4, 3), 0.5)
    assert conv.weight_encodings() == {"csr": 54 * 6 + 5 * 2, "bitmap": 14 + 54 * 4, "dense": 108 * 4}


def test_zeros_stay_zero_through_fine_tuning(fmnist: DataSplits) -> None:
    model, inv = _resnet()
    sparse = apply_plan(model, make_plan({"layer2.conv2.0": {"method": "sparsity", "sparsity": 0.7},
                                          "fc": {"method": "sparsity", "sparsity": 0.5}}), inv)
    layer = sparse.layer2.conv2[0]
    mask, before = layer.mask.clone(), layer.weight.detach().clone()
    assert layer.sparsity == pytest.approx(0.7, abs=1 / mask.numel())
    assert torch.equal(before[~mask], torch.zeros(int((~mask).sum())))
    # a plain optimizer step moves the pruned weights; after_step puts the zeros back
    probe = apply_plan(model, make_plan({"layer2.conv2.0": {"method": "sparsity", "sparsity": 0.7}}), inv)
    probe.train()(torch.randn(8, *SHAPE[1:])).logsumexp(1).sum().backward()
    torch.optim.SGD(probe.parameters(), lr=0.1).step()
    assert probe.layer2.conv2[0].weight[~mask].abs().sum() > 0
    probe.layer2.conv2[0].after_step()
    assert probe.layer2.conv2[0].weight[~mask].abs().sum() == 0
    finetune(sparse, model, take(fmnist.train, 256), FinetuneConfig(steps=3, batch_size=32))
    weight = layer.weight.detach()
    assert weight[~mask].abs().sum() == 0 and sparse.fc.weight[~sparse.fc.mask].abs().sum() == 0
    assert not torch.equal(weight[mask], before[mask])  # the kept weights did train


def test_pruned_and_sparsified_model_compiles_with_tvm_and_matches_pytorch() -> None:
    import tvm
    from tvm.runtime.vm import VirtualMachine

    model, inv = _resnet()
    prune = {"method": "prune", "ratio": 0.5}
    plan = make_plan({"layer2.conv1.0": [prune, {"method": "sparsity", "sparsity": 0.5}],
                      "layer3.conv2.0": {"method": "sparsity", "sparsity": 0.8}})
    assert [c.method for c in plan.layers["layer2.conv1.0"]] == ["prune", "sparsity"]
    compressed = apply_plan(model, plan, inv)
    pruned_only = apply_plan(model, make_plan({"layer2.conv1.0": prune}), inv)
    both, sparse = compressed.layer2.conv1[0], compressed.layer3.conv2[0]
    assert isinstance(both, SparseConv2d) and isinstance(sparse, SparseConv2d)
    assert both.out_channels == kept_channels(32, 0.5) == compressed.layer2.conv2[0].in_channels
    assert int((both.weight == 0).sum()) == both.weight.numel() // 2
    assert sparse.encoding == "bitmap"
    dense_bytes = 4 * (both.weight.numel() + sparse.weight.numel())
    assert size_bytes(compressed) == (size_bytes(pruned_only) - dense_bytes + both.storage_bytes()
                                      + sparse.storage_bytes())
    x = torch.randn(*SHAPE)
    # the exported graph is the dense one, op for op: nothing runs faster or slower
    ops = [[str(n.target) for n in torch.export.export(m, (x,)).graph.nodes if n.op == "call_function"]
           for m in (compressed, pruned_only)]
    assert ops[0] == ops[1]
    profile = load_target("host", untuned=True)  # the graph TVM imports; schedules: test_tune
    assert profile.name not in SPARSE_KERNEL_TARGETS and both.latency_note == LATENCY_NOTE
    vm = VirtualMachine(compile_model(compressed, SHAPE, profile), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x.numpy(), tvm.cpu()))[0].numpy()
    with torch.no_grad():
        expected = compressed(x)
        plain = densify(compressed)
        assert not any(isinstance(m, SparseLayer) for m in plain.modules())
        assert torch.equal(plain(x), expected)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)


def test_sparsity_after_low_rank_sparsifies_both_factors() -> None:
    model, inv = _resnet()
    plan = make_plan({"layer3.conv2.0": [{"method": "lowrank", "rank": 0.5},
                                     {"method": "sparsity", "sparsity": 0.6}]})
    pair = apply_plan(model, plan, inv).layer3.conv2[0]
    assert [type(m) for m in pair] == [SparseConv2d, SparseConv2d]
    assert all(m.sparsity == pytest.approx(0.6, abs=1 / m.weight.numel()) for m in pair)


def test_sparsity_values_and_targets_are_checked() -> None:
    for value in (0.0, 1.0):
        with pytest.raises(AutocompError, match=r"sparsity .* is outside"):
            make_plan({"fc": {"method": "sparsity", "sparsity": value}})
    ctx = ApplyContext(build_inventory(nn.Sequential(nn.Linear(3, 2)), (1, 3)), torch.zeros(1, 3))
    with pytest.raises(AutocompError, match="layer '0' is a ReLU"):
        apply_sparsity(nn.Sequential(nn.ReLU()), {"0": SparsityConfig(0.5)}, ctx)

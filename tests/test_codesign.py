"""Layer shares per target, device-variant sweeps and the codesign command on a real tiny run."""

import argparse
import json
from pathlib import Path

import pytest

from autocomp.core.errors import AutocompError
from autocomp.hardware.costmodel.estimate import estimate, list_ops
from autocomp.hardware.profiles import load_target
from autocomp.search.results.codesign import estimate_variant, parse_sweep, variants
from autocomp.search.results.layer_shares import OTHER, all_target_shares, layer_shares, shares_table

SHAPE = (1, 1, 28, 28)
TARGETS = ["host", "arm-a53", "cortex-m7", "gpu"]


@pytest.mark.parametrize("fixture", ["resnet", "mobilenet"])
def test_layer_shares_sum_to_one_and_differ_between_targets(fixture: str, request) -> None:
    model, inventory = request.getfixturevalue(fixture)
    shares = all_target_shares(model, SHAPE, TARGETS)["targets"]
    assert list(shares) == TARGETS
    for name, entry in shares.items():
        assert set(entry["layers"]) - {OTHER} == set(inventory.names)
        assert sum(entry["layers"].values()) == pytest.approx(1.0)
        assert entry["provenance"].startswith(f"estimated ({name} cost model")
        expected = estimate(model, SHAPE, load_target(name)).latency.median_s
        assert entry["total_s"] == pytest.approx(expected)
        assert sum(entry["seconds"].values()) == pytest.approx(expected)
    classifier = inventory.names[-1]
    # Per-kernel overhead dominates the GPU, so the tiny classifier weighs far more there
    # than on the compute-bound microcontroller.
    assert shares["gpu"]["layers"][classifier] > 10 * shares["cortex-m7"]["layers"][classifier]
    for a, b in (("host", "arm-a53"), ("arm-a53", "cortex-m7"), ("cortex-m7", "gpu")):
        assert max(abs(shares[a]["layers"][k] - shares[b]["layers"][k]) for k in inventory.names) > 0.02
    table = shares_table({"targets": shares})
    assert all(name in table for name in inventory.names + TARGETS)
    assert table.count("estimated (") == len(TARGETS)


def test_depthwise_weighs_more_on_the_a53_than_on_the_host(mobilenet, monkeypatch, tmp_path: Path) -> None:
    # the bundled profiles, not a calibrated copy another test may have left in the cache
    monkeypatch.setenv("AUTOCOMP_CACHE", str(tmp_path))
    model, inventory = mobilenet
    depthwise = [layer.name for layer in inventory.layers if layer.groups > 1]
    assert depthwise
    host = layer_shares(model, SHAPE, load_target("host"))
    a53 = layer_shares(model, SHAPE, load_target("arm-a53"))
    assert sum(a53.layers[k] for k in depthwise) > 3 * sum(host.layers[k] for k in depthwise)


def test_parse_sweep_reads_the_issue_form_and_repeated_flags() -> None:
    assert parse_sweep(["clock=1.2GHz,1.8GHz,cores=1,2,4,sram=256KB,512KB"]) == {
        "clock": [1.2e9, 1.8e9], "cores": [1, 2, 4], "sram": [256 * 1024, 512 * 1024]}
    assert parse_sweep(["clock=216MHz", "cores=1,2", "4", "flash=1MB"]) == {
        "clock": [216e6], "cores": [1, 2, 4], "flash": [1024**2]}
    assert parse_sweep(["cores=2,2,1"]) == {"cores": [2, 1]}
    assert parse_sweep([]) == {}


@pytest.mark.parametrize(("items", "named"), [
    (["volts=1"], "'volts'"),
    (["clock=1.2GW"], "'1.2GW'"),
    (["clock=fast"], "'fast'"),
    (["cores=1.5"], "'1.5'"),
    (["cores=0"], "'0'"),
    (["sram=lots"], "'lots'"),
    (["cores="], "cores="),
    (["clock=1GHz,cores="], "cores="),
    (["1,2"], "'1'"),
    (["clock=1GHz,,2GHz"], "empty value"),
    (["cores=1", "cores=2"], "twice"),
])
def test_parse_sweep_errors_name_the_token(items: list[str], named: str) -> None:
    with pytest.raises(AutocompError, match="--sweep") as caught:
        parse_sweep(items)
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_variants_are_the_cartesian_product_with_labels() -> None:
    a53 = load_target("arm-a53")
    chosen = variants(a53, parse_sweep(["clock=1.2GHz,1.8GHz,cores=1,2,4"]))
    assert len(chosen) == 6
    assert chosen[0][0] == "clock=1.2GHz cores=1"
    assert chosen[-1][0] == "clock=1.8GHz cores=4"
    fast = chosen[-1][1]
    assert fast.cost_model.constants["clock_hz"] == 1.8e9
    assert fast.latency.threads == 4 and fast.tvm_target["num-cores"] == 4
    assert a53.cost_model.constants["clock_hz"] == 1.2e9  # the profile itself is unchanged
    m7 = variants(load_target("cortex-m7"), parse_sweep(["cores=1", "sram=256KB,512KB", "flash=2MB"]))
    assert [label for label, _ in m7] == ["cores=1 sram=256KB flash=2MB", "cores=1 sram=512KB flash=2MB"]
    assert m7[1][1].memory.sram_bytes == 512 * 1024 and m7[1][1].memory.flash_bytes == 2 * 1024**2
    assert variants(a53, {})[0] == ("as profiled", a53)
    with pytest.raises(AutocompError, match="sram: target arm-a53 has no device-memory model"):
        variants(a53, parse_sweep(["sram=256KB"]))
    with pytest.raises(AutocompError, match="ram: no memory model"):
        variants(load_target("cortex-m7"), parse_sweep(["ram=1MB"]))


@pytest.mark.parametrize("target", ["arm-a53", "gpu", "cortex-m7"])
def test_faster_clock_or_more_cores_never_slows_a_model(target: str, mobilenet) -> None:
    ops = list_ops(mobilenet[0], SHAPE)
    chosen = variants(load_target(target), parse_sweep(["clock=0.2GHz,1GHz,2GHz,cores=1,2,4,8"]))
    seconds = {label: estimate_variant(ops, profile, label).median_s for label, profile in chosen}
    for clock in ("200MHz", "1GHz", "2GHz"):
        times = [seconds[f"clock={clock} cores={n}"] for n in (1, 2, 4, 8)]
        assert times == sorted(times, reverse=True)
    for cores in (1, 2, 4, 8):
        times = [seconds[f"clock={c} cores={cores}"] for c in ("200MHz", "1GHz", "2GHz")]
        assert times == sorted(times, reverse=True)
    assert seconds["clock=2GHz cores=8"] < seconds["clock=200MHz cores=1"]
    latency = estimate_variant(ops, chosen[0][1], chosen[0][0])
    assert latency.kind == "estimated" and "device variant clock=200MHz cores=1)" in latency.provenance


@pytest.fixture
def tiny_run(small_run: Path) -> Path:
    return small_run


def test_codesign_over_clock_and_cores(tiny_run: Path, fmnist, capsys) -> None:
    from autocomp.cli.codesign import add_codesign_command, cmd_codesign

    parser = argparse.ArgumentParser()
    add_codesign_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["codesign", "r", "--target", "arm-a53", "--sweep", "clock=0.6GHz,1.8GHz",
                              "--sweep", "cores=1,4", "--budget", "2ms", "--runs-dir", str(tiny_run)])
    assert cmd_codesign(args) == 0
    out = capsys.readouterr().out
    saved = json.loads((tiny_run / "r" / "codesign-arm-a53.json").read_text())
    assert (tiny_run / "r" / "codesign-arm-a53.md").read_text() in out
    assert saved["budget"] == "2ms" and saved["front"]
    assert [v["label"] for v in saved["variants"]] == [
        "clock=600MHz cores=1", "clock=600MHz cores=4", "clock=1.8GHz cores=1", "clock=1.8GHz cores=4"]
    for variant in saved["variants"]:
        assert variant["uncompressed"]["kind"] == "estimated"
        for trial in variant["trials"]:
            assert trial["latency"]["provenance"].startswith("estimated (arm-a53 cost model")
            assert f"device variant {variant['label']})" in trial["latency"]["provenance"]
            assert trial["meets_latency"] == (trial["latency"]["median_s"] <= 2e-3)
            assert trial["memory"] is None  # no memory model for an aarch64 Linux target
    by_label = {v["label"]: v for v in saved["variants"]}
    slow, fast = by_label["clock=600MHz cores=1"], by_label["clock=1.8GHz cores=4"]
    for before, after in zip(slow["trials"], fast["trials"], strict=True):
        assert after["latency"]["median_s"] < before["latency"]["median_s"]
    feasible = {v["label"]: {t["number"] for t in v["trials"] if t["feasible"]} for v in saved["variants"]}
    assert feasible["clock=600MHz cores=1"] <= feasible["clock=1.8GHz cores=4"]
    # the fastest variant runs the uncompressed model well within 2 ms, so one meets the budget
    assert saved["cheapest"] is not None
    best = max(v["best"]["val_acc"] for v in saved["variants"] if v["best"])
    assert by_label[saved["cheapest"]]["best"]["val_acc"] == best == saved["best_val_acc"]
    assert saved["cheapest"] in saved["minimal"]


def test_codesign_sram_sweep_flips_mcu_feasibility(tiny_run: Path, fmnist) -> None:
    from autocomp.search.results.codesign import codesign

    # The run searched the A53; the same front is checked against a microcontroller.
    result = codesign(tiny_run / "r", "cortex-m7", parse_sweep(["sram=8KB,320KB"]), budget="100%",
                      data=fmnist)
    tiny, roomy = result.variants
    assert tiny.label == "sram=8KB" and roomy.label == "sram=320KB"
    assert all(t["memory"]["sram_bytes"] > 8 * 1024 for t in tiny.trials)
    assert all("SRAM" in t["over_memory"] and not t["feasible"] for t in tiny.trials)
    assert tiny.best is None and tiny.fastest is None
    assert any(t["feasible"] for t in roomy.trials)
    assert roomy.best is not None and result.cheapest == "sram=320KB"
    assert (tiny_run / "r" / "codesign-cortex-m7.md").is_file()
    assert "No variant" not in result.table()

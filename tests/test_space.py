"""Search spaces: YAML validation, per-layer sampling of every registered method, warm-start
baselines, narrowing, fine-tune and deployment knobs."""

import dataclasses
import warnings
from pathlib import Path

import optuna
import pytest

from autocomp.core.errors import AutocompError
from autocomp.core.inventory import Inventory, build_inventory
from autocomp.hardware.profiles import load_profile
from autocomp.intake.models import build_model
from autocomp.search.space.loading import available_spaces, load_space
from autocomp.search.space.sampling import COMBINE, KEEP, SearchSpace

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = """
name: mixed
methods:
  prune: {ratio: {low: 0.25, high: 0.5, step: 0.25}, criterion: [l1, l2]}
  lowrank: {rank: {low: 0.25, high: 0.5, step: 0.25}, min_full_rank: 8}
finetune: {steps: 10, hint_weight: 1.0}
"""
# Off the baselines' grid: prune 30% and int8 are not on it, prune 50% is.
OFF_GRID = """
name: off-grid
methods:
  prune: {ratio: {low: 0.25, high: 0.75, step: 0.25}}
  quant: {w_bits: [4, 2], a_bits: 8}
finetune: {steps: 10}
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.fixture(scope="module")
def inventories() -> dict[str, Inventory]:
    return {name: build_inventory(build_model(name, num_classes=10, in_channels=1), (1, 1, 28, 28))
            for name in ("demo-resnet", "demo-mobilenetv2")}


def _study() -> optuna.Study:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0), directions=["maximize"])


def test_default_space_offers_methods_only_where_they_fit(inventories: dict[str, Inventory]) -> None:
    space = load_space("default")
    inventory = inventories["demo-resnet"]
    options = {layer.name: set(space.layer_options(layer)) for layer in inventory.layers}
    assert options["layer1.conv1.0"] == {KEEP, "prune", "lowrank", "quant"}
    assert options["layer1.conv2.0"] == {KEEP, "lowrank", "quant"}  # its channels follow stem.0's group
    assert options["fc"] == {KEEP, "quant"}  # the 10-class head: not prunable, too small for low rank
    assert space.layer_choices(inventory.layer("layer1.conv1.0")) == [KEEP, "prune", "lowrank", "quant",
                                                                      "prune+quant"]


@pytest.mark.parametrize("name", available_spaces())
def test_every_bundled_space_samples_valid_plans(name: str, inventories: dict[str, Inventory]) -> None:
    space = load_space(name)
    assert {"default", "quant-only", "prune-only", "mcu", "data-free"} <= set(available_spaces())
    assert space.name == name and space.describe().startswith(f"Search space {name} ")
    kinds = dict(space.kinds)
    for inventory in inventories.values():
        study = _study()
        for _ in range(8):
            trial = study.ask()
            plan = space.suggest_plan(trial, inventory)
            plan.validate(inventory)
            for layer_name, configs in plan.layers.items():
                layer = inventory.layer(layer_name)
                choice = COMBINE.join(config.method for config in configs)
                assert trial.params[f"{layer_name}.method"] == choice
                assert choice in space.layer_choices(layer)
                assert layer.kind not in kinds or choice in kinds[layer.kind]
                if name == "mcu":  # int8-only target: every compressed layer ends in w8a8
                    assert configs[-1].method == "quant" and configs[-1].a_bits == 8
            study.tell(trial, 0.0)


def test_sampled_plans_follow_the_space(tmp_path: Path, inventories: dict[str, Inventory]) -> None:
    space = load_space(_write(tmp_path, SPACE))
    assert space.finetune.steps == 10 and space.finetune.hint_weight == 1.0
    inventory = inventories["demo-mobilenetv2"]
    study = _study()
    seen = set()
    for _ in range(20):
        trial = study.ask()
        plan = space.suggest_plan(trial, inventory)
        plan.validate(inventory)
        for name, config in plan.configs():
            seen.add(config.method)
            if config.method == "prune":
                assert config.ratio in (0.25, 0.5) and config.criterion in ("l1", "l2")
                assert trial.params[f"{name}.prune.criterion"] == config.criterion
        study.tell(trial, 0.0)
    assert seen == {"prune", "lowrank"}
    assert set(space.uncompressed_params(inventory).values()) == {KEEP}


def _expected_layers(space: SearchSpace, inventory: Inventory, method: str) -> dict[str, str]:
    """Layer -> the choice a uniform baseline of ``method`` gives it: alone where offered,
    else with int8 where only that combination is, and then int8 on the other layers."""
    expected = {}
    for layer in inventory.layers:
        choices = space.layer_choices(layer)
        for choice in (method, f"{method}+quant"):
            if choice in choices:
                expected[layer.name] = choice
                break
    if any(COMBINE in choice for choice in expected.values()):
        expected.update({layer.name: "quant" for layer in inventory.layers
                         if layer.name not in expected and "quant" in space.layer_choices(layer)})
    return expected


@pytest.mark.parametrize("name", ["default", "mcu", "all-methods", "data-free"])
def test_uniform_baselines_are_exactly_the_uniform_plans(name: str,
                                                         inventories: dict[str, Inventory]) -> None:
    space = load_space(name)
    targets = {"int8": ("quant", {"w_bits": 8, "a_bits": 8}), "prune 30%": ("prune", {"ratio": 0.3}),
               "prune 50%": ("prune", {"ratio": 0.5}), "rank 50%": ("lowrank", {"kind": "svd", "rank": 0.5})}
    for inventory in inventories.values():
        baselines = space.uniform_baselines(inventory)
        labels = [label for label, _ in baselines]
        assert labels[0] == "uncompressed" and len(set(labels)) == len(labels)
        study = _study()
        for label, params in baselines:
            study.enqueue_trial(params)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # Optuna warns when a fixed value is off its grid
                trial = study.ask()
                plan = space.suggest_plan(trial, inventory)
            assert trial.params == params  # nothing resampled, nothing missing
            study.tell(trial, 0.0)
            if label == "uncompressed":
                assert not plan.layers
                continue
            assert "grid nearest" not in label  # the bundled grids hold every baseline
            method, values = next(targets[key] for key in targets if f"uniform {key}" in label)
            expected = _expected_layers(space, inventory, method)
            assert {n: COMBINE.join(c.method for c in cfgs) for n, cfgs in plan.layers.items()} == expected
            for layer_name, configs in plan.layers.items():
                config = next((c for c in configs if c.method == method), configs[0])
                assert {key: getattr(config, key) for key in values if hasattr(config, key)} \
                    == {key: v for key, v in values.items() if hasattr(config, key)}, (label, layer_name)
                assert all(c.w_bits == 8 and c.a_bits == 8 for c in configs if c.method == "quant")
        offered = {method for layer in inventory.layers for method in space.layer_options(layer)}
        assert ("uniform int8" in labels) == ("quant" in offered)


def test_baselines_off_the_grid_take_the_nearest_value_and_say_so(
        tmp_path: Path, inventories: dict[str, Inventory]) -> None:
    space = load_space(_write(tmp_path, OFF_GRID))
    inventory = inventories["demo-resnet"]
    baselines = dict(space.uniform_baselines(inventory))
    assert list(baselines) == ["uncompressed", "uniform int8 (grid nearest w_bits 4)",
                               "uniform prune 30% (grid nearest 25%)", "uniform prune 50%"]
    study = _study()
    study.enqueue_trial(baselines["uniform prune 30% (grid nearest 25%)"])
    plan = space.suggest_plan(study.ask(), inventory)
    assert {config.ratio for _, config in plan.configs()} == {0.25}


def test_narrowed_space_drops_the_excluded_methods(inventories: dict[str, Inventory]) -> None:
    space = load_space("default")
    inventory = inventories["demo-resnet"]
    narrow = space.narrowed({"layer1.conv1.0": {"prune", KEEP}, "layer2.conv1.0": ["lowrank", "quant"]})
    again = space.narrowed({"layer2.conv1.0": {"quant"}}).narrowed({"layer2.conv1.0": {"lowrank"},
                                                                    "layer1.conv1.0": {"prune"}})
    assert narrow == again  # deterministic, whatever the order
    assert narrow.excluded_map == {"layer1.conv1.0": {"prune"}, "layer2.conv1.0": {"lowrank", "quant"}}
    assert narrow.layer_choices(inventory.layer("layer1.conv1.0")) == [KEEP, "lowrank", "quant"]
    assert set(narrow.layer_options(inventory.layer("layer2.conv1.0"))) == {KEEP, "prune"}
    assert space.layer_choices(inventory.layer("layer1.conv1.0"))[1] == "prune"  # the original is intact

    study = _study()
    for _ in range(15):
        plan = narrow.suggest_plan(study.ask(), inventory)
        assert all(c.method != "prune" for c in plan.layers.get("layer1.conv1.0", ()))
        assert all(c.method == "prune" for c in plan.layers.get("layer2.conv1.0", ()))
    baselines = dict(narrow.uniform_baselines(inventory))
    study.enqueue_trial(baselines["uniform prune 30%"])
    plan = narrow.suggest_plan(study.ask(), inventory)
    pruned = {name for name, _ in plan.configs()}
    assert "layer1.conv1.0" not in pruned and "layer2.conv1.0" in pruned
    assert pruned == set(_expected_layers(narrow, inventory, "prune"))


def test_deploy_knobs_follow_the_target(inventories: dict[str, Inventory]) -> None:
    space = load_space("default")
    host = load_profile("host")
    two = dataclasses.replace(host, latency=dataclasses.replace(host.latency, threads=2))
    one = dataclasses.replace(host, latency=dataclasses.replace(host.latency, threads=1))
    assert space.deploy_knobs(two) == {"threads": [1, 2]}  # 4 clamped to the profile's 2
    assert space.deploy_knobs(one) == {"threads": [1]}
    assert space.deploy_knobs(load_profile("cortex-m7")) == {}  # C for a bare-metal MCU
    assert load_space("mcu").deploy_knobs(two) == {}  # the space offers none
    trial = _study().ask()
    assert space.suggest_deploy(trial, two) == {"threads": trial.params["deploy.threads"]}
    assert space.suggest_deploy(trial, load_profile("cortex-m7")) == {}


def test_finetune_knobs_may_be_choices(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, SPACE.replace("steps: 10", "steps: [10, 20], lr: [0.001, 0.0003]")))
    assert space.finetune.steps == 10 and space.finetune.lr == 0.001  # the first choices
    study = _study()
    seen = set()
    for _ in range(12):
        trial = study.ask()
        config = space.suggest_finetune(trial)
        assert (config.steps, config.lr) == (trial.params["finetune.steps"], trial.params["finetune.lr"])
        assert config.hint_weight == 1.0
        seen.add((config.steps, config.lr))
    assert len(seen) > 1
    fixed = space.with_finetune(steps=0)
    trial = study.ask()
    assert fixed.suggest_finetune(trial).steps == 0 and set(trial.params) == {"finetune.lr"}
    assert "steps 10/20" in space.describe() and "lr 0.001/0.0003" in space.describe()
    assert load_space("data-free").finetune.steps == 0


@pytest.mark.parametrize(("text", "message"), [
    (SPACE.replace("prune:", "shrink:"), "methods.shrink: unknown key"),
    (SPACE.replace("criterion:", "colour:"), "methods.prune.colour: unknown key"),
    (SPACE.replace("high: 0.5, step: 0.25}, criterion", "high: 1.5, step: 0.25}, criterion"),
     "methods.prune: prune ratio 1.5"),
    (SPACE.replace("[l1, l2]", "[l1, magic]"), "methods.prune: prune criterion 'magic'"),
    (SPACE.replace("steps: 10", "steps: -1"), "finetune.steps: must be"),
    (SPACE.replace("hint_weight", "hint_wieght"), "finetune.hint_wieght: unknown key"),
    (SPACE.replace("steps: 10", "steps: [10, 2.5]"), r"finetune.steps\[1\]: must be an integer"),
    (SPACE.replace("steps: 10", "lr: []"), "finetune.lr: an empty list"),
    ("name: x\nmethods: {}\nfinetune: {}\n", "methods: names no method"),
    (SPACE + "layers: {pointwise: [prune]}\n", "layers.pointwise: unknown key"),
    (SPACE + "layers: {conv: [prune, shrink]}\n", r"layers.conv\[1\]: unknown method 'shrink'"),
    (SPACE + "layers: {linear: [quant]}\n", r"layers.linear\[0\]: 'quant' is not in this space's methods"),
    (SPACE + "layers: {conv: prune}\n", "layers.conv: must be a list"),
    (SPACE + "layers: {conv: [prune+lowrank]}\n", r"layers.conv\[0\]: .* not a combination listed"),
    (SPACE + "combine: [[prune, quant]]\n", r"combine\[0\]: 'quant' is not one of the space's methods"),
    (SPACE + "combine: [[prune]]\n", r"combine\[0\]: a combination needs at least two"),
    (SPACE + "deploy: {threads: [1, 0]}\n", r"deploy.threads\[1\]: must be an integer in \[1, 4096\]"),
    (SPACE + "deploy: {threads: 2}\n", "deploy.threads: must be a list"),
    (SPACE + "deploy: {layout: [NHWC]}\n", "deploy.layout: unknown key"),
])
def test_bad_spaces_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(AutocompError, match=message) as caught:
        load_space(path)
    assert str(caught.value).startswith(path)


def test_layer_kinds_limit_the_choices(tmp_path: Path, inventories: dict[str, Inventory]) -> None:
    text = SPACE.replace("finetune:", "  quant: {w_bits: 8, a_bits: 8}\ncombine: [[quant, prune]]\n"
                         "layers: {conv: [quant, prune+quant], linear: []}\nfinetune:")
    space = load_space(_write(tmp_path, text))
    inventory = inventories["demo-resnet"]
    assert space.layer_choices(inventory.layer("layer1.conv1.0")) == [KEEP, "quant", "prune+quant"]
    assert space.layer_choices(inventory.layer("fc")) == [KEEP]
    assert "fc.method" not in space.uncompressed_params(inventory)
    # prune is offered to the group leader through the combination only
    assert set(space.layer_options(inventory.layer("layer1.conv1.0"))) == {KEEP, "prune", "quant"}

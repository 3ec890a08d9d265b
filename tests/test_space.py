"""Search spaces: YAML validation and per-layer sampling of every registered method."""

from pathlib import Path

import optuna
import pytest

from autocomp.errors import AutocompError
from autocomp.inventory import build_inventory
from autocomp.models import build_model
from autocomp.search.space import KEEP, load_space

SPACE = """
name: mixed
methods:
  prune: {ratio: {low: 0.25, high: 0.5, step: 0.25}, criterion: [l1, l2]}
  lowrank: {rank: {low: 0.25, high: 0.5, step: 0.25}, min_full_rank: 8}
finetune: {steps: 10, hint_weight: 1.0}
"""


def _write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def test_default_space_offers_methods_only_where_they_fit() -> None:
    space = load_space("default")
    inventory = build_inventory(build_model("demo-resnet", num_classes=10, in_channels=1), (1, 1, 28, 28))
    options = {layer.name: set(space.layer_options(layer)) for layer in inventory.layers}
    assert options["layer1.conv1.0"] == {KEEP, "prune", "lowrank"}
    assert options["layer1.conv2.0"] == {KEEP, "lowrank"}  # its channels follow stem.0's group
    assert options["fc"] == {KEEP}  # the 10-class head: not prunable, too small for low rank


def test_sampled_plans_follow_the_space(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, SPACE))
    assert space.finetune.steps == 10 and space.finetune.hint_weight == 1.0
    inventory = build_inventory(build_model("demo-mobilenetv2", num_classes=10, in_channels=1),
                                (1, 1, 28, 28))
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0),
                                directions=["maximize"])
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


@pytest.mark.parametrize(("text", "message"), [
    (SPACE.replace("prune:", "shrink:"), "methods.shrink: unknown key"),
    (SPACE.replace("criterion:", "colour:"), "methods.prune.colour: unknown key"),
    (SPACE.replace("high: 0.5, step: 0.25}, criterion", "high: 1.5, step: 0.25}, criterion"),
     "methods.prune: prune ratio 1.5"),
    (SPACE.replace("[l1, l2]", "[l1, magic]"), "methods.prune: prune criterion 'magic'"),
    (SPACE.replace("steps: 10", "steps: -1"), "finetune.steps: must be"),
    (SPACE.replace("hint_weight", "hint_wieght"), "finetune.hint_wieght: unknown key"),
    ("name: x\nmethods: {}\nfinetune: {}\n", "methods: names no method"),
])
def test_bad_spaces_name_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(AutocompError, match=message) as caught:
        load_space(path)
    assert str(caught.value).startswith(path)

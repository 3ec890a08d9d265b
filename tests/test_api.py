"""The public API: every name resolves, importing it is light, configs check themselves, and the
README's Python API example runs as written."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autocomp

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_public_name_resolves_to_its_module_object() -> None:
    import importlib

    for name in autocomp.__all__:
        value = getattr(autocomp, name)
        home = importlib.import_module(autocomp._HOME[name])
        assert value is getattr(home, name), name
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = autocomp.nothing_here


def test_the_names_type_checkers_see_are_the_public_names() -> None:
    """The ``if TYPE_CHECKING:`` imports of autocomp/__init__.py name the same modules as the
    lazy table."""
    import ast

    tree = ast.parse(Path(autocomp.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If))
    seen = {alias.name: node.module for node in block.body for alias in node.names}
    assert seen == autocomp._HOME


def test_importing_the_package_or_the_cli_does_not_load_torch() -> None:
    """Timing workers import parts of the package without PyTorch, and the CLI sets
    OMP_WAIT_POLICY before torch loads its OpenMP runtime."""
    code = ("import sys, autocomp, autocomp.cli.main, autocomp.hardware.measure.timer_worker, "
            "autocomp.hardware.measure.kernel_worker; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_configs_check_their_parameters_when_created() -> None:
    with pytest.raises(ValueError, match=r"prune ratio 1\.5 is outside"):
        autocomp.PruneConfig(ratio=1.5)
    with pytest.raises(ValueError, match="quant w_bits 3"):
        autocomp.QuantConfig(w_bits=3)
    with pytest.raises(ValueError, match="lowrank kind 'qr'"):
        autocomp.LowRankConfig(rank=0.5, kind="qr")
    with pytest.raises(autocomp.AutocompError, match="trials must be a positive integer"):
        autocomp.SearchConfig(model="demo-resnet", data="fashion-mnist", trials=0)
    assert autocomp.QuantConfig.stage is autocomp.Stage.QUANTIZE > autocomp.PruneConfig.stage


def test_apply_plan_takes_an_example_input_or_an_inventory(resnet) -> None:
    model, inventory = resnet
    plan = autocomp.CompressionPlan({"layer2.conv2.0": autocomp.LowRankConfig(rank=0.5)})
    example = torch.zeros(1, 1, 28, 28)
    from_example = autocomp.apply_plan(model, plan, example)
    from_inventory = autocomp.apply_plan(model, plan, inventory)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(from_example(x), from_inventory(x))
    assert autocomp.count_params(from_example) < autocomp.count_params(model)


def _python_api_example() -> str:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1
    return blocks[0]


@pytest.mark.slow
def test_readme_python_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_api_example(), str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "estimated (arm-a53 cost model" in out
    assert "prune x1" in out and "lowrank x1" in out and "quant x1" in out
    assert (tmp_path / "exported" / "export.json").is_file()
    assert (tmp_path / "exported" / "model.so").is_file()

import re

import pytest

from autocomp.core.errors import AutocompError
from autocomp.core.units import parse_budget, parse_bytes, parse_shape


@pytest.mark.parametrize(("text", "seconds"), [
    ("20ms", 0.020), ("1.5s", 1.5), ("800us", 0.0008), (" 5 ms ", 0.005), (".5ms", 0.0005),
])
def test_budget_parses_absolute_times(text: str, seconds: float) -> None:
    budget = parse_budget(text)
    assert budget.seconds == pytest.approx(seconds)
    assert budget.resolve(123.0) == pytest.approx(seconds)


def test_budget_percentage_is_relative_to_the_uncompressed_model() -> None:
    budget = parse_budget("60%")
    assert budget.fraction == pytest.approx(0.6)
    assert budget.resolve(0.010) == pytest.approx(0.006)


@pytest.mark.parametrize(("text", "message"), [
    *[(text, f"cannot read budget '{text}': use a number with us, ms or s")
      for text in ("20 parsecs", "fast", "-3ms", "20", "ms")],
    ("0ms", "budget '0ms' must be positive"),
    ("150%", "budget '150%' is above 100% of the uncompressed model"),
])
def test_bad_budgets_are_rejected(text: str, message: str) -> None:
    with pytest.raises(AutocompError, match=re.escape(message)):
        parse_budget(text)


def test_shapes() -> None:
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    with pytest.raises(AutocompError, match=re.escape("cannot read input shape '1,3,x'")):
        parse_shape("1,3,x")
    for bad in ("224", "1,0,3"):
        with pytest.raises(AutocompError, match=re.escape(f"input shape '{bad}' needs a batch")):
            parse_shape(bad)


@pytest.mark.parametrize(("text", "count"), [("320KB", 327680), ("1MB", 1048576), ("2048B", 2048),
                                             ("1.5 MiB", 1572864), ("4GB", 4 * 1024**3)])
def test_memory_sizes_are_binary(text: str, count: int) -> None:
    assert parse_bytes(text) == count


@pytest.mark.parametrize("text", ["lots", "12", "0KB", "-1MB"])
def test_bad_memory_sizes(text: str) -> None:
    with pytest.raises(AutocompError, match="memory size"):
        parse_bytes(text)

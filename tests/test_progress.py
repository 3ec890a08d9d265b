"""Progress and console output: bars only when asked (a terminal), otherwise one log line per
phase; the CLI's handler puts information on stdout and warnings on stderr, then restores
the logging set-up."""

import logging

import pytest

from autocomp.cli.output import console_output
from autocomp.core.progress import Progress, bars_shown, show_bars


@pytest.fixture
def bars_off():
    saved = bars_shown()
    show_bars(False)
    yield
    show_bars(saved)


def test_without_bars_a_phase_is_one_log_line(bars_off, caplog: pytest.LogCaptureFixture,
                                              capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autocomp")
    with Progress("train epoch 1/1", total=300, unit="batch") as bar:
        for _ in range(300):
            bar.set_status("loss 0.5")
            bar.update()
    with Progress("quiet", total=3, quiet=True) as bar:
        bar.update(3)
    with Progress("summarised by the caller", total=3, log_end=False) as bar:
        bar.update(3)
    assert len(caplog.messages) == 1
    assert caplog.messages[0].startswith("train epoch 1/1: 300 batches in ")
    assert caplog.messages[0].endswith(", loss 0.5")
    assert capsys.readouterr().err == ""  # no bar drawn


def test_a_failed_phase_logs_no_closing_line(bars_off, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autocomp")
    with pytest.raises(RuntimeError), Progress("doomed", total=5) as bar:
        bar.update()
        raise RuntimeError("stop")
    assert caplog.messages == []


def test_with_bars_the_phase_draws_on_stderr_and_logs_nothing(caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="autocomp")
    saved = bars_shown()
    show_bars(True)
    try:
        with Progress("tuning 2 workloads", total=16, unit="trial") as bar:
            bar.update(16)
    finally:
        show_bars(saved)
    assert "tuning 2 workloads" in capsys.readouterr().err
    assert caplog.messages == []


def test_console_output_routes_levels_and_restores_logging(capsys: pytest.CaptureFixture) -> None:
    logger = logging.getLogger("autocomp")
    before = (logger.level, logger.propagate, list(logger.handlers))
    with console_output():
        logging.getLogger("autocomp.search.driver").info("search: 3 trials finished in 9 s")
        logging.getLogger("autocomp.hardware.compile.tune").warning("host: 1 of 9 kernels run untuned")
        logging.getLogger("autocomp.search.driver").debug("not shown")
    out, err = capsys.readouterr()
    assert out == "search: 3 trials finished in 9 s\n"
    assert err == "autocomp: warning: host: 1 of 9 kernels run untuned\n"
    with console_output(quiet=True):
        logging.getLogger("autocomp.hardware.oracle").info("note: estimated instead")
    assert capsys.readouterr().out == ""
    assert (logger.level, logger.propagate, list(logger.handlers)) == before

"""Progress output: whole numbers at 80 columns, plain lines for logs, honest rates."""

import io
import re
import time

from rich.console import Console

from flipsafe.progress import format_rate, progress_bar

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _lines(text: str) -> list[str]:
    return [line for line in ANSI.sub("", text).replace("\r", "\n").split("\n") if line.strip()]


def test_an_80_column_bar_keeps_its_numbers_whole():
    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with progress_bar("activations mxfp8_e4m3 bitflip2", total=1234567, unit="inj",
                      console=console) as bar:
        bar.advance(123456, info="SDC 12.34%")
    lines = _lines(buf.getvalue())
    assert lines[0] == "activations mxfp8_e4m3 bitflip2"
    assert all(len(line) <= 80 for line in lines)
    last = lines[-1]
    assert "123456/1234567" in last and "SDC 12.34%" in last
    assert re.search(r"[\d,]+ inj/s", last) and "…" not in last


def test_without_a_terminal_plain_lines_are_printed_from_the_start():
    buf = io.StringIO()
    console = Console(file=buf, width=80)  # a StringIO is not a terminal
    with progress_bar("digits", total=10, unit="inj", console=console, every_s=0) as bar:
        assert _lines(buf.getvalue()) == [
            "digits: 0/10 inj (0%), 0:00:00 elapsed, eta -:--:--, -- inj/s"]
        bar.advance(4, info="SDC 25.00%")
        bar.advance(6, info="SDC 10.00%")
    lines = _lines(buf.getvalue())
    assert "\x1b" not in buf.getvalue()
    assert len(lines) == 3
    assert lines[1].startswith("digits: 4/10 inj (40%)") and lines[1].endswith("SDC 25.00%")
    assert lines[2].startswith("digits: 10/10 inj (100%)") and lines[2].endswith("SDC 10.00%")


def test_plain_lines_are_spaced_in_time_and_the_last_one_is_printed_when_interrupted():
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    try:
        with progress_bar("digits", total=10, unit="inj", console=console, every_s=3600) as bar:
            bar.advance(3)
            bar.advance(2)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    lines = _lines(buf.getvalue())
    assert len(lines) == 2 and lines[1].startswith("digits: 5/10 inj (50%)")


def test_the_rate_counts_the_work_just_done_and_is_unknown_before():
    buf = io.StringIO()
    with progress_bar("x", total=100, unit="inj", console=Console(file=buf)) as bar:
        assert bar.rate is None
        time.sleep(0.05)
        bar.advance(10)
        assert 0 < bar.rate <= 10 / 0.05
    assert format_rate(None, "inj") == "-- inj/s"
    assert format_rate(12345.4, "inj") == "12,345 inj/s"
    assert format_rate(0.5, "epoch") == "0.5 epoch/s"


def test_nothing_left_to_run_is_said_instead_of_an_empty_bar():
    for terminal in (True, False):
        buf = io.StringIO()
        console = Console(file=buf, width=80, force_terminal=terminal)
        with progress_bar("digits", total=0, unit="inj", console=console):
            pass
        assert _lines(buf.getvalue()) == ["digits: nothing left to run"]


def test_disabled_prints_nothing():
    buf = io.StringIO()
    with progress_bar("x", total=0, console=Console(file=buf), enabled=False) as bar:
        bar.advance(1)
    with progress_bar("x", total=5, console=Console(file=buf), enabled=False) as bar:
        bar.advance(5)
    assert buf.getvalue() == ""


def test_a_plain_line_too_wide_for_the_log_drops_timing_then_rate_but_never_the_info():
    buf = io.StringIO()
    console = Console(file=buf, width=80)
    name = "hardening-all-layers: text-guided+dup"
    with progress_bar(name, total=3000, unit="inj", console=console, every_s=0) as bar:
        bar.advance(3000, info="SDC 3.33%")
    last = _lines(buf.getvalue())[-1]
    assert last == f"{name}: 3,000/3,000 inj (100%), SDC 3.33%" or (
        last.startswith(f"{name}: 3,000/3,000 inj (100%), ") and "inj/s" in last
        and "elapsed" not in last)
    assert len(last) <= 80 and last.endswith("SDC 3.33%")
    wide = io.StringIO()
    with progress_bar(name, total=3000, unit="inj", console=Console(file=wide, width=200),
                      every_s=0) as bar:
        bar.advance(3000, info="SDC 3.33%")
    assert "elapsed" in _lines(wide.getvalue())[-1]  # room enough: nothing dropped

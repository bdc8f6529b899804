"""Progress output: whole lines when stderr is not a terminal (no carriage-return soup)."""

import io

from lookupc.progress import progress


def test_non_terminal_progress_is_whole_lines():
    out = io.StringIO()
    with progress(total=3, desc="compile", unit="step", file=out, interval=0.0) as bar:
        bar.set_postfix_str("export")
        bar.update(1)
        bar.update(2)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("compile: ") for line in lines)
    assert "compile: 3/3 step" in lines[-1]


def test_disabled_progress_prints_nothing():
    out = io.StringIO()
    with progress(total=2, desc="x", file=out, disable=True, interval=0.0) as bar:
        bar.update(2)
    assert out.getvalue() == ""

"""ui.Display: plain lines off a terminal, nothing with quiet, rich on a terminal."""

from __future__ import annotations

import io

from vmrestore import ui


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_mode_prints_periodic_and_final_lines(monkeypatch) -> None:
    monkeypatch.delenv("VMRESTORE_PROGRESS", raising=False)
    out = io.StringIO()
    with ui.Display(stream=out, interval=0.0) as d:
        assert d.mode == "plain"
        t = d.task("disk 0", total=4 << 20)
        for i in range(1, 5):
            t.update(completed=i << 20)
        d.log("phase 4: data")
        t.done()
    lines = out.getvalue().splitlines()
    assert "phase 4: data" in lines
    assert lines[-1].startswith("disk 0: 100% 4.0/4.0 MiB") and "done in" in lines[-1]
    assert any(ln.startswith("disk 0: 75%") for ln in lines)


def test_quiet_prints_nothing() -> None:
    out = _Tty()
    with ui.Display(stream=out, quiet=True) as d:
        t = d.task("x", total=10, unit="files")
        t.update(advance=5)
        d.log("hello")
        t.done()
    assert out.getvalue() == ""


def test_tty_uses_rich_and_env_overrides(monkeypatch) -> None:
    monkeypatch.delenv("VMRESTORE_PROGRESS", raising=False)
    out = _Tty()
    with ui.Display(stream=out) as d:
        assert d.mode == "rich"
        t = d.task("disk 1", total=100)
        t.update(completed=100)
        t.done()
    assert "disk 1" in out.getvalue()
    monkeypatch.setenv("VMRESTORE_PROGRESS", "plain")
    assert ui.Display(stream=_Tty()).mode == "plain"

"""A small progress bar on stderr, usable wherever qwen2np takes a `progress(done, total, label)` callable.

Loading a checkpoint, converting one and fetching the test checkpoint all report progress through a
plain callable, so library code never prints. The command line passes a `ProgressBar`:

>>> import io
>>> out = io.StringIO()
>>> bar = ProgressBar(out, enabled=True, min_interval=0.0)
>>> bar(512 * 2**20, 1024 * 2**20, "model.layers.3.mlp.up_proj.weight")
>>> bar(1024 * 2**20, 1024 * 2**20, "lm_head.weight")
>>> print(out.getvalue().split("\\r")[-1].rstrip())
[##############################] 100%  1.07/1.07 GB  lm_head.weight

The bar redraws one line in place (carriage return) and ends it with a newline when `done == total`.
It draws only when its stream is a terminal, unless `enabled=True` is given, so redirected output and
CI logs stay clean.
"""

import sys
import time

from ..weights.system import format_bytes

__all__ = ["ProgressBar"]


class ProgressBar:
    """`progress(done, total, label)` drawn as `[#####.....]  45%  1.13/2.52 GB  label` on one line.

    `unit="bytes"` shows `done/total` as sizes; `unit=None` shows plain counts. Redraws at most every
    `min_interval` seconds, except the final one, which is always drawn.
    """

    LINE = 120  # characters: each line is cut or padded to this width

    def __init__(self, file=None, enabled=None, unit="bytes", width=30, min_interval=0.1):
        self.file = sys.stderr if file is None else file
        isatty = getattr(self.file, "isatty", lambda: False)
        self.enabled = isatty() if enabled is None else bool(enabled)
        self.unit = unit
        self.width = width
        self.min_interval = min_interval
        self._last_draw = float("-inf")

    def __call__(self, done, total, label=""):
        if not self.enabled:
            return
        now = time.monotonic()
        final = total > 0 and done >= total
        if not final and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        fraction = min(max(done / total, 0.0), 1.0) if total > 0 else 0.0
        filled = int(round(fraction * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        if self.unit == "bytes":
            total_text = format_bytes(total)
            amount = f"{_same_unit(done, total_text)}/{total_text}"
        else:
            amount = f"{done}/{total}"
        line = f"[{bar}] {fraction * 100:3.0f}%  {amount}  {label}"[:self.LINE]
        # "\r" returns to the start of the line; padding erases a longer previous label
        self.file.write("\r" + line.ljust(self.LINE) + ("\n" if final else ""))
        self.file.flush()


def _same_unit(n, total_text):
    """`n` written in the unit that `total_text` ends with (so `1.13/2.52 GB` reads as one quantity)."""
    unit = total_text.split()[-1]
    size = {"GB": 1e9, "MB": 1e6, "kB": 1e3, "B": 1}[unit]
    return f"{n / size:.2f}" if unit != "B" else str(int(n))

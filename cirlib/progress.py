"""Progress bars: live widgets in an interactive notebook, plain text everywhere else.

`tqdm.auto` draws an ipywidgets bar in any Jupyter kernel. In a notebook executed by papermill (`python -m
cirlib.batch`) nobody watches the widget and the executed copy keeps only its first text form ("epochs: 0%"), so a
finished run looks stuck. The batch runner therefore starts its kernels with `CIRLIB_PROGRESS=text` in their
environment, and every cirlib bar is then a plain text bar whose last line in the executed copy is its final state.
"""
from __future__ import annotations

import os
from typing import Any

PROGRESS_ENV = "CIRLIB_PROGRESS"  # "text": plain text bars ("auto", the default: widgets in a live notebook)
PROGRESS_MODES = ("auto", "text")


def progress_mode() -> str:
    """The bar style this process draws: $CIRLIB_PROGRESS, "auto" when unset."""
    mode = os.environ.get(PROGRESS_ENV, "auto") or "auto"
    if mode not in PROGRESS_MODES:
        raise ValueError(f"${PROGRESS_ENV}={mode!r}: expected one of {PROGRESS_MODES}")
    return mode


def _tqdm_class():
    if progress_mode() == "text":
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


def progress_bar(iterable: Any = None, **kwargs: Any):
    """A tqdm bar of the style `progress_mode()` selects; takes tqdm's arguments.

    Text bars all draw on one line (position 0): a nested bar on a line of its own would move the cursor up with an
    escape code that notebooks do not interpret, so every update of the outer bar would stay behind as a line of its
    own ("epochs: 0%", "epoch 0: 50%", ...) and the executed copy would look stuck."""
    if progress_mode() == "text":
        kwargs.setdefault("position", 0)
    return _tqdm_class()(iterable, **kwargs)


def progress_write(message: str) -> None:
    """Print a line without breaking an open bar (tqdm.write of the selected style)."""
    _tqdm_class().write(message)

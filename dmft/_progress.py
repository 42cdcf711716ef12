"""Progress bars and per-iteration logging.

Long runs show a progress bar when standard error is a terminal (``progress=None``), or
always / never with ``progress=True`` / ``False``. Solver iterations are logged at INFO level
on the ``"dmft"`` logger, one line each; ``dmft.enable_logging()`` prints them.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("dmft")


def enable_logging(level=logging.INFO):
    """Print the package's log lines (one per solver iteration) to standard error."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler


def progress_enabled(progress) -> bool:
    if progress is None:
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False
    return bool(progress)


def progress_bar(total, desc, progress=None, unit="it"):
    """A tqdm bar (or a silent stand-in) with ``update(n)``, ``set_postfix_str`` and ``close``."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(progress),
                leave=False, dynamic_ncols=True)

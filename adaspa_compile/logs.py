"""De-duplicated logging: one line per distinct message."""

from __future__ import annotations

import logging
import threading

_seen: set = set()
_lock = threading.Lock()


def log_once(logger: logging.Logger, message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` through ``logger`` the first time it is seen in this process."""
    with _lock:
        if message in _seen:
            return
        _seen.add(message)
    logger.log(level, message)

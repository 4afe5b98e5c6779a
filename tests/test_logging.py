"""``warn_once``: one WARNING per cause (the caller's key), DEBUG for the repeats."""

import logging

from cachepass._logging import get_logger, reset_warnings, warn_once


def test_warn_once_per_key(caplog):
    log = get_logger("test")
    with caplog.at_level(logging.DEBUG, logger="cachepass"):
        assert warn_once(log, ("cause", 1), "model %s: %s", "A", "first")
        assert not warn_once(log, ("cause", 1), "model %s: %s", "A", "again")
        assert warn_once(log, ("cause", 2), "model %s: %s", "B", "first")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "model A: first"), (logging.DEBUG, "model A: again"), (logging.WARNING, "model B: first")]
    assert all(r.name == "cachepass.test" for r in caplog.records)
    reset_warnings()
    assert warn_once(log, ("cause", 1), "again after a reset")

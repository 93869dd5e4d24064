"""Test configuration shared by the whole suite.

DDS discovery is confined to this machine and each test run gets a ROS domain of its own,
set here before anything imports rclpy (the Makefile and .ci/run set them too).
"""

from __future__ import annotations

import os
import random

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
os.environ.setdefault("PYTHONUNBUFFERED", "1")

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False,
                     help="also run tests marked slow (realistic sizes, minutes)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_views_registry():
    """User views (``--views FILE``, ``CARDIAC_COPILOT_VIEWS``) stay registered for the rest of a
    process by design; between tests they must not, or one test's views leak into the next."""
    from cardiac_copilot_ros import planes

    views, by_key, env_loaded = list(planes._views), dict(planes._by_key), planes._env_loaded
    env = os.environ.get(planes.VIEWS_ENV)
    yield
    with planes._lock:
        planes._views[:] = views
        planes._by_key.clear()
        planes._by_key.update(by_key)
        planes._env_loaded = env_loaded
    if env is None:
        os.environ.pop(planes.VIEWS_ENV, None)
    else:
        os.environ[planes.VIEWS_ENV] = env

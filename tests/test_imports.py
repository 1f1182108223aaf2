"""Every module imports on its own (catches missing dependencies and import cycles)."""

import importlib
import pkgutil

import pytest

import selfalign

MODULES = sorted(m.name for m in pkgutil.walk_packages(selfalign.__path__, "selfalign.") if m.name != "selfalign.__main__")


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)


def test_modules_found():
    assert {"selfalign.losses", "selfalign.logprobs", "selfalign.train", "selfalign.config", "selfalign.cli"} <= set(MODULES)

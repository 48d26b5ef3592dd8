"""The registries' plug-in mechanism: names, refusals, and code outside cirlib found through CIRLIB_PLUGINS."""
from __future__ import annotations

import pytest

from cirlib import registry
from cirlib.registry import PluginError, Registry, RegistryError


def test_register_get_and_refuse_a_second_class_under_one_name():
    reg: Registry[type] = Registry("widget", "cirlib.tests")

    @reg.register
    class A:
        name = "a"

    assert reg.get("a") is A and "a" in reg and reg.names() == ("a",)

    class B:
        name = "a"

    with pytest.raises(RegistryError, match="already registered"):
        reg.register(B)
    with pytest.raises(RegistryError, match=r"unknown widget 'zzz': known are \['a'\].*CIRLIB_PLUGINS"):
        reg.get("zzz")
    with pytest.raises(RegistryError, match="name"):
        reg.register(type("NoName", (), {}))


def test_a_plugin_file_named_in_the_environment_is_imported_on_a_miss(tmp_path, monkeypatch):
    reg: Registry[type] = Registry("widget", "cirlib.tests")
    registry._REGISTRY_FOR_TEST = reg  # the plugin file registers into this one
    plugin = tmp_path / "my_widget.py"
    plugin.write_text("from cirlib import registry\n\n"
                      "@registry._REGISTRY_FOR_TEST.register\nclass Mine:\n    name = 'mine'\n")
    monkeypatch.setenv(registry.PLUGINS_ENV, str(plugin))
    try:
        assert reg.get("mine").__name__ == "Mine"
    finally:
        del registry._REGISTRY_FOR_TEST
        registry._loaded_plugins.discard(str(plugin))


def test_a_broken_plugin_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(registry.PLUGINS_ENV, f"{tmp_path / 'absent.py'}")
    with pytest.raises(PluginError, match="absent.py"):
        Registry("widget", "x").get("nothing")
    monkeypatch.setenv(registry.PLUGINS_ENV, "no_such_module_cirlib_xyz")
    with pytest.raises(PluginError, match="no_such_module_cirlib_xyz"):
        Registry("widget", "x").get("nothing")

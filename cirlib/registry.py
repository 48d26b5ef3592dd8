"""Registries of the things people add: datasets, first stages, re-rankers. A leaf helper: imports nothing from cirlib.

A registry maps a name (what configs, YAML files and command lines say) to a class. A class joins it with a decorator
in its own module:

    from cirlib.models.rerankers import RERANKERS

    @RERANKERS.register
    class MyReranker(Reranker):
        name = "mine"

Code outside cirlib (a research project, a test file) is found without editing cirlib: name its module or file in
the environment variable CIRLIB_PLUGINS (comma-separated, e.g. `CIRLIB_PLUGINS=myproj.rerankers,./toy_dataset.py`),
or declare it under the `cirlib.plugins` entry-point group of an installed package. Plugins are imported the first
time a registry is asked for a name it does not hold, so a notebook, `python -m cirlib.launch` and a papermill
kernel started from either all see the same names.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

PLUGINS_ENV = "CIRLIB_PLUGINS"
ENTRY_POINT_GROUP = "cirlib.plugins"

T = TypeVar("T")

_loaded_plugins: set[str] = set()


class RegistryError(KeyError):
    """An unknown name, or a second class under one name. The message says what is known and how to add more."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PluginError(ImportError):
    """A plugin named in CIRLIB_PLUGINS or an entry point could not be imported."""


def _plugin_specs() -> list[str]:
    raw = os.environ.get(PLUGINS_ENV, "")
    return [s.strip() for s in raw.split(",") if s.strip()]


def _import_plugin(spec: str) -> None:
    """Import a module name or a .py file (relative paths from the current directory)."""
    if spec.endswith(".py") or os.sep in spec or "/" in spec:
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"{PLUGINS_ENV} names {spec!r}, which is not a file ({path})")
        module_name = f"cirlib_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"{PLUGINS_ENV}: cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as err:
            del sys.modules[module_name]
            raise PluginError(f"{PLUGINS_ENV}: importing {path} failed: {type(err).__name__}: {err}") from err
        return
    try:
        importlib.import_module(spec)
    except Exception as err:
        raise PluginError(f"{PLUGINS_ENV}: importing module {spec!r} failed: {type(err).__name__}: {err}") from err


def load_plugins() -> list[str]:
    """Import every plugin of CIRLIB_PLUGINS and of the `cirlib.plugins` entry points not imported yet; returns the
    ones imported now. Raises PluginError naming the plugin that failed."""
    new = []
    for spec in _plugin_specs():
        if spec not in _loaded_plugins:
            _import_plugin(spec)
            _loaded_plugins.add(spec)
            new.append(spec)
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        key = f"entry-point:{ep.value}"
        if key in _loaded_plugins:
            continue
        try:
            ep.load()
        except Exception as err:
            raise PluginError(f"entry point {ep.name} = {ep.value} ({ENTRY_POINT_GROUP}) failed: "
                              f"{type(err).__name__}: {err}") from err
        _loaded_plugins.add(key)
        new.append(key)
    return new


class Registry(Generic[T]):
    """Names to classes of one kind ("dataset", "first stage", "re-ranker")."""

    def __init__(self, kind: str, where: str):
        """Args: kind: what the registry holds, for messages; where: the module whose classes register here."""
        self.kind = kind
        self.where = where
        self._classes: dict[str, T] = {}

    def register(self, cls: T | None = None, *, name: str | None = None) -> T | Callable[[T], T]:
        """Class decorator: add `cls` under `name` (default: its `name` attribute). A second class under a taken name
        is refused (re-registering the same class, e.g. on a module reload, is allowed)."""
        def add(c: T) -> T:
            key = name or getattr(c, "name", None)
            if not isinstance(key, str) or not key:
                raise RegistryError(f"a {self.kind} class needs a non-empty `name` attribute to register: {c!r}")
            old = self._classes.get(key)
            if old is not None and old is not c and _qualname(old) != _qualname(c):
                raise RegistryError(f"{self.kind} {key!r} is already registered by {_qualname(old)}; "
                                    f"{_qualname(c)} needs another name")
            self._classes[key] = c
            return c
        return add if cls is None else add(cls)

    def get(self, name: str) -> T:
        """The class registered as `name`; plugins are imported first if it is unknown. Raises RegistryError listing
        the known names and how to add one."""
        if name not in self._classes:
            load_plugins()
        try:
            return self._classes[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} {name!r}: known are {sorted(self._classes)}. A new {self.kind} is a class "
                f"registered in {self.where}'s registry; code outside cirlib is found through "
                f"{PLUGINS_ENV}=<module or file.py> or the {ENTRY_POINT_GROUP!r} entry points") from None

    def names(self) -> tuple[str, ...]:
        """Names known now (plugins imported first)."""
        load_plugins()
        return tuple(sorted(self._classes))

    def __contains__(self, name: object) -> bool:
        if name not in self._classes:
            load_plugins()
        return name in self._classes

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def unregister(self, name: str) -> None:
        """Remove a name (tests registering a class of their own clean up with this)."""
        self._classes.pop(name, None)


def _qualname(c: object) -> str:
    return f"{getattr(c, '__module__', '?')}.{getattr(c, '__qualname__', repr(c))}"

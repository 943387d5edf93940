"""Load the Feishu SDK's API services when they are first used, not all at import.

``import lark_oapi`` runs ``lark_oapi/api/__init__.py``, which imports every API service the
SDK has (about 60, each with every version, resource and model: some 9,700 modules, 110 MiB of
the process's memory and 3 s of its start), and ``lark_oapi/client.py``, which imports every
service's ``service.py`` to build one of each in ``Client``. The bot answers with three of them
(``im``, ``cardkit``, ``auth``: :data:`bot.feishu.sdk_compat.ANSWER_PATH_SERVICES`).

:func:`load_api_services_on_demand` installs an import hook (a ``sys.meta_path`` finder) for
``lark_oapi.api`` and below, after which:

* a package there (``lark_oapi.api``, ``lark_oapi.api.im``, ``…im.v1``, ``…im.v1.model``) is
  created with its ``__path__`` but without running its ``__init__``, so importing one module
  inside it (what the event dispatcher does for every service's ``processor``) loads that
  module alone;
* a service's ``service.py`` (``lark_oapi.api.drive.service``) is a stand-in whose service
  classes (``DriveService``) build a :class:`ServiceOnDemand`, so ``Client.builder().build()``
  loads nothing;
* the first use of a service loads it completely (:func:`load_service`): an attribute of a
  :class:`ServiceOnDemand` (``client.drive.v1``), or a name that a package of the service does
  not hold yet (``from lark_oapi.api.drive.v1 import File``, ``lark_oapi.im``). It runs the
  ``__init__`` of each of the service's packages created so far, deepest first, and from then
  on the service's modules import the normal way.

So code written for the SDK works unchanged; what a process never uses it never loads. The
hook relies on the SDK's generated layout (``lark_oapi/api/<service>/service.py`` defining
``<Name>Service(config)``, and packages whose ``__init__`` only imports their own children),
checked for the versions :data:`bot.feishu.sdk_compat.SUPPORTED` names;
``tests/test_sdk_loader.py`` loads every service
on demand and compares it with the SDK's own ``__init__``. Install it once per process, before
the SDK is imported, at the edge (:func:`bot.cli.main` does, for those versions only: another
version loads whole, as it always did). The long-connection process loads
only the WebSocket client and does not need it (see :mod:`bot.feishu.sdk_compat`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
import types
from collections.abc import Callable, Sequence
from typing import Any, Final

SDK_PACKAGE: Final = "lark_oapi"
API_PACKAGE: Final = f"{SDK_PACKAGE}.api"
_SERVICE_MODULE: Final = "service"

_lock = threading.RLock()
_deferred: dict[str, importlib.machinery.ModuleSpec] = {}
"""Packages created without running their ``__init__``, by name: the real spec of each."""
_loading_or_loaded: set[str] = set()
"""Services whose modules import the normal way (being loaded by :func:`load_service`, or done)."""


def load_api_services_on_demand() -> None:
    """Install the import hook (once per process; a no-op when installed already).

    Call it before the SDK is imported: an API module imported before stays as it is.
    """
    with _lock:
        if not is_installed():
            sys.meta_path.insert(0, _ApiFinder())


def is_installed() -> bool:
    """Whether :func:`load_api_services_on_demand` has installed the hook in this process."""
    return any(isinstance(finder, _ApiFinder) for finder in sys.meta_path)


def service_of(module_name: str) -> str | None:
    """The API service a module of ``lark_oapi.api`` belongs to (``None``: the package itself)."""
    parts = module_name.split(".")
    return parts[2] if len(parts) > 2 else None


def loaded_services() -> frozenset[str]:
    """The services loaded (or being loaded) in this process through the hook."""
    with _lock:
        return frozenset(_loading_or_loaded)


def load_service(service: str) -> None:
    """Load every module of an API service the way ``import lark_oapi`` would (idempotent).

    Thread-safe: another thread asking for the same service waits until it is loaded.
    """
    with _lock:
        if service in _loading_or_loaded:
            return
        _loading_or_loaded.add(service)
        prefix = f"{API_PACKAGE}.{service}"
        packages = [n for n in list(_deferred) if n == prefix or n.startswith(f"{prefix}.")]
        # Deepest first: a package's __init__ imports names from its children's.
        for name in sorted(packages, key=lambda name: name.count("."), reverse=True):
            _run_package_init(name)
        stand_in = sys.modules.get(f"{prefix}.{_SERVICE_MODULE}")
        if isinstance(stand_in, _ServiceStandIn):
            del sys.modules[stand_in.__name__]
            importlib.import_module(stand_in.__name__)
        if prefix not in sys.modules:  # only `service.py` had been asked for
            importlib.import_module(prefix)


def _run_package_init(name: str) -> None:
    """Run a deferred package's own ``__init__`` (a no-op once it has run)."""
    spec = _deferred.pop(name, None)
    if spec is None:
        return
    module = sys.modules[name]
    module.__dict__.pop("__getattr__", None)
    assert spec.loader is not None  # a package found on the path has one
    module.__spec__ = spec
    module.__loader__ = spec.loader
    spec.loader.exec_module(module)


class ServiceOnDemand:
    """Stands in for one API service of a ``lark_oapi.Client`` until it is first used.

    ``client.drive`` is one of these; ``client.drive.v1`` loads the service
    (:func:`load_service`), builds the SDK's own ``DriveService`` with the client's config,
    and from then on every attribute is the real service's.
    """

    def __init__(self, service: str, class_name: str, config: Any) -> None:
        self._service = service
        self._class_name = class_name
        self._config = config
        self._real: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.real_service(), name)

    def real_service(self) -> Any:
        """The SDK's service object, loading the service on the first call."""
        with _lock:
            if self._real is None:
                load_service(self._service)
                module = sys.modules[f"{API_PACKAGE}.{self._service}.{_SERVICE_MODULE}"]
                self._real = getattr(module, self._class_name)(self._config)
            return self._real

    def __repr__(self) -> str:
        state = "loaded" if self._real is not None else "not loaded yet"
        return f"<{self._class_name} on demand, {state}>"


class _ServiceStandIn(types.ModuleType):
    """``lark_oapi.api.<service>.service`` until the service is loaded."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not name.endswith("Service"):
            raise AttributeError(name)
        service = service_of(self.__name__)
        assert service is not None

        def build(config: Any) -> ServiceOnDemand:
            return ServiceOnDemand(service, name, config)

        return build


class _ServiceStandInLoader(importlib.abc.Loader):
    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _ServiceStandIn(spec.name)

    def exec_module(self, module: types.ModuleType) -> None:
        return None


class _WrappingLoader(importlib.abc.Loader):
    """A loader in front of the one the path finder found (``real_spec``'s)."""

    def __init__(self, real_spec: importlib.machinery.ModuleSpec) -> None:
        self._real_spec = real_spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object


class _DeferredPackageLoader(_WrappingLoader):
    """Creates a package without running its ``__init__`` (kept for :func:`load_service`)."""

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        _deferred[name] = self._real_spec
        module.__dict__["__getattr__"] = _attribute_loader(name)
        service = service_of(name)
        if service is not None and service in _loading_or_loaded:
            # Another thread loaded the service since this import began: no deferring now.
            with _lock:
                _run_package_init(name)


def _attribute_loader(package: str) -> Callable[[str], Any]:
    """A deferred package's module ``__getattr__``: a name it lacks loads what holds it."""

    def load_attribute(name: str) -> Any:
        service = service_of(package)
        if service is None:  # `lark_oapi.api.<name>`: the service of that name
            return _service_package(package, name)
        if name.startswith("_"):  # no model or module name starts so
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        load_service(service)
        with _lock:
            _run_package_init(package)  # deferred by a race with the service's loading, if at all
        try:  # not getattr: while the service loads, this package may not have the name yet
            return sys.modules[package].__dict__[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return load_attribute


def _service_package(owner: str, name: str) -> types.ModuleType:
    """``lark_oapi.api.<name>``, loaded, for ``owner.<name>`` (owner: ``lark_oapi``, which
    ``from .api import *`` gave the services, or ``lark_oapi.api``); AttributeError when no
    service has that name."""
    if name.startswith("_") or importlib.util.find_spec(f"{API_PACKAGE}.{name}") is None:
        raise AttributeError(f"module {owner!r} has no attribute {name!r}")
    load_service(name)
    return importlib.import_module(f"{API_PACKAGE}.{name}")


def _root_attribute_loader(name: str) -> Any:
    """``lark_oapi``'s module ``__getattr__``: ``lark_oapi.im`` as ``from .api import *`` gave."""
    return _service_package(SDK_PACKAGE, name)


class _RootLoader(_WrappingLoader):
    """Runs ``lark_oapi/__init__.py`` as usual, then gives the package the fallback above."""

    def exec_module(self, module: types.ModuleType) -> None:
        assert self._real_spec.loader is not None
        self._real_spec.loader.exec_module(module)
        module.__dict__["__getattr__"] = _root_attribute_loader


class _ApiFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self,
        fullname: str,
        path: Sequence[str] | None,
        target: types.ModuleType | None = None,
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname == SDK_PACKAGE:
            return _wrapped(fullname, path, _RootLoader)
        if not fullname.startswith(f"{API_PACKAGE}.") and fullname != API_PACKAGE:
            return None
        service = service_of(fullname)
        if service is not None and service in _loading_or_loaded:
            return None
        real = importlib.machinery.PathFinder.find_spec(fullname, path)
        if real is None:
            return None
        if fullname.count(".") == 3 and fullname.endswith(f".{_SERVICE_MODULE}"):
            return importlib.util.spec_from_loader(
                fullname, _ServiceStandInLoader(), origin=real.origin
            )
        if real.submodule_search_locations is None:  # a plain module: as it is
            return None
        return _wrapped(fullname, path, _DeferredPackageLoader, real)


def _wrapped(
    fullname: str,
    path: Sequence[str] | None,
    loader_type: Callable[[importlib.machinery.ModuleSpec], importlib.abc.Loader],
    real: importlib.machinery.ModuleSpec | None = None,
) -> importlib.machinery.ModuleSpec | None:
    real = real or importlib.machinery.PathFinder.find_spec(fullname, path)
    if real is None or real.loader is None:
        return None
    spec = importlib.machinery.ModuleSpec(
        fullname, loader_type(real), origin=real.origin, is_package=True
    )
    spec.submodule_search_locations = real.submodule_search_locations
    spec.has_location = real.has_location
    spec.cached = real.cached
    return spec

"""The method registry is filled by importing every module of this package: one file per method,
each registering itself with ``@register`` (so adding a method touches no shared file)."""
import pkgutil
from importlib import import_module

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    if not _info.name.startswith("_"):
        import_module(f"{__name__}.{_info.name}")

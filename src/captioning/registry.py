"""A small name -> builder registry, one per swappable part (encoders, decoders, data sources)."""

from collections.abc import Callable
from typing import Any

from .errors import ConfigError


class Registry:
    """Maps names to builders; `build(name, **cfg)` fails with the list of valid names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._builders[name] = fn
            return fn

        return wrap

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return self._builders[name]

    def build(self, name: str, **cfg: Any) -> Any:
        return self.get(name)(**cfg)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

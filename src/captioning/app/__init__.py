"""Web app: `make app` or `python -m captioning.app [--ckpt x.ckpt]`.

`create_app` (in `server`) builds the FastAPI app; `service` holds the HTTP-free parts, which
caption.py shares without importing FastAPI.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "create_app":  # lazily: the CLI imports `service` and should not pay for FastAPI
        from .server import create_app

        return create_app
    raise AttributeError(name)

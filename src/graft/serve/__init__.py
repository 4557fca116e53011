"""Serve a bundle over HTTP: a JSON API and a web page (the `[serve]` extra: FastAPI + uvicorn).

>>> from graft.serve import create_app
>>> app = create_app("runs/birds/bundle", max_images=8)

Importing this package imports FastAPI; `import graft` does not import it.
"""

from __future__ import annotations

from graft.serve.app import DEFAULT_MAX_IMAGES, DEFAULT_MAX_UPLOAD_BYTES, DEFAULT_TOP_K, create_app

__all__ = ["DEFAULT_MAX_IMAGES", "DEFAULT_MAX_UPLOAD_BYTES", "DEFAULT_TOP_K", "create_app"]

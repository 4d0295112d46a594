"""`stylenat serve`: a latent explorer in the browser (sample, mix, interpolate, edit, project, and
see each head group's attention), served locally and working offline.

Why Starlette + uvicorn and a hand-written page rather than Gradio (the ``app`` extra):

- Offline: the page, its script and its style are package data served by the app itself
  (``static/``), and the Content-Security-Policy forbids anything else. Gradio's default theme
  loads Google Fonts, and its front end is a large bundle we would not control.
- Size: starlette and uvicorn with what they need (anyio, h11, click, idna) take about 5 MB
  installed; Gradio brings fastapi, pandas, huggingface_hub, its front-end bundle and dozens more.
- Safety limits: upload size and type, body size, grid/frame/step bounds, one request at a time
  on the model and the Host and Origin checks are plain code in :mod:`stylenat.app.server` and
  :mod:`stylenat.app.explorer`, not framework settings to find and keep in step with releases.
- Testability: the model side (:class:`~stylenat.app.explorer.Explorer`) is plain Python, the API
  is plain JSON over HTTP, and the page has stable element ids a headless browser can drive.

Layers: this package uses sampling, editing, projection and attention_maps; only the CLI is above it.
Importing it needs no extra; :mod:`stylenat.app.server` needs ``pip install "stylenat[app]"``.
"""

from __future__ import annotations

import importlib.util

from stylenat.app.explorer import Explorer, Limits
from stylenat.errors import UserError

__all__ = ["Explorer", "Limits", "require_app_extra"]

APP_MODULES = ("starlette", "uvicorn")


def require_app_extra() -> None:
    """UserError with the install command when the ``app`` extra (starlette, uvicorn) is missing."""
    missing = [m for m in APP_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f'the web app needs {" and ".join(missing)}: pip install "stylenat[app]"')

"""The pages blueprint: the web page ``GET /`` and the API reference ``GET /docs``."""

from __future__ import annotations

import re

from flask import Blueprint, render_template
from markupsafe import Markup, escape

from captioner.api import MAX_BEAM_SIZE, MAX_LENGTH_LIMIT

from . import openapi
from .state import current_state

pages = Blueprint("pages", __name__)


@pages.app_template_filter("md_code")
def md_code(text: str) -> Markup:
    """Escape ``text`` and render its `backtick` spans as <code> (for the OpenAPI descriptions on /docs)."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


@pages.get("/")
def index() -> str:
    """Upload an image, read its caption, see where each word looked."""
    return render_template(
        "index.html", settings=current_state().settings, max_beam=MAX_BEAM_SIZE, max_length=MAX_LENGTH_LIMIT
    )


@pages.get("/docs")
def docs() -> str:
    """The OpenAPI document as a web page."""
    spec = openapi.build_spec(current_state().settings)
    return render_template(
        "docs.html", spec=spec, operations=openapi.operations(spec), schemas=openapi.schema_texts(spec)
    )

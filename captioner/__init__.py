"""Show, Attend and Tell image captioning: encoder -> attention -> decoder -> search."""
from importlib import metadata

from .api import Caption, Captioner
from .images import ImageError, load_image, preprocess

try:  # pyproject.toml is the one version source
    __version__ = metadata.version("captioner")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
__all__ = ["Caption", "Captioner", "ImageError", "load_image", "preprocess", "__version__"]

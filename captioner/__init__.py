"""Show, Attend and Tell image captioning: encoder -> attention -> decoder -> search."""
from .api import Caption, Captioner
from .images import ImageError, load_image, preprocess

__version__ = "0.1.0"
__all__ = ["Caption", "Captioner", "ImageError", "load_image", "preprocess", "__version__"]

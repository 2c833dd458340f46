"""Training and evaluation data: image folders, NIGHTS (real layout), a synthetic NIGHTS-layout set."""
from .folder import IMAGE_EXTENSIONS, ImageFolder, list_images, load_image, load_images
from .nights import NIGHTS_COLUMNS, NIGHTS_SPLITS, NightsDataset, TwoAFCRow, find_nights_root, read_nights
from .synthetic import make_synthetic_nights

__all__ = [
    "IMAGE_EXTENSIONS", "ImageFolder", "NIGHTS_COLUMNS", "NIGHTS_SPLITS", "NightsDataset", "TwoAFCRow",
    "find_nights_root", "list_images", "load_image", "load_images", "make_synthetic_nights", "read_nights",
]

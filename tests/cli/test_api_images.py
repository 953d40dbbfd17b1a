"""Images handed to the Python API as PIL objects get Load Image's 16-bit scaling too."""
import numpy as np
from PIL import Image

from nodes import api


def test_a_16_bit_pil_image_is_scaled_not_clipped_to_white():
    gradient = (np.arange(64 * 16).reshape(16, 64) * 60).astype(np.uint16)  # 0 .. 61380
    opened = api._open(Image.fromarray(gradient))
    pixels = np.asarray(opened.convert("RGB"))
    assert pixels.max() == 61380 // 255 and pixels.min() == 0


def test_other_pil_modes_are_passed_as_they_are():
    rgba = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert api._open(rgba) is rgba  # subject preprocessing resizes RGBA in its own mode, as the reference

"""Image size limits stay the pack's own: importing it leaves PIL's process-wide limit alone, an image
whose header claims more than `image_files.MAX_PIXELS` is refused by name before it is decoded (input
files and remote results alike), and 16-bit results decode without a float copy of the whole image."""
from __future__ import annotations

import base64
import io
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nodes.cli import command as cli
from nodes.remote import ProviderError
from nodes.remote.images import decode_results, to_rgb

ROOT = Path(__file__).resolve().parents[2]
CAP_TEXT = "over the 67.1 MP (8192x8192) an image may have here"


def png_of_size(width: int, height: int) -> bytes:
    """A valid, all-black 1-bit grayscale PNG of any size: a few kB on disk however many pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)  # filter byte + packed bits
    packer = zlib.compressobj(9)
    block = row * max(1, 4096 // len(row) + 1)
    rows_per_block = len(block) // len(row)
    data, left = [], height
    while left > 0:
        n = min(left, rows_per_block)
        data.append(packer.compress(row * n if n < rows_per_block else block))
        left -= n
    data.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(data)) + chunk(b"IEND", b"")


def test_importing_the_api_and_the_command_line_leaves_pils_limit_alone():
    code = ("from PIL import Image; before = Image.MAX_IMAGE_PIXELS; "
            "import nodes.api, nodes.cli.command, nodes.remote; "
            "assert Image.MAX_IMAGE_PIXELS == before, (before, Image.MAX_IMAGE_PIXELS); print('unchanged', before)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"unchanged {Image.MAX_IMAGE_PIXELS}"


@pytest.mark.parametrize("size", [(9000, 9000), (20000, 20000)])  # over the cap; over twice PIL's own too
def test_an_input_image_over_the_cap_is_refused_before_any_model_loads(tmp_path, capsys, size):
    big = tmp_path / "huge.png"
    big.write_bytes(png_of_size(*size))
    code = cli.main(["--tiny", "--prompt", "a cat", "--subject", str(big), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == cli.EXIT_USAGE
    assert f"subject '{big}'" in err and "over the 67.1 MP (8192x8192)" in err and "nothing was generated" in err
    if size == (9000, 9000):
        assert f"is 9000x9000 pixels (81.0 MP), {CAP_TEXT}" in err
    assert not (tmp_path / "out").exists()


def test_an_image_at_the_cap_passes_the_check(tmp_path, capsys):
    ok = tmp_path / "wide.png"
    ok.write_bytes(png_of_size(16384, 4096))  # 67.1 MP exactly
    code = cli.main(["--tiny", "--prompt", "a cat", "--subject", str(ok), "--out", str(tmp_path), "--dry-run"])
    assert code == cli.EXIT_OK, capsys.readouterr().err


def test_a_result_image_over_the_cap_is_refused_by_name():
    item = {"b64_json": base64.b64encode(png_of_size(8193, 8192)).decode()}
    with pytest.raises(ProviderError) as err:
        decode_results([item], None, "fal", "rid-3")
    text = str(err.value)
    assert "fal: result image 1 of 1 could not be read: it is 8193x8192 pixels (67.1 MP), " + CAP_TEXT in text
    assert "request_id=rid-3" in text


def test_a_16_bit_result_decodes_exactly_in_bounded_memory():
    height, width = 1024, 2048
    ramp = (np.arange(height * width, dtype=np.uint64) * 65535 // (height * width - 1)).astype(np.uint16)
    wide = ramp.reshape(height, width)
    buf = io.BytesIO()
    Image.fromarray(wide).save(buf, "PNG")
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as check:
        assert check.mode == "I;16"  # PIL reads it as 16-bit, the path under test
    expected = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)

    tracemalloc.start()
    try:
        img = to_rgb(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.shape == (height, width, 3)
    assert np.array_equal(arr[..., 0], expected) and np.array_equal(arr[..., 2], expected)
    assert arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255
    # A float64 copy alone is 8 bytes a pixel; the result array is 1, the working strip < 1 MB.
    assert peak < 2 * height * width, f"{peak / (height * width):.2f} bytes a pixel"

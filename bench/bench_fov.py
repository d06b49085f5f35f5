"""Field-of-view finding on a 15-megapixel fundus photograph: the fast thumbnail finder that
finetune, evaluate, predict and pretrain use, against the full-resolution threshold (baseline).

    .venv/bin/python bench/bench_fov.py [--repeats 5] [--smoke]

The photograph is a bundled HRF image (1752x1168) enlarged to 4928x3264, a common sensor size.
Prints seconds per image for both, their ratio, the agreement of the two masks with HRF's expert
field-of-view mask, and the CPU model (`lscpu`). Target: under 0.5 s per 15-megapixel photograph.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from _bench import cpu_model
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from visionfm_core.data.preprocess import fast_fundus_fov, fundus_fov_mask  # noqa: E402
from visionfm_core.data.readers import read_image  # noqa: E402

HRF = ROOT / "simulations" / "data" / "hrf"


def seconds(function: object, image: np.ndarray, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function(image)  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a 2-megapixel image, one repeat")
    args = parser.parse_args()
    image = read_image(HRF / "images" / "04_g.jpg")
    with Image.open(HRF / "mask" / "04_g_mask.png") as mask_file:
        expert = np.asarray(mask_file.convert("L")) > 127
    size = (1752, 1168) if args.smoke else (4928, 3264)
    big = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    expert_big = np.asarray(Image.fromarray(expert).resize(size, Image.Resampling.NEAREST))
    repeats = 1 if args.smoke else args.repeats
    fast = seconds(fast_fundus_fov, big, repeats)
    full = seconds(fundus_fov_mask, big, repeats)
    print(f"CPU: {cpu_model()}")
    print(f"image: {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} megapixels), best of {repeats}")
    print(f"fast thumbnail finder: {fast:.4f} s; full-resolution threshold (baseline): {full:.4f} s")
    print(f"ratio (baseline / fast): {full / fast:.1f}x")
    print(
        f"agreement with the expert mask: fast {(fast_fundus_fov(big) == expert_big).mean():.4f}, "
        f"baseline {(fundus_fov_mask(big) == expert_big).mean():.4f}"
    )


if __name__ == "__main__":
    main()

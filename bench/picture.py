"""bench/picture.py: draws the picture that README's grid of T and T' views is made from
(bench/figures/picture.png), procedurally, so that the project may redistribute it.

    python bench/picture.py bench/figures/picture.png
    python augment.py bench/figures/picture.png --out bench/figures/views.png
"""
import sys

import torch
import torchvision


def picture(size=128):
    """A sky, a sun, a hill and a checkerboard house: colours to jitter, edges to blur, bright
    and dark regions to solarise -> uint8 (3, size, size)."""
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    image = torch.stack([0.35 + 0.3 * y, 0.6 + 0.25 * y, 0.95 - 0.1 * y])       # sky gradient
    sun = (x - 0.75) ** 2 + (y - 0.22) ** 2 < 0.012
    hill = y > 0.68 + 0.08 * torch.sin(7 * x)
    house = (x > 0.15) & (x < 0.45) & (y > 0.45) & (y < 0.8)
    roof = (y > 0.3) & (y <= 0.45) & ((x - 0.3).abs() < (y - 0.3))
    squares = ((x * 24).floor() + (y * 24).floor()) % 2 == 0
    for mask, rgb in ((sun, (1.0, 0.85, 0.1)), (hill, (0.2, 0.55, 0.15)),
                      (house & squares, (0.9, 0.9, 0.85)), (house & ~squares, (0.6, 0.15, 0.1)),
                      (roof, (0.35, 0.2, 0.1))):
        image = torch.where(mask, torch.tensor(rgb).view(3, 1, 1), image)
    return (image * 255).round().to(torch.uint8)


if __name__ == '__main__':
    torchvision.io.write_png(picture(), sys.argv[1] if len(sys.argv) > 1 else 'picture.png')

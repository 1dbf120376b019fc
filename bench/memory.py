"""bench/memory.py: the memory a BYOL step's saved activations take per image, measured on the CPU
with torch's saved-tensor hooks (every tensor the backward keeps, counted once per storage): the
forward of both networks on both views at two batch sizes, so that what grows with the batch
(the activations) is told apart from what does not (the weights' half-precision copies).

    python bench/memory.py --arch resnet50 --image-size 224         # bf16 and float32

Measured (2026-12-04): ResNet-50 at 224 px, 83.5 MiB per image under bf16 autocast, 164.0 MiB in
float32 (byol.RESNET50_BYTES_PER_IMAGE; README.md, "Memory").
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import byol  # noqa: E402


def saved_bytes(arch, size, batch, amp):
    """Bytes of the tensors a training forward of byol.BYOL saves for its backward."""
    torch.manual_seed(0)
    encoder, dim = byol.build_encoder(arch, size <= 64)
    model = byol.BYOL(encoder, dim).to(memory_format=torch.channels_last)
    v1, v2 = (torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    seen, total = set(), [0]

    def keep(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        with byol.autocast(torch.device('cpu'), amp):
            model(v1, v2)
    return total[0]


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--arch', default='resnet50')
    p.add_argument('--image-size', type=int, default=224)
    args = p.parse_args()
    for amp in ('bf16', 'none'):
        small, large = (saved_bytes(args.arch, args.image_size, b, amp) for b in (2, 6))
        per_image = (large - small) / 4
        print(f'{args.arch} at {args.image_size} px, --amp {amp}: {per_image / 2 ** 20:.1f} MiB '
              f'of saved activations per image, {(small - 2 * per_image) / 2 ** 20:.0f} MiB '
              'besides', flush=True)


if __name__ == '__main__':
    main()

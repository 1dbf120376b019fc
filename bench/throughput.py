"""bench/throughput.py: speed of byol.py's training step and data pipeline, each speed feature on
and off, measured side by side in one run.

    python bench/throughput.py --arch resnet18 --image-size 32 --batch-size 32        # CPU
    python bench/throughput.py --arch resnet50 --image-size 224 --batch-size 8        # CPU
    python bench/throughput.py --arch resnet50 --image-size 224 --batch-size 256 --device cuda
    python bench/throughput.py --pipeline ../shared/data/cifar10 --image-size 32 --batch-size 128

Step variants (images/s counts each source image once, i.e. batch / step time):
  straightforward   per-image augmentation on the CPU, fp32, default memory format: what a direct
                    transcription of the paper does
  byol.py           byol.train_step with batched augmentation on the training device, the
                    precision byol.py picks (byol.default_amp), its memory format and device
                    settings (byol.configure_device): as byol.py runs
  byol.py - X       byol.py with one feature X switched back to the straightforward way
  byol.py + compile torch.compile of the BYOL module (--compile; opt-in)
Warm-up steps are excluded; each variant's time is the median over --repeats timings of --steps
steps. On GPUs the model FLOPs utilisation (MFU) is the step's FLOPs (counted by
torch.utils.flop_counter) per second over the GPU's measured dense bf16 matmul rate.
The pipeline part times what one loader worker spends per image (decode and crop, or only decode
when the GPU crops), and what feeds the step for each placement of augment.py's stages (loader
workers, dataset held in memory, cropping on the GPU), in images (view pairs) per second.
Prints a table and writes --json.
"""
import argparse
import json
import os
import statistics
import sys
import time
from multiprocessing.reduction import ForkingPickler  # (torch adds its tensors' reductions)
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import augment  # noqa: E402
import byol  # noqa: E402

# ------------------------------------------------------------------------------------------------
# The straightforward ways, for comparison
# ------------------------------------------------------------------------------------------------


def per_image_views(crops, u):
    """augment.two_views one image at a time, on the CPU (as a per-image torchvision pipeline)."""
    crops, u = crops.cpu(), u.cpu()
    views = [augment.two_views(crops[i:i + 1], u[i:i + 1]) for i in range(len(crops))]
    return torch.cat(views, dim=1)

# ------------------------------------------------------------------------------------------------
# The step
# ------------------------------------------------------------------------------------------------


class OneCallBYOL(byol.BYOL):
    """byol.BYOL with both views through each network in one call, for timing only: an upper
    bound on the speed of one call whose BN keeps per-view statistics (here the two views'
    statistics mix, as in lucidrains' byol-pytorch, which the official code does not)."""

    def forward(self, v1, v2, labels=None):
        online, target = self.online, self.target
        q1, q2 = online.predictor(online.projector(online.encoder(torch.cat([v1, v2])))).chunk(2)
        with torch.no_grad():
            t1, t2 = target.projector(target.encoder(torch.cat([v1, v2]))).chunk(2)
        loss = byol.symmetric_loss(q1, q2, t1, t2)
        return loss, loss.detach()


def make_step(args, device, batched_augment=True, amp=None, channels_last=None, compile=False,
              one_call=False):
    """A training step of byol.py (augmentation included, crops given) with the chosen ways."""
    torch.manual_seed(0)
    if amp is None:
        amp = byol.default_amp()
    byol.configure_device(device, amp)  # (cuDNN autotuning; TF32 only under autocast)
    memory_format = byol.fastest_memory_format(device, args.arch)  # as byol.py
    if channels_last is not None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
    encoder, dim = byol.build_encoder(args.arch, args.image_size <= 64, args.width)
    network = OneCallBYOL if one_call else byol.BYOL
    model = network(encoder, dim, args.hidden_dim, args.projection_dim).to(
        device, memory_format=memory_format)
    optimizer = byol.LARS(byol.lars_param_groups(model, 1.5e-6), lr=0.1)
    forward = torch.compile(model) if compile else model
    crops = torch.randint(0, 256, (args.batch_size, 2, 3, args.image_size, args.image_size),
                          dtype=torch.uint8, device=device)
    u = augment.uniforms(0, 0, torch.arange(args.batch_size))  # on the host, as the loader's

    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')

    def step():  # byol.py's own step: forward, backward, LARS, the target's moving average
        if batched_augment:
            v1, v2 = augment.two_views(crops, u)
        else:
            v1, v2 = per_image_views(crops, u)
        v1, v2 = (v.to(device).contiguous(memory_format=memory_format) for v in (v1, v2))
        return byol.train_step(forward, model, optimizer, scaler, v1, v2, None, 0.1, 0.996, amp)
    flops = None
    if device.type == 'cuda':
        flops = v1_v2_flops(model, crops, u, device, amp, memory_format)
    return step, flops


def v1_v2_flops(model, crops, u, device, amp, memory_format):
    """FLOPs of one forward + backward of the BYOL module (the step's arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode
    v1, v2 = (v.contiguous(memory_format=memory_format) for v in augment.two_views(crops, u))
    with FlopCounterMode(display=False) as counter:
        with byol.autocast(device, amp):
            loss, _ = model(v1, v2)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()


def time_step(step, device, warmup, steps, repeats):
    """Median seconds per step over `repeats` timings of `steps` steps, after `warmup` steps."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def matmul_rate(device, n=8192, repeats=20):
    """Measured dense bf16 matmul FLOP/s of the GPU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)

# ------------------------------------------------------------------------------------------------
# The data pipeline alone
# ------------------------------------------------------------------------------------------------


def pipeline_rates(args, device):
    """Views/s delivered by each placement of the pipeline's stages (augment.batches), over the
    image folder --pipeline: the loader's workers, the dataset held in memory (if it fits), and,
    on GPUs, cropping there (the workers only decode). Each rate is printed as it is measured."""
    images = augment.load_images(args.pipeline)
    placements = [dict(in_memory=False)]
    if augment.images_in_memory(images) is not None:
        placements.append(dict(in_memory=True))
    if device.type == 'cuda':
        placements.append(dict(in_memory=False, on_device='crop'))
    rates = {}
    for options in placements:
        loader, where = augment.batches(images, args.image_size, args.batch_size, 'byol',
                                        device=device, workers=args.workers, **options)
        loader.set_epoch(0)
        name = where.split(', ', 1)[1]
        if not options['in_memory']:
            name += f' ({args.workers} workers)'
        rates[name] = delivered(loader, device, args.pipeline_batches)
        print(f'  pipeline: {name:60s} {rates[name]:9.1f} img/s', flush=True)
    return rates


def decode_and_crop(args, device, rounds=5):
    """What one loader worker spends per image (one core) over the first 64 images of
    --pipeline, in a real worker process, sending included (the pickling that puts tensors in
    shared memory): decoding and cropping (the default on GPUs), or only decoding when the
    device crops (--on-device crop). Then, in this process, the parts apart: decode, the two
    crops, and side by side the crops by dense resampling matrices (the former method), and
    the crops of all 64 photos at once on the device. -> dict of ms per image (medians)."""
    images = augment.load_images(args.pipeline)
    n = min(64, len(images))
    keys = [(0, i) for i in range(n)]
    ms = {f'worker, {on_device} on the device': in_a_worker(
        augment.Pipeline(images, args.image_size, 'byol', on_device=on_device), keys, rounds) / n
        for on_device in ('views', 'crop')}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker
    files = images.read(range(n))
    u = augment.uniforms(0, 0, torch.arange(n))
    times = {'decode': [], 'crops': [], 'crops by dense matrices': [], 'crops on the device': []}
    for _ in range(rounds):
        start = time.perf_counter()
        decoded = [augment.decode(f) for f in files]
        times['decode'].append(time.perf_counter() - start)
        heights, widths = torch.tensor([image.shape[-2:] for image in decoded]).T
        boxes = torch.stack([augment.crop_boxes(u[:, v], heights, widths) for v in range(2)], 1)
        start = time.perf_counter()
        augment.crops_of(decoded, boxes, args.image_size)
        times['crops'].append(time.perf_counter() - start)
        start = time.perf_counter()
        for image, pair in zip(decoded, boxes):
            for top, left, h, w in pair.tolist():
                one = torch.tensor([0])
                rows = augment._bicubic_matrix(one + top, torch.tensor([h]), image.shape[1],
                                               args.image_size)[0]
                cols = augment._bicubic_matrix(one + left, torch.tensor([w]), image.shape[2],
                                               args.image_size)[0]
                (rows @ image.float() @ cols.T).round_().clamp_(0, 255).byte()
        times['crops by dense matrices'].append(time.perf_counter() - start)
        photos = augment.Photos.of(decoded).to(device)
        sync(device)
        torch.set_num_threads(threads)  # (the training process's threads, on a CPU)
        start = time.perf_counter()
        augment._crops_at_once(photos, boxes, args.image_size)  # (what crops_of does on GPUs)
        sync(device)
        times['crops on the device'].append(time.perf_counter() - start)
        torch.set_num_threads(1)
    torch.set_num_threads(threads)
    return ms | {k: 1000 * statistics.median(v) / n for k, v in times.items()}


class InAWorker(torch.utils.data.Dataset):
    """One item: the seconds, round by round, that a pipeline's loader stages take over these
    keys in the loader worker that makes the item, sending the batch included."""

    def __init__(self, pipeline, keys, rounds):
        self.pipeline, self.keys, self.rounds = pipeline, keys, rounds

    def __len__(self):
        return 1

    def __getitem__(self, _):
        torch.set_num_threads(1)  # as the DataLoader sets its workers
        seconds = []
        for _ in range(self.rounds):
            start = time.perf_counter()
            ForkingPickler.dumps(self.pipeline.__getitems__(self.keys))
            seconds.append(time.perf_counter() - start)
        return seconds


def in_a_worker(pipeline, keys, rounds):
    """Median ms that the pipeline's loader stages take over keys, in a loader worker."""
    loader = torch.utils.data.DataLoader(InAWorker(pipeline, keys, rounds), batch_size=None,
                                         num_workers=1)
    return 1000 * statistics.median(next(iter(loader)))


def delivered(loader, device, n):
    """Views/s over n batches, once the loader runs steadily: the batches its workers make
    ahead while they start (workers x prefetch) are taken first, untimed, so that the rate is
    the loader's, not the hand-off of batches made before the clock started."""
    ahead = 1 + loader.loader.num_workers * (loader.loader.prefetch_factor or 0)
    n = min(n, len(loader) - ahead)  # one epoch at most
    if n < 1:
        raise SystemExit(f'throughput.py: {len(loader)} batches in the folder, {ahead} of them '
                         'made ahead: give --pipeline a folder of more images')
    iterator = iter(loader)
    for _ in range(ahead):
        next(iterator)
    sync(device)
    count, start = 0, time.perf_counter()
    for _ in range(n):
        views, _, _ = next(iterator)
        count += views.shape[1]
    sync(device)
    return count / (time.perf_counter() - start)

# ------------------------------------------------------------------------------------------------


def cpu_features():
    """The CPU features that decide bf16's speed: AMX tiles, AVX-512 BF16; and the core count."""
    has = [name for name, check in (('AMX', torch.cpu._is_amx_tile_supported),
                                    ('AVX-512 BF16', torch.cpu._is_avx512_bf16_supported))
           if check()]
    return (f'{os.cpu_count()} CPU cores, {torch.backends.cpu.get_cpu_capability()}, '
            + (' and '.join(has) if has else 'no AMX, no AVX-512 BF16'))


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', default='resnet18')
    p.add_argument('--width', type=int, default=None)
    p.add_argument('--image-size', type=int, default=32)
    p.add_argument('--batch-size', type=int, default=32, help='per device')
    p.add_argument('--hidden-dim', type=int, default=4096)
    p.add_argument('--projection-dim', type=int, default=256)
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--compile', action='store_true', help='also time torch.compile')
    p.add_argument('--no-ablations', action='store_true', help='only the two ends')
    p.add_argument('--one-call', action='store_true', help='also time both views through each '
                   'network in one call (an upper bound: BN statistics mixed)')
    p.add_argument('--no-baseline', action='store_true', help='not the straightforward step '
                   '(its per-image augmentation takes long at 224 px)')
    p.add_argument('--pipeline', default=None, help='an image folder: also time the pipeline')
    p.add_argument('--pipeline-batches', type=int, default=20)
    p.add_argument('--workers', type=int, default=augment.default_workers())
    p.add_argument('--json', default='bench/throughput.json')
    args = p.parse_args()
    device = torch.device(args.device)
    cuda = device.type == 'cuda'

    variants = {'straightforward': dict(batched_augment=False, amp='none', channels_last=False),
                'byol.py': {}}
    if not args.no_ablations:
        variants['byol.py - batched augmentation'] = dict(batched_augment=False)
        default, other = byol.default_amp(), {'bf16': 'none', 'none': 'bf16'}[byol.default_amp()]
        variants[f'byol.py, {other} instead of {default}'] = dict(amp=other)
        variants['byol.py - channels_last'] = dict(channels_last=False)
    if args.compile:
        variants['byol.py + compile'] = dict(compile=True)
    if args.one_call:
        variants['byol.py, both views in one call (bound)'] = dict(one_call=True)
    if args.no_baseline:
        del variants['straightforward']

    hardware = torch.cuda.get_device_name(device) if cuda else cpu_features()
    print(f'{args.arch} at {args.image_size} px, batch {args.batch_size}, {device} ({hardware}), '
          f'torch {torch.__version__}', flush=True)
    results = dict(arch=args.arch, image_size=args.image_size, batch_size=args.batch_size,
                   device=str(device), hardware=hardware, torch=torch.__version__, steps={})
    peak = matmul_rate(device) if cuda else None
    for name, options in variants.items():
        step, flops = make_step(args, device, **options)
        seconds = time_step(step, device, args.warmup, args.steps, args.repeats)
        row = dict(seconds_per_step=seconds, images_per_s=args.batch_size / seconds)
        if flops and peak:
            row.update(flops_per_step=flops, mfu=flops / seconds / peak)
        results['steps'][name] = row
        print(f'  {name:34s} {row["images_per_s"]:9.1f} img/s  {seconds * 1000:9.1f} ms/step'
              + (f'  MFU {row["mfu"]:.1%}' if 'mfu' in row else ''), flush=True)
        del step
    if not args.no_baseline:
        base, ours = (results['steps'][k]['images_per_s'] for k in ('straightforward', 'byol.py'))
        results['speedup'] = ours / base
        print(f'  byol.py / straightforward: {ours / base:.2f}x')
    if peak:
        results['bf16_matmul_tflops'] = peak / 1e12
        print(f'  measured bf16 matmul rate: {peak / 1e12:.0f} TFLOP/s')
    if args.pipeline:
        ms = results['decode_and_crop_ms'] = decode_and_crop(args, device)
        worker = ms['worker, views on the device']
        print(f'  decode and crop: {1000 / worker:.0f} img/s per worker ({worker:.2f} ms per '
              f'image in a loader worker, sending included; apart: {ms["decode"]:.2f} ms decode '
              f'+ {ms["crops"]:.2f} ms two crops; the crops by dense matrices: '
              f'{ms["crops by dense matrices"]:.2f} ms, '
              f'{ms["crops by dense matrices"] / ms["crops"]:.1f}x)', flush=True)
        worker = ms['worker, crop on the device']
        print(f'  decode, crops on the device (--on-device crop): {1000 / worker:.0f} img/s per '
              f'worker ({worker:.2f} ms per image in a loader worker, sending included; the two '
              f'crops at once on {device}: {ms["crops on the device"]:.2f} ms per image)',
              flush=True)
        results['pipeline'] = pipeline_rates(args, device)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()

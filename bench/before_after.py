"""bench/before_after.py: an earlier checkout and this one side by side in one process, alternating
round by round, so that a machine whose speed drifts compares them fairly: the training step
(the quick start's convnet w=16 at batch 128, and ResNet-18 at batch 32; 32 px, float32,
augmentation included), LARS's step with the target's moving average alone, and the pipeline
on the CIFAR-10 folder (batch 128: the loader's work done in-process, and the dataset held in
memory). Prints each round's rates, then the medians and the median of the per-round ratios
(bench/RESULTS.md).

    git worktree add /tmp/before COMMIT
    python bench/before_after.py /tmp/before ../shared/data/cifar10 [--rounds 7] [--threads 1]

Both checkouts must have augment.batches and augment.Pipeline (the code since the GPU-feeding
work of 2026-11).
"""
import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch


def load(alias, path, deps=None):
    """A module from a file under another name; deps: modules its imports must find."""
    saved = {k: sys.modules.get(k) for k in (deps or {})}
    sys.modules.update(deps or {})
    spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v
    return module


def step_fn(B, A, arch, batch, width=None, hidden=4096, projection=256):
    """One training step of checkout (B = its byol, A = its augment): views made from uint8
    crops by the pipeline's views stage, forward, backward, LARS, EMA."""
    torch.manual_seed(0)
    encoder, dim = B.build_encoder(arch, True, width)
    model = B.BYOL(encoder, dim, hidden, projection)
    # (byol.fastest_memory_format's rule on a CPU, written out: older checkouts lack it)
    memory_format = torch.channels_last if arch == 'convnet' else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = B.LARS(B.lars_param_groups(model, 1.5e-6), lr=0.1)
    crops = torch.randint(0, 256, (batch, 2, 3, 32, 32), dtype=torch.uint8)
    u = A.uniforms(0, 0, torch.arange(batch))
    pipeline = A.Pipeline(None, 32, 'byol')

    def step():
        v1, v2 = (v.contiguous(memory_format=memory_format)
                  for v in pipeline.views(crops, u, None, None))
        loss, _ = model(v1, v2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.update_target(0.996)
    return step


def optimizer_fn(B, arch, width=None):
    """LARS's step and the target's moving average alone, on fixed random gradients."""
    torch.manual_seed(0)
    encoder, dim = B.build_encoder(arch, True, width)
    model = B.BYOL(encoder, dim, 512, 128)
    for p in model.online.parameters():
        p.grad = torch.randn_like(p)
    optimizer = B.LARS(B.lars_param_groups(model, 1.5e-6), lr=0.1)

    def step():
        optimizer.step()
        model.update_target(0.99)
    return step


def rate_steps(step, batch, n=3):
    step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return batch * n / (time.perf_counter() - start)


def rate_loader(loader, batch, n, epoch):
    loader.set_epoch(epoch)
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(n):
        next(batches)
    return batch * n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('before', type=Path, help='the earlier checkout')
    p.add_argument('cifar', help='the CIFAR-10 image folder')
    p.add_argument('--rounds', type=int, default=7)
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s)')
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    here = Path(__file__).resolve().parent.parent
    modules = {}
    for version, root in (('before', args.before), ('now', here)):
        a = load(f'{version}_augment', root / 'augment.py')
        modules[version] = (load(f'{version}_byol', root / 'byol.py', {'augment': a}), a)

    measures = {version: measures_of(B, A, args.cifar) for version, (B, A) in modules.items()}
    names = list(measures['now'])
    results = {(name, version): [] for name in names for version in modules}
    for r in range(args.rounds):
        for name in names:
            for version in modules:
                unit, measure = measures[version][name]
                results[name, version].append(measure(r))
        print(r, {f'{n} {v}': round(rates[-1], 1) for (n, v), rates in results.items()},
              flush=True)
    for name in names:
        unit = measures['now'][name][0]
        before, now = results[name, 'before'], results[name, 'now']
        ratios = [n / b for n, b in zip(now, before)]
        print(f'{name}: before median {statistics.median(before):.1f}, now median '
              f'{statistics.median(now):.1f} {unit}; now/before per round: median '
              f'{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})')


def measures_of(B, A, cifar):
    """One checkout's measures: name -> (unit, rate of round r)."""
    convnet = step_fn(B, A, 'convnet', 128, 16, 512, 128)
    resnet18 = step_fn(B, A, 'resnet18', 32)
    lars_convnet = optimizer_fn(B, 'convnet', 16)
    lars_resnet18 = optimizer_fn(B, 'resnet18')
    images = A.load_images(cifar)
    loader, _ = A.batches(images, 32, 128, 'byol', workers=0, in_memory=False)
    memory, _ = A.batches(images, 32, 128, 'byol', workers=0, in_memory=True)
    return {
        'step convnet': ('img/s', lambda r: rate_steps(convnet, 128)),
        'step resnet18': ('img/s', lambda r: rate_steps(resnet18, 32)),
        'LARS + EMA convnet': ('steps/s', lambda r: rate_steps(lars_convnet, 1, 20)),
        'LARS + EMA resnet18': ('steps/s', lambda r: rate_steps(lars_resnet18, 1, 5)),
        'loader': ('img/s', lambda r: rate_loader(loader, 128, 10, r)),
        'memory': ('img/s', lambda r: rate_loader(memory, 128, 10, r)),
    }


if __name__ == '__main__':
    main()

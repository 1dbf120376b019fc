"""bench/before_after.py: the code before the redesign (commit 97ef36a: byol.py's Crops,
DeviceCrops, foreach LARS/EMA) and this checkout side by side in one process, alternating round
by round, so that a machine whose speed drifts compares them fairly: the training step
(ResNet-18, 32 px, batch 32, float32) and the pipeline on the CIFAR-10 folder (batch 32: the
loader's work done in-process, and the dataset held in memory). Prints each round's rates, then
the medians and the median of the per-round ratios (bench/RESULTS.md).

    git worktree add /tmp/before 97ef36a
    python bench/before_after.py /tmp/before ../shared/data/cifar10
"""
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


BEFORE, CIFAR = Path(sys.argv[1]), sys.argv[2]
HERE = Path(__file__).resolve().parent.parent
old_aug = load('old_augment', BEFORE / 'augment.py')
old_byol = load('old_byol', BEFORE / 'byol.py', {'augment': old_aug})
new_aug = load('new_augment', HERE / 'augment.py')
new_byol = load('new_byol', HERE / 'byol.py', {'augment': new_aug})
cpu = torch.device('cpu')


def step_fn(B, two_views, new):
    """One training step of module B's BYOL (ResNet-18, small stem), views made by two_views."""
    torch.manual_seed(0)
    enc, dim = B.build_encoder('resnet18', True)
    model = B.BYOL(enc, dim)
    opt = B.LARS(B.lars_param_groups(model, 1.5e-6), lr=0.1)
    crops = torch.randint(0, 256, (32, 2, 3, 32, 32), dtype=torch.uint8)
    u = (new_aug if new else old_aug).uniforms(0, 0, torch.arange(32))

    def step():
        v1, v2 = two_views(crops, u)
        out = model(v1, v2)
        loss = out[0] if new else out  # the new forward returns (loss, monitor)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        model.update_target(0.996)
    return step


def rate_steps(step, n=3):
    step()
    start = time.perf_counter()
    for _ in range(n):
        step()
    return 32 * n / (time.perf_counter() - start)


def rate_loader(loader, n, set_epoch, augment_after=None):
    set_epoch()
    batches = iter(loader)
    next(batches)
    start = time.perf_counter()
    for _ in range(n):
        batch = next(batches)
        if augment_after:
            augment_after(batch)
    return 32 * n / (time.perf_counter() - start)


old_step = step_fn(old_byol, old_byol.two_views, False)
new_step = step_fn(new_byol, lambda crops, u: new_aug.Pipeline(None, 32, 'byol').views(
    crops, u, None, None), True)
old_images, new_images = old_byol.load_images(CIFAR), new_aug.load_images(CIFAR)
old_loader = old_byol.make_loader(old_byol.Crops(old_images, 32), 32, 0, True, 0, cpu,
                                  transform=old_byol.views_in_loader)
new_loader, _ = new_aug.batches(new_images, 32, 32, 'byol', workers=0, in_memory=False)
old_memory = old_byol.DeviceCrops(old_byol.images_in_memory(old_images), 32, 32, 0, cpu)
new_memory, _ = new_aug.batches(new_images, 32, 32, 'byol', workers=0, in_memory=True)

results = {f'{what} {version}': [] for what in ('step', 'loader', 'memory')
           for version in ('old', 'new')}
for r in range(7):
    results['step old'].append(rate_steps(old_step))
    results['step new'].append(rate_steps(new_step))
    results['loader old'].append(rate_loader(old_loader, 30,
                                             lambda: old_loader.sampler.set_epoch(r)))
    results['loader new'].append(rate_loader(new_loader, 30, lambda: new_loader.set_epoch(r)))
    results['memory old'].append(rate_loader(old_memory, 30,
                                             lambda: old_memory.sampler.set_epoch(r),
                                             lambda b: old_byol.two_views(*b)))
    results['memory new'].append(rate_loader(new_memory, 30, lambda: new_memory.set_epoch(r)))
    print(r, {k: round(v[-1], 1) for k, v in results.items()}, flush=True)
for what in ('step', 'loader', 'memory'):
    ratios = [n / o for n, o in zip(results[f'{what} new'], results[f'{what} old'])]
    print(f'{what}: old median {statistics.median(results[what + " old"]):.1f}, new median '
          f'{statistics.median(results[what + " new"]):.1f} img/s; new/old per round: median '
          f'{statistics.median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})')

"""bench/jitter_ops.py: augment_batch (the photometric half of T and T') of an earlier augment.py
and of this checkout side by side in one process: the aten ops each runs per batch, the bytes
they touch, and the time per batch on this machine, the two alternating round by round so that
a machine whose speed drifts compares them fairly (bench/RESULTS.md).

    git show 8939874:augment.py > /tmp/augment_before.py     # every op on every image
    OMP_NUM_THREADS=1 taskset -c 0 python bench/jitter_ops.py /tmp/augment_before.py

Bytes touched: each op reads its inputs and writes its output once (a GPU's memory traffic
without fusion): broadcast inputs count once, gathers and scatters the rows they move, views
nothing.
"""
import importlib.util
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import augment  # noqa: E402

ROWS_MOVED = {'index_select', 'index', 'index_copy', 'index_copy_'}  # gathers, scatters


def module_from(path, alias):
    spec = importlib.util.spec_from_file_location(alias, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def distinct_bytes(t):
    """The bytes a tensor addresses: broadcast (stride 0) dimensions count once."""
    return t.element_size() * torch.Size([n for n, s in zip(t.shape, t.stride()) if s]).numel()


class Count(TorchDispatchMode):
    """Counts the aten ops that run on the meta device, as a GPU's kernels would (views aside;
    the host's ops are not counted), and the bytes they touch."""

    def __init__(self):
        super().__init__()
        self.ops, self.bytes = Counter(), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(t)]
        name = func.overloadpacket.__name__
        if func.is_view or not any(t.device.type == 'meta' for t in outs):
            return out
        self.ops[name] += 1
        if name in ROWS_MOVED:  # the rows read and written (index_copy: args[3], the source)
            self.bytes += 2 * distinct_bytes(args[3] if name.startswith('index_copy') else out)
        else:
            tensors = [*args, *(kwargs or {}).values(), *outs]
            self.bytes += sum(distinct_bytes(t) for t in tensors if torch.is_tensor(t))
        return out


def counted(module, crops, u, view):
    """{function: (ops, bytes)} for augment_batch and the colour jitter within it, on meta crops
    of this shape; u as the module's pipeline gives it: on the host now, on the device before."""
    crops = torch.empty_like(crops, device='meta')
    x = crops.float()
    u = u if module is augment else u.to('meta')
    counts = {}
    for name, run in (('augment_batch', lambda: module.augment_batch(crops, u, view)),
                      ('color_jitter', lambda: module.color_jitter(x, u, view))):
        run()  # (constants made on first use)
        with Count() as count:
            run()
        counts[name] = sum(count.ops.values()), count.bytes
    return counts


def ms_per_batch(module, crops, u, view, n=3):
    start = time.perf_counter()
    for _ in range(n):
        module.augment_batch(crops, u, view)
    return 1000 * (time.perf_counter() - start) / n


def main(before_path, rounds=7):
    versions = {'before': module_from(before_path, 'augment_before'), 'now': augment}
    print(f'{torch.get_num_threads()} thread(s), {torch.backends.cpu.get_cpu_capability()}')
    for size, batch in ((224, 32), (32, 256)):
        g = torch.Generator().manual_seed(0)
        crops = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        u = augment.uniforms(0, 0, torch.arange(batch))
        for v, (name, view) in enumerate((('T', augment.T), ("T'", augment.T_PRIME))):
            for version, module in versions.items():
                print(f'{size} px, batch {batch}, {name}, {version}: ' + '; '.join(
                    f'{function} {ops} ops, {touched / 2 ** 30:.2f} GiB touched '
                    f'({touched / batch / 2 ** 20:.1f} MiB per image)'
                    for function, (ops, touched) in counted(module, crops, u[:, v], view).items()))
            times = {version: [] for version in versions}
            for _ in range(rounds):
                for version, module in versions.items():
                    times[version].append(ms_per_batch(module, crops, u[:, v], view))
            ratios = [b / a for a, b in zip(times['before'], times['now'])]
            print(f'{size} px, batch {batch}, {name}: ms per batch, median of {rounds} rounds: '
                  + ', '.join(f'{version} {statistics.median(t):.1f} '
                              f'({min(t):.1f}-{max(t):.1f})' for version, t in times.items())
                  + f'; now/before per round: median {statistics.median(ratios):.2f} '
                  f'({min(ratios):.2f}-{max(ratios):.2f})', flush=True)


if __name__ == '__main__':
    main(sys.argv[1])

"""bench/vs_lucidrains.py: this project's BYOL against lucidrains' byol-pytorch at equal budget.

Equal budget: the same steps x batch over the same images, the same encoder (byol.py's convnet,
built by byol.build_encoder with the same seed), the same probe (linear_eval.py --cached on the
exported encoder). Three rows per seed:
  random init  the encoder before training (linear_eval.py without --pretrained);
  byol.py      `python byol.py ...` with the recipe it resolves (plus --ours-flags);
  lucidrains   byol_pytorch.BYOL with its README recipe: Adam lr 3e-4, its default augmentations
               (one set of random parameters per batch), its default heads (hidden 4096,
               projection 256) and its EMA (decay 0.99, constant).
byol-pytorch is needed only here (`pip install byol-pytorch`); nothing else in the project
imports it. Results: bench/RESULTS.md ("byol.py vs lucidrains byol-pytorch"). Measured on the
CIFAR-10 folder, convnet w=16, 3 epochs of batch 128 (byol.py: 6 CPU-minutes), seeds 0 / 1 / 2,
linear top-1: random init 42.2 +- 0.5%, byol.py 48.2 +- 0.5%, lucidrains 45.9 +- 0.5%.

    python bench/vs_lucidrains.py --data ../shared/data/cifar10 --seeds 0 1 2 --epochs 3 --jobs 2
    python bench/vs_lucidrains.py --data fashionmnist --data-root DIR ...   # DIR/FashionMNIST/raw
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import augment  # noqa: E402
import byol  # noqa: E402


def probe(args, out, pretrained=None, seed=0):
    """linear_eval.py --cached on `pretrained` (None: the random init of `seed`): (top-1, kNN)."""
    command = [sys.executable, str(ROOT / 'linear_eval.py'), '--data', args.data, '--data-root',
               args.data_root, '--cached',
               '--workers', '0', '--train-images', str(args.train_images), '--output-dir', out]
    command += ['--pretrained', pretrained] if pretrained else [
        '--arch', 'convnet', '--width', str(args.width), '--seed', str(seed)]
    run(command, out)
    result = json.loads((Path(out) / 'results.jsonl').read_text().splitlines()[-1])
    return result.get('top1'), result.get('knn_top1')


def run(command, out):
    Path(out).mkdir(parents=True, exist_ok=True)
    print('$', ' '.join(command), flush=True)
    with open(Path(out) / 'output.txt', 'a') as f:
        subprocess.run(command, check=True, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS='1'))


def cpu_seconds():
    """CPU time of this process and its finished children (user + system): a fair clock on a
    shared core, where wall time depends on the neighbours."""
    return sum(getattr(resource.getrusage(who), f) for who in (
        resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN) for f in ('ru_utime', 'ru_stime'))


def train_ours(args, seed, out):
    run([sys.executable, str(ROOT / 'byol.py'), '--data', args.data, '--data-root', args.data_root,
         '--arch', 'convnet',
         '--width', str(args.width), '--batch-size', str(args.batch_size), '--epochs',
         str(args.epochs), '--workers', '0', '--seed', str(seed), '--output-dir', out]
        + args.ours_flags.split(), out)
    return str(Path(out) / 'encoder.pth')


def train_lucidrains(args, seed, out, data):
    from byol_pytorch.byol_pytorch import BYOL  # installed for this comparison only
    Path(out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    encoder, _ = byol.build_encoder('convnet', small_images=True, width=args.width)
    learner = BYOL(encoder, image_size=data.shape[-1], hidden_layer=-1)  # its README, our f
    optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4)
    steps_per_epoch = len(data) // args.batch_size  # byol.py's count: whole epochs, drop last
    start = time.time()
    for epoch in range(args.epochs):
        order = torch.randperm(len(data))
        for i in range(steps_per_epoch):
            images = data[order[i * args.batch_size:(i + 1) * args.batch_size]].float() / 255
            loss = learner(images)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            learner.update_moving_average()
            if i % 50 == 0:
                print(f'  lucidrains ep {epoch} step {i}/{steps_per_epoch} loss {loss:.4f} '
                      f'{time.time() - start:.0f}s', flush=True)
    byol.export_encoder(encoder, dict(arch='convnet', width=args.width, small_images=True,
                                      image_size=data.shape[-1]), Path(out))
    return str(Path(out) / 'encoder.pth')


def one_row(args, name, seed):
    """Train one run (random init: none) and probe it, in a process of its own with one thread
    -> its row (a dict)."""
    torch.set_num_threads(1)
    out = f'{args.output_dir}/{name}_s{seed}'
    data = augment.images_in_memory(augment.load_images(args.data, args.data_root)) \
        if name == 'lucidrains' else None
    start, cpu = time.time(), cpu_seconds()  # the training only
    encoder = (train_lucidrains(args, seed, out, data) if name == 'lucidrains' else
               train_ours(args, seed, out) if name == 'byol.py' else None)
    minutes, cpu_minutes = (time.time() - start) / 60, (cpu_seconds() - cpu) / 60
    top1, knn = probe(args, out, encoder, seed)
    row = dict(name=name, seed=seed, top1=top1, knn=knn, train_minutes=round(minutes, 2),
               train_cpu_minutes=round(cpu_minutes, 2))
    print(json.dumps(row), flush=True)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=str(ROOT.parent / 'shared/data/cifar10'))
    p.add_argument('--data-root', default='data', help='where a named --data (fashionmnist) is')
    p.add_argument('--width', type=int, default=16)
    p.add_argument('--batch-size', type=int, default=128)
    p.add_argument('--epochs', type=int, default=1)
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--train-images', type=int, default=10000, help='probe training images')
    p.add_argument('--ours-flags', default='', help='extra byol.py flags, e.g. "--lr 4.0"')
    p.add_argument('--only', nargs='+', default=['byol.py', 'lucidrains', 'random'])
    p.add_argument('--jobs', type=int, default=1, help='runs at once, one thread each')
    p.add_argument('--output-dir', default='runs/vs_lucidrains')
    args = p.parse_args()
    if 'lucidrains' in args.only:
        try:
            import byol_pytorch  # noqa: F401
        except ImportError:
            sys.exit('vs_lucidrains.py: byol-pytorch is not installed; `pip install byol-pytorch` '
                     '(for this comparison only), or leave it out with --only random byol.py')
    runs = [(name, seed) for seed in args.seeds for name in args.only]
    with concurrent.futures.ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context('spawn')) as pool:
        found = list(pool.map(one_row, [args] * len(runs), *zip(*runs)))
    rows = {name: [r for r in found if r['name'] == name] for name in args.only}
    print(f'\n{args.epochs} epoch(s) of batch {args.batch_size}, convnet w={args.width}, '
          f'{args.data}, seeds {args.seeds}, byol.py flags: {args.ours_flags or "(none)"}')
    print('| run | train CPU-min per seed | linear top-1 per seed | mean +- std | kNN mean |')
    print('|---|---|---|---|---|')
    for name, values in rows.items():
        top1 = [v['top1'] for v in values]
        spread = statistics.stdev(top1) if len(top1) > 1 else 0.0
        print(f'| {name} | ' + ' / '.join(f'{v["train_cpu_minutes"]:.1f}' for v in values)
              + ' | ' + ' / '.join(f'{t:.2f}' for t in top1)
              + f' | {statistics.mean(top1):.1f} +- {spread:.1f} | '
              f'{statistics.mean(v["knn"] or 0 for v in values):.1f} |')


if __name__ == '__main__':
    main()

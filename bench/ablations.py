"""bench/ablations.py: the paper's ablations of the target network (section 3's motivation, Table 5)
at CPU scale, with the project's own scripts: pretraining (byol.py) then the cached linear probe
and kNN (linear_eval.py), for every row and seed, and a markdown table of the results.

Rows: the encoder at random init (no training); a fixed random target (tau = 1); no moving
average (tau = 0 at every step, --constant-tau: the target is the online network under
stop-gradient), and tau_base = 0 under byol.py's cosine schedule, which takes tau to 1 by the end;
tau_base 0.9, 0.99 (the README's quick start) and 0.996; no predictor (tau_base 0.99).
Everything else is the quick start's:
the CIFAR-10 image folder, convnet of width 16, batch 128, lr 4.0, warmup 0.1 epochs, hidden 512,
projection 128, float32; the probe on 10,000 training images, the lr chosen on 5,000 others, top-1
on the 10,000 validation images. Each seed s seeds the pretraining and the probe's split; the
random-init row is the encoder that seed's runs start from.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/ablations.py            # 1 core: ~80 minutes
    python bench/ablations.py --epochs 2 --seeds 0 1 --out runs/ablations_2ep

Runs already done in --out (a results.jsonl per run) are not repeated; a rerun prints the table.
Measured: README.md, "The paper's ablations at CPU scale".
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent  # the repository
QUICK_START = ['--arch', 'convnet', '--width', '16', '--batch-size', '128', '--lr', '4.0',
               '--warmup-epochs', '0.1', '--hidden-dim', '512', '--projection-dim', '128',
               '--workers', '0', '--amp', 'none']
PROBE = ['--train-images', '10000', '--workers', '0', '--amp', 'none']
# name: (its folder in --out, byol.py flags or None for no training, the paper's ImageNet linear
# top-1: ResNet-50, 300 epochs, ../shared/SPEC.md section 7, from Table 5a, 5b and section 3).
# tau is the base of the cosine schedule to 1, except with --constant-tau.
ROWS = {
    'random init (no training)': ('randominit', None, '1.4'),
    'tau = 1 (fixed random target)': ('tau_1', ['--tau', '1'], '18.8 ± 0.7'),
    'tau = 0 constant (stop-gradient of online)': (
        'tau_0_constant', ['--tau', '0', '--constant-tau'], '0.3'),
    'tau = 0, cosine to 1': ('tau_0', ['--tau', '0'], ''),
    'tau = 0.9': ('tau_0.9', ['--tau', '0.9'], '68.4'),
    'tau = 0.99 (quick start)': ('tau_0.99', ['--tau', '0.99'], '72.5'),
    'tau = 0.996': ('tau_0.996', ['--tau', '0.996'], ''),
    'no predictor (tau = 0.99)': ('nopredictor', ['--tau', '0.99', '--no-predictor'], '0.2'),
}


def run(command, log, threads):
    """command with its output in `log` -> seconds; stops the table on a failure."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    started = time.time()
    with open(log, 'w') as f:
        code = subprocess.call([sys.executable, *map(str, command)], stdout=f,
                               stderr=subprocess.STDOUT, env=env, cwd=HERE)
    if code:
        sys.exit(f'ablations.py: {" ".join(map(str, command[:1]))} failed; see {log}')
    return time.time() - started


def one(name, seed, args):
    """Pretrain (unless the row has no flags) and probe one row and seed -> its results."""
    folder, flags = folder_of(name, seed, args), ROWS[name][1]
    folder.mkdir(parents=True, exist_ok=True)
    results = folder / 'results.jsonl'
    if results.exists():
        return json.loads(results.read_text().splitlines()[-1])
    train_s = 0.0
    if flags is None:
        encoder = ['--arch', 'convnet', '--width', '16']
    else:
        print(f'{name}, seed {seed}: pretraining', flush=True)
        train_s = run(['byol.py', '--data', args.data, *QUICK_START, *flags, '--epochs',
                       args.epochs, '--seed', seed, '--output-dir', folder], folder / 'train.log',
                      args.threads)
        encoder = ['--pretrained', folder / 'checkpoint.pth']
    print(f'{name}, seed {seed}: linear probe', flush=True)
    probe_s = run(['linear_eval.py', '--data', args.data, *PROBE, *encoder, '--seed', seed,
                   '--output-dir', folder / 'probe'], folder / 'probe.log', args.threads)
    record = json.loads((folder / 'probe' / 'results.jsonl').read_text().splitlines()[-1])
    record.update(train_s=round(train_s), probe_s=round(probe_s))
    results.write_text(json.dumps(record) + '\n')
    return record


def folder_of(name, seed, args):
    return args.out / ROWS[name][0] / f'seed{seed}'


def final_z_std(folder):
    """The collapse signal of the last progress line of a run's output, x sqrt(128) (the
    quick start's projection dimension): ~0.8 spread, -> 0 collapsed; None without training."""
    log = folder / 'train.log'
    lines = [line for line in log.read_text().splitlines() if line.startswith('step ')] \
        if log.exists() else []
    return float(lines[-1].split('z_std ')[1].split()[0]) * 128 ** 0.5 if lines else None


def mean_spread(values):
    """'mean ± std' over seeds (sample std), and the values."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.1f} ± {spread:.1f}', ' / '.join(f'{v:.1f}' for v in values)


def minutes(seconds):
    """'3.0-3.4 min' over the seeds' runs ('-' for none)."""
    low, high = min(seconds) / 60, max(seconds) / 60
    return '-' if not high else f'{low:.1f} min' if f'{low:.1f}' == f'{high:.1f}' else \
        f'{low:.1f}-{high:.1f} min'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--data', default=str(HERE.parent / 'shared' / 'data' / 'cifar10'),
                   help='the CIFAR-10 image folder (default: ../shared/data/cifar10)')
    p.add_argument('--epochs', type=int, default=1, help='pretraining epochs (default: 1)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--threads', type=int, default=1, help='OMP_NUM_THREADS of every run')
    keys = {row[0]: name for name, row in ROWS.items()}
    p.add_argument('--rows', nargs='+', choices=list(keys), default=list(keys), metavar='ROW',
                   help='the rows to run, by folder name (default: all): ' + ', '.join(keys))
    p.add_argument('--out', type=Path, default=Path('runs/ablations'))
    args = p.parse_args(argv)
    args.out = args.out.absolute()
    table = {keys[k]: [one(keys[k], s, args) for s in args.seeds] for k in args.rows}

    print(f'\n{args.epochs} epoch(s) of CIFAR-10 (convnet w=16, batch 128), seeds '
          f'{" / ".join(map(str, args.seeds))}; {args.threads} thread(s)\n')
    print('| run | paper, ImageNet top-1 | linear probe top-1 (%) | per seed | gain over random '
          'init, same seed | kNN top-1 (%) | collapse signal at the end | time: pretraining / '
          'probe |')
    print('|---|---|---|---|---|---|---|---|')
    random_init = table.get('random init (no training)')
    for name, records in table.items():
        top1, per_seed = mean_spread([r['top1'] for r in records])
        gain = mean_spread([r['top1'] - r0['top1'] for r, r0 in zip(records, random_init)])[0] \
            if random_init and records is not random_init else '-'
        knn, _ = mean_spread([r['knn_top1'] for r in records])
        z = ' / '.join(f'{z:.2f}' for s in args.seeds
                       if (z := final_z_std(folder_of(name, s, args))) is not None)
        train, probe = (minutes([r[k] for r in records]) for k in ('train_s', 'probe_s'))
        print(f'| {name} | {ROWS[name][2] or "-"} | **{top1}** | {per_seed} | {gain} | {knn} | '
              f'{z or "-"} | {train} / {probe} |')


if __name__ == '__main__':
    main()

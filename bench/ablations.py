"""bench/ablations.py: the paper's ablations at CPU scale, with the project's own scripts: byol.py
pretrains, linear_eval.py probes (cached linear probe and kNN), for every row and seed; then
markdown tables, and a plot of the probe against the epochs or the batch size (matplotlib, if
installed).

One command per question (README.md, "The paper's ablations at CPU scale"):

    python bench/ablations.py target --jobs 2      # does the moving average beat a fixed target?
    python bench/ablations.py predictor --jobs 2   # without a predictor, does y collapse too?
    python bench/ablations.py batch --jobs 2       # does BYOL hold up at small batches?

  target     tau = 1 (a fixed random target), tau_base 0.99 (the quick start's moving average,
             cosine to 1) and tau = 0 at every step (--constant-tau: the target is the online
             network under stop-gradient), over one 20-epoch schedule, probed after epochs 1, 2,
             5, 10 and 20 (the runs stop there and resume, bit for bit the same run), against
             the encoder at random init (paper section 3 and Table 5a).
  predictor  tau_base 0.99 with and without the predictor (Table 5b), the same schedule and
             probes, with two collapse signals of the representation y and of the projection
             z: their spread and their effective rank (collapse_signals).
  batch      batch 64, 128, 256 and 512 at equal epochs (5), the base lr kept so that the peak
             lr follows the paper's rule, lr x batch / 256 (Table 16).

Everything else is the quick start's: the CIFAR-10 image folder, convnet of width 16, the
short-run recipe (lr 4.0, warmup a tenth of the run, g and q of 512 and 128), float32; the probe
on 10,000 training images, the lr chosen on 5,000 others, top-1 on the 10,000 validation images.
Seed s seeds the pretraining and the probe's split; the random-init row is the encoder that
seed's runs start from. --jobs N runs N runs at once, one thread each.

Runs are kept in --out (default runs/ablations): a question asked again reuses every run and
probe already there (so `predictor` reuses the tau 0.99 runs of `target`), and a stopped command
continues where it stopped. The commands print the CPU-minutes of every run in their tables,
reused or not, from the runs' own clocks.
"""
import argparse
import concurrent.futures
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent.parent  # the repository
sys.path.insert(0, str(HERE))
import augment  # noqa: E402
import byol  # noqa: E402
import linear_eval  # noqa: E402

QUICK_START = ['--arch', 'convnet', '--width', '16', '--workers', '0', '--amp', 'none']
PROBE = ['--train-images', '10000', '--workers', '0', '--amp', 'none', '--cached']
COLLAPSE_IMAGES = 2000  # validation images for the collapse signals


class Row(NamedTuple):
    folder: str            # its folder in --out
    flags: Optional[list]  # byol.py's flags; None: the encoder at random init, not trained
    paper: str             # the paper's ImageNet linear top-1 for it: ResNet-50, 300 epochs
                           # (../shared/SPEC.md section 7)


ROWS = {
    'random init': Row('random_init', None, '1.4'),
    'tau = 1 (fixed random target)': Row('tau_1', ['--tau', '1'], '18.8 ± 0.7'),
    'tau_base = 0.99 (the quick start)': Row('tau_0.99', ['--tau', '0.99'], '72.5'),
    'tau = 0 constant (stop-gradient of online)': Row(
        'tau_0_constant', ['--tau', '0', '--constant-tau'], '0.3'),
    'no predictor (tau_base = 0.99)': Row(
        'no_predictor', ['--tau', '0.99', '--no-predictor'], '0.2'),
    'batch 64': Row('batch_64', ['--tau', '0.99', '--batch-size', '64'], '59.7'),
    'batch 128': Row('batch_128', ['--tau', '0.99', '--batch-size', '128'], '69.6'),
    'batch 256': Row('batch_256', ['--tau', '0.99', '--batch-size', '256'], '71.8'),
    'batch 512': Row('batch_512', ['--tau', '0.99', '--batch-size', '512'], '72.2'),
}
# question: (rows, epochs of the schedule, the epochs after which the encoder is probed)
QUESTIONS = {
    'target': (['random init', 'tau = 1 (fixed random target)',
                'tau_base = 0.99 (the quick start)',
                'tau = 0 constant (stop-gradient of online)'], 20, (1, 2, 5, 10, 20)),
    'predictor': (['random init', 'tau_base = 0.99 (the quick start)',
                   'no predictor (tau_base = 0.99)'], 20, (1, 2, 5, 10, 20)),
    'batch': (['random init', 'batch 64', 'batch 128', 'batch 256', 'batch 512'], 5, (5,)),
}
BATCH = 128  # the quick start's, where a row does not say


def run(command, log):
    """A script of the repository with one thread, its output appended to `log`."""
    with open(log, 'a') as f:
        code = subprocess.call([sys.executable, *map(str, command)], stdout=f,
                               stderr=subprocess.STDOUT, cwd=HERE,
                               env=dict(os.environ, OMP_NUM_THREADS='1'))
    if code:
        raise RuntimeError(f'{command[0]} failed (exit {code}); see {log}')


def pretrain_and_probe(row, seed, epochs, probes, args):
    """One row and seed: pretraining over `epochs`, stopping after each epoch of `probes` to
    probe the encoder there (resuming continues the same run), or, for the random init, one
    probe -> {epoch: results}. Whatever is already in its folder is reused."""
    flags = ROWS[row].flags
    folder = args.out / ROWS[row].folder / f'{epochs}ep' / f'seed{seed}'
    if flags is None:
        folder = args.out / ROWS[row].folder / f'seed{seed}'
    folder.mkdir(parents=True, exist_ok=True)
    results = {}
    for epoch in probes:
        done = folder / f'probe_ep{epoch}.json'
        if done.exists():
            results[epoch] = json.loads(done.read_text())
            continue
        if flags is None:
            encoder = ['--arch', 'convnet', '--width', '16']
        else:
            kept = folder / f'checkpoint_ep{epoch}.pth'
            steps = epoch * (args.images // batch_size(row))
            if not kept.exists() and saved_step(folder / 'checkpoint.pth') != steps:
                print(f'{row}, seed {seed}: pretraining to epoch {epoch} of {epochs}', flush=True)
                stop = []
                if epoch < epochs:
                    stop = ['--stop-at-step', steps]
                run(['byol.py', '--data', args.data, *QUICK_START, *flags,
                     '--batch-size', batch_size(row), '--epochs', epochs, '--seed', seed,
                     *stop, '--output-dir', folder], folder / 'train.log')
            if not kept.exists():
                shutil.copyfile(folder / 'checkpoint.pth', kept)
            encoder = ['--pretrained', kept]
        print(f'{row}, seed {seed}: probe after epoch {epoch}', flush=True)
        probe = folder / f'probe_ep{epoch}'
        run(['linear_eval.py', '--data', args.data, *PROBE, *encoder, '--seed', seed,
             '--output-dir', probe], folder / 'probe.log')
        record = json.loads((probe / 'results.jsonl').read_text().splitlines()[-1])
        if flags is not None:
            record['collapse'] = collapse_signals(folder / f'checkpoint_ep{epoch}.pth', args.data)
        done.write_text(json.dumps(record) + '\n')
        results[epoch] = record
    return results


def saved_step(checkpoint):
    """The step a byol.py checkpoint was saved at, or None."""
    if not checkpoint.exists():
        return None
    return byol.load_file(checkpoint)['step']


def batch_size(row):
    flags = ROWS[row].flags or []
    if '--batch-size' in flags:
        return int(flags[flags.index('--batch-size') + 1])
    return BATCH


@torch.no_grad()
def collapse_signals(checkpoint, data):
    """The collapse signals of the online representation y = f(x) and projection z = g(y) on
    COLLAPSE_IMAGES validation images (centre crops, BN in eval mode), two for each:
    - 'y', 'z': the std over the images of the l2-normalised vectors, averaged over the
      dimensions, x sqrt(d): about 1 when they spread over the sphere, 0 when every image maps
      to the same direction (byol.py logs it for z as z_std, unscaled);
    - 'y_rank', 'z_rank': their effective rank (Roy and Vetterli 2007): exp of the entropy of
      the centred normalised vectors' squared singular values, as a distribution. It counts the
      directions the images spread along: 1 when they vary along a line only, which the std
      above does not see (a line through the sphere has a large std)."""
    torch.set_num_threads(1)
    encoder, dim, settings = linear_eval.load_encoder(checkpoint)
    state = byol.load_file(checkpoint)
    config = state['config']
    projector = byol.mlp(dim, config['hidden_dim'], config['projection_dim'])
    projector.load_state_dict({k[len('projector.'):]: v for k, v in state['online'].items()
                               if k.startswith('projector.')})
    images = augment.load_images(data, split='val')
    every = max(1, len(images) // COLLAPSE_IMAGES)  # (every class: the folder is by class)
    subset = augment.Subset(images, range(0, len(images), every)[:COLLAPSE_IMAGES])
    y, _ = linear_eval.features(encoder, subset, settings['image_size'], 250, 0,
                                torch.device('cpu'))
    z = projector.eval()(y)
    signals = {}
    for name, t in (('y', y), ('z', z)):
        t = F.normalize(t, dim=1)
        signals[name] = (t.std(dim=0).mean() * t.shape[1] ** 0.5).item()
        signals[name + '_rank'] = effective_rank(t)
    return signals


def effective_rank(vectors):
    """exp(entropy of p), p the squared singular values of the centred rows, summed to 1."""
    energy = torch.linalg.svdvals(vectors - vectors.mean(dim=0)) ** 2
    p = energy / energy.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).item()

# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def mean_spread(values):
    """'mean ± std' over seeds (sample std)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f'{statistics.mean(values):.1f} ± {spread:.1f}'


def per_seed(values, digits=1):
    return ' / '.join(f'{v:.{digits}f}' for v in values)


def tables(question, schedule, results, args):
    """The question's markdown tables: the probe after each epoch; the gain over the random
    init, seed by seed; the collapse signals; the cost in CPU-minutes."""
    rows, epochs, probes = schedule
    baseline = [r[1] for r in results['random init']]  # (every random-init run has one probe)
    trained = [row for row in rows if ROWS[row].flags is not None]
    print(f'\n{question}: CIFAR-10 folder, convnet w=16, a {epochs}-epoch schedule, seeds '
          f'{per_seed(args.seeds, 0)}; linear probe top-1 (%), mean ± std over the seeds\n')
    print('| run | paper, ImageNet top-1 | ' + ' | '.join(f'after epoch {e}' for e in probes)
          + ' | per seed, at the end |')
    print('|---|---|' + '---|' * len(probes) + '---|')
    top1 = [b['top1'] for b in baseline]
    print(f'| random init | {ROWS["random init"].paper} | '
          + ' | '.join(mean_spread(top1) for _ in probes) + f' | {per_seed(top1)} |')
    for row in trained:
        cells = [mean_spread([r[e]['top1'] for r in results[row]]) for e in probes]
        end = per_seed([r[probes[-1]]['top1'] for r in results[row]])
        print(f'| {row} | {ROWS[row].paper} | ' + ' | '.join(cells) + f' | {end} |')

    print('\nGain over the random init of the same seed (points), and kNN top-1 (%) at the end\n')
    print('| run | ' + ' | '.join(f'gain after epoch {e}' for e in probes) + ' | kNN at the end |')
    print('|---|' + '---|' * len(probes) + '---|')
    for row in trained:
        gains = [mean_spread([r[e]['top1'] - b['top1'] for r, b in zip(results[row], baseline)])
                 for e in probes]
        knn = mean_spread([r[probes[-1]]['knn_top1'] for r in results[row]])
        print(f'| {row} | ' + ' | '.join(gains) + f' | {knn} |')

    signal_table('Collapse signals (about 1: spread; 0: collapsed)', ('y', 'z'), 2,
                 trained, probes, results)
    signal_table('Effective rank of y and z (the directions the images spread along, of 128 '
                 'each)', ('y_rank', 'z_rank'), 1, trained, probes, results)

    # The cost, from the runs' own clocks (one thread each: wall time ~ CPU time): byol.py's
    # log.jsonl times each epoch from its segment's start; linear_eval.py's results its own.
    pretraining = sum(pretraining_seconds(args.out / ROWS[row].folder / f'{epochs}ep' /
                                          f'seed{seed}')
                      for row in trained for seed in args.seeds)
    probes_s = sum(r['time_s'] for row in rows for runs in results[row] for r in runs.values())
    print(f'\nCost: {pretraining / 60:.0f} CPU-minutes of pretraining and {probes_s / 60:.0f} of '
          'probes (one thread each)')


def signal_table(title, keys, digits, rows, probes, results):
    """A table of collapse_signals' `keys` (y's, z's), per seed, after each epoch."""
    print(f'\n{title}, per seed, after each epoch\n')
    print('| run | ' + ' | '.join(f'after epoch {e}' for e in probes) + ' |')
    print('|---|' + '---|' * len(probes))
    for row in rows:
        cells = []
        for e in probes:
            signals = [r[e]['collapse'] for r in results[row]]
            cells.append(f'y {per_seed([s[keys[0]] for s in signals], digits)}; '
                         f'z {per_seed([s[keys[1]] for s in signals], digits)}')
        print(f'| {row} | ' + ' | '.join(cells) + ' |')


def pretraining_seconds(folder):
    """A run's pretraining time, from its log.jsonl: the last time of each segment (a resumed
    segment's clock starts again)."""
    times = [json.loads(line)['time'] for line in (folder / 'log.jsonl').read_text().splitlines()]
    ends = [t for t, later in zip(times, times[1:] + [0]) if later < t]
    return sum(ends)


def plot(question, schedule, results, out):
    """The probe's top-1 (mean over the seeds, the seeds' range shaded) against the epochs, a
    line per row, or, where the rows differ in batch size (batch), at the end against the batch
    size; the random init as a dashed line. Needs matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print('(no plot: pip install matplotlib)')
        return
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows, epochs, probes = schedule
    trained = [row for row in rows if ROWS[row].flags is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    baseline = statistics.mean(r[1]['top1'] for r in results['random init'])
    ax.axhline(baseline, color='gray', linestyle='--', label='random init')
    if len({batch_size(row) for row in trained}) == 1:
        for i, row in enumerate(trained):
            values = [[r[e]['top1'] for r in results[row]] for e in probes]
            ax.plot(probes, [statistics.mean(v) for v in values], 'o-', color=f'C{i}',
                    label=row)
            ax.fill_between(probes, [min(v) for v in values], [max(v) for v in values],
                            color=f'C{i}', alpha=0.2)
        ticks, label = probes, 'epoch'
    else:
        ticks = [batch_size(row) for row in trained]
        values = [[r[probes[-1]]['top1'] for r in results[row]] for row in trained]
        ax.plot(ticks, [statistics.mean(v) for v in values], 'o-', color='C0',
                label=f'BYOL after {probes[-1]} epochs, lr x batch / 256')
        ax.fill_between(ticks, [min(v) for v in values], [max(v) for v in values],
                        color='C0', alpha=0.2)
        label = 'batch size'
    ax.set_xscale('log')
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel(label)
    ax.set_ylabel('linear probe top-1 (%)')
    ax.set_title(f'{question}: CIFAR-10, convnet w=16, {epochs}-epoch schedule', fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    print(f'plot: {out}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('question', choices=list(QUESTIONS))
    p.add_argument('--data', default=str(HERE.parent / 'shared' / 'data' / 'cifar10'),
                   help='the CIFAR-10 image folder (default: ../shared/data/cifar10)')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    p.add_argument('--jobs', type=int, default=1, help='runs at once, one thread each')
    p.add_argument('--out', type=Path, default=Path('runs/ablations'))
    p.add_argument('--plot', default=None, help='the PNG (default: '
                   'bench/figures/ablation_<question>.png)')
    p.add_argument('--schedule', type=int, nargs='+', metavar='EPOCHS', help='a quick check of '
                   'the command itself: the schedule\'s epochs, then the epochs to probe after')
    args = p.parse_args(argv)
    args.out = args.out.absolute()
    args.images = len(augment.load_images(args.data))
    rows, epochs, probes = QUESTIONS[args.question]
    if args.schedule:
        epochs, probes = args.schedule[0], tuple(args.schedule[1:]) or (args.schedule[0],)
    started = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = {}
        for seed in args.seeds:
            for row in rows:
                row_probes = probes
                if ROWS[row].flags is None:
                    row_probes = (1,)  # (the random init: one probe)
                futures[row, seed] = pool.submit(pretrain_and_probe, row, seed, epochs,
                                                 row_probes, args)
        done, _ = concurrent.futures.wait(futures.values(),
                                          return_when=concurrent.futures.FIRST_EXCEPTION)
        failed = [f.exception() for f in done if f.exception()]
        if failed:  # the runs still queued are dropped; those running finish their command
            pool.shutdown(cancel_futures=True)
            sys.exit(f'ablations.py: {failed[0]}')
        results = {row: [futures[row, seed].result() for seed in args.seeds] for row in rows}
    tables(args.question, (rows, epochs, probes), results, args)
    print(f'{(time.time() - started) / 60:.0f} minutes of wall time')
    plot(args.question, (rows, epochs, probes), results,
         args.plot or HERE / 'bench' / 'figures' / f'ablation_{args.question}.png')


if __name__ == '__main__':
    main()

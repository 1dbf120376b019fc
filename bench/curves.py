"""bench/curves.py: training curves of byol.py runs, side by side, as one PNG: the BYOL loss, the
learning rate, tau, the collapse signal (the std of the normalised projections over the batch,
x sqrt(d): ~1 spread over the sphere, 0 collapsed) and the monitor's top-1 (the official online
classifier: on the training batches, and on the validation split where --eval-every logged it),
against the global step, one line per run.

    python bench/curves.py runs/cifar/log.jsonl --out curves.png
    python byol.py ... | tee runs/cifar/train.log      # a point every --log-every steps
    python bench/curves.py runs/cifar/train.log runs/other/train.log --out curves.png

A run is byol.py's log.jsonl (one point per epoch) or its printed output (the progress lines,
one point every --log-every steps); lines of neither kind are skipped. Runs are named by the parts
of their paths that differ. Needs matplotlib (pip install matplotlib), used here only.
"""
import argparse
import json
import sys
from pathlib import Path

# (key, panel title): byol.py's log.jsonl keys; the progress lines are read into the same keys
PANELS = (('loss', 'BYOL loss'), ('lr', 'learning rate'), ('tau', 'tau (target EMA rate)'),
          ('z_std', 'projection std x sqrt(d) (0: collapse)'), ('top1', 'monitor top-1 (%)'))
PROGRESS_KEYS = {'loss': 'loss', 'lr': 'lr', 'tau': 'tau', 'z_std': 'z_std',
                 'top-1': 'train_top1'}


def read_run(path, projection_dim):
    """One run's records [{'step': ..., 'loss': ..., ...}] from a log.jsonl or byol.py's output
    (whose 'config:' line gives d), with z_std x sqrt(d); a step logged twice (a resumed run)
    keeps its last record."""
    records = {}
    for line in Path(path).read_text(errors='replace').splitlines():
        if line.startswith('config: {'):
            projection_dim = json.loads(line[len('config: '):]).get('projection_dim',
                                                                    projection_dim)
            continue
        if line.startswith('{'):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
        elif line.startswith('step '):  # step 20/390 | ep 0 | loss 3.09 | lr 0.97 | ...
            fields = [f.split(' ', 1) for f in line.split(' | ')]
            record = {'step': int(fields[0][1].split('/')[0])}
            record.update((PROGRESS_KEYS[k], float(v.rstrip('%'))) for k, v in fields[1:]
                          if k in PROGRESS_KEYS)
        else:
            continue
        if 'step' in record:
            records[record['step']] = record
    records = [records[step] for step in sorted(records)]
    for record in records:
        if 'z_std' in record:
            record['z_std'] *= projection_dim ** 0.5
    return records


def run_names(paths):
    """The parts of the paths that differ: runs/a/seed0/train.log, runs/b/seed0/train.log ->
    a, b (one path: its folder's name)."""
    parts = [Path(p).absolute().parts for p in paths]
    if len(parts) == 1:
        return [parts[0][-2]]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    return ['/'.join(p[head:len(p) - tail]) for p in parts]


def fail(message):
    print(f'curves.py: error: {message}', file=sys.stderr)
    sys.exit(2)


def plot(runs, out):
    try:
        import matplotlib
    except ImportError:
        fail('matplotlib is needed for the plot: pip install matplotlib')
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for i, (name, records) in enumerate(runs.items()):
        color = f'C{i % 10}'
        for ax, (key, title) in zip(axes, PANELS):
            for k, style in ((('train_top1', '-'), ('val_top1', 'o--')) if key == 'top1'
                             else ((key, '-'),)):
                points = [(r['step'], r[k]) for r in records if k in r]
                if points:
                    label = name + (' (validation)' if k == 'val_top1' else '')
                    ax.plot(*zip(*points), style, color=color, label=label, markersize=4)
            ax.set_title(title, fontsize=10)
            if key == 'z_std':
                ax.set_ylim(bottom=0)  # collapse is a fall towards 0
            ax.set_xlabel('step')
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=min(len(labels), 7), fontsize=9,
               frameon=False)
    fig.tight_layout(rect=(0, 0.1 if len(labels) <= 7 else 0.16, 1, 1))
    fig.savefig(out, dpi=80)


def main(argv=None):
    p = argparse.ArgumentParser(description='Training curves of byol.py runs, side by side.')
    p.add_argument('logs', nargs='+', help='log.jsonl files or byol.py output, one per run')
    p.add_argument('--out', default='curves.png', help='the PNG (default: curves.png)')
    p.add_argument('--projection-dim', type=int, default=256, help='d of the collapse signal '
                   'for runs whose output does not say it (log.jsonl): their --projection-dim '
                   '(default: 256, byol.py\'s; the quick start: 128)')
    args = p.parse_args(argv)
    runs = {}
    for path, name in zip(args.logs, run_names(args.logs)):
        if not Path(path).is_file():
            fail(f'{path}: no such file')
        runs[name] = read_run(path, args.projection_dim)
        if not runs[name]:
            fail(f'{path} holds neither log.jsonl records nor byol.py progress lines')
    plot(runs, args.out)
    print(f'{args.out}: {len(runs)} run(s), {", ".join(runs)}')


if __name__ == '__main__':
    main()

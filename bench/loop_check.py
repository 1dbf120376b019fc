"""bench/loop_check.py: byol.py's real training loop for a few dozen steps, three times, side by
side: with the BN of a one-process run and with the synchronised BN (GlobalBatchNorm, which
every multi-process run uses; forced here in one process, where its all-reduces are skipped, so
that its own cost shows: on a GPU torch's fused kernels, checked first against F.batch_norm),
then the latter with the crops made on the device (--on-device crop: the loader workers only
decode). For each: the step rate after warm-up, the memory high-water mark, and on a GPU the
host synchronisations per step (torch.cuda.set_sync_debug_mode('warn'); the loop means to wait
for the device once every SYNC_EVERY steps and at the end of an epoch, nowhere else), with the
lines of code that caused them. Only the steps are timed and counted: give --stop-at-step
within the first epoch, so that no epoch's end (a checkpoint, the loader's restart) falls in
the window, and the checkpoint written at the stop is left out.

    python bench/loop_check.py FOLDER --arch resnet50 --batch-size 512 --epochs 8 \
        --stop-at-step 30 [byol.py flags]
Prints one summary block; --json FILE also writes it.
"""
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import byol  # noqa: E402

WARMUP = 10  # steps left out of the rates and the synchronisation count


def run(folder, flags, synced_bn):
    """byol.main on the folder -> dict of measurements."""
    steps, times, syncs = [], [], Counter()
    last = int(flags[flags.index('--stop-at-step') + 1])
    tau = byol.target_tau

    def counting_tau(step, total, base):  # called once a step, as the step begins
        steps.append(step)
        times.append(time.perf_counter())
        return tau(step, total, base)

    def record(message, category, filename, lineno, file=None, line=None):
        # steps WARMUP + 1 .. last - 1: not the last one's, whose stop writes the checkpoint
        if 'synchroniz' in str(message) and WARMUP < len(steps) < last:
            syncs[f'{Path(filename).name}:{lineno}'] += 1

    model = byol.BYOL
    byol.target_tau = counting_tau
    cuda = torch.cuda.is_available()
    if synced_bn:
        byol.BYOL = lambda *a, **k: byol.synchronize_batchnorm(model(*a, **k))
        if cuda:  # (a multi-process run checks it so at its start)
            byol.check_global_batch_norm(torch.device('cuda'))
            print('the synchronised BN on the GPU equals F.batch_norm: checked', flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode('warn')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('always')
            warnings.showwarning = record
            with tempfile.TemporaryDirectory() as out:
                byol.main(['--data', folder, *flags, '--output-dir', out])
    finally:
        byol.target_tau, byol.BYOL = tau, model
        if cuda:
            torch.cuda.set_sync_debug_mode('default')
    rate = (len(steps) - 1 - WARMUP) / (times[-1] - times[WARMUP])  # (between steps' starts)
    syncs_per_step = None
    if cuda:
        syncs_per_step = sum(syncs.values()) / (last - 1 - WARMUP)
    result = dict(steps=len(steps), steps_per_s=rate, host_syncs_per_step=syncs_per_step,
                  sync_sites=dict(syncs.most_common(8)))
    if cuda:
        result['peak_memory_gb'] = torch.cuda.max_memory_allocated() / 2 ** 30
    return result


def main():
    folder, flags = sys.argv[1], sys.argv[2:]
    out_json = None
    if '--json' in flags:
        i = flags.index('--json')
        out_json, flags = flags[i + 1], flags[:i] + flags[i + 2:]
    results = {}
    if '--stop-at-step' not in flags:
        raise SystemExit('loop_check.py: give --stop-at-step (within the first epoch)')
    for name, synced, more in (('BN of one process', False, []), ('GlobalBatchNorm', True, []),
                               ('GlobalBatchNorm, crops on the device', True,
                                ['--on-device', 'crop'])):
        results[name] = run(folder, flags + more, synced)
        print(f'{name}: {results[name]}', flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'
    print(f'\nloop check on {device}, flags: {" ".join(flags)}')
    for name, r in results.items():
        line = f'  {name:40s} {r["steps_per_s"]:.3f} steps/s over {r["steps"] - WARMUP - 1} steps'
        if 'peak_memory_gb' in r:
            line += f', peak memory {r["peak_memory_gb"]:.1f} GB'
        if r['host_syncs_per_step'] is not None:
            line += f', host syncs per step {r["host_syncs_per_step"]:.2f} at {r["sync_sites"]}'
        print(line)
    ratio = results['GlobalBatchNorm']['steps_per_s'] / results['BN of one process']['steps_per_s']
    print(f'  GlobalBatchNorm / BN of one process: {ratio:.2f}x the step rate '
          f'(expected host syncs: 1 every {byol.SYNC_EVERY} steps)')
    ratio = results['GlobalBatchNorm, crops on the device']['steps_per_s'] / \
        results['GlobalBatchNorm']['steps_per_s']
    print(f'  crops on the device (--on-device crop) / by the loader: {ratio:.2f}x the step rate')
    if out_json:
        Path(out_json).write_text(json.dumps(results, indent=1))


if __name__ == '__main__':
    main()

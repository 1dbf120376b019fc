"""semi_sup.py: BYOL's semi-supervised protocol, fine-tuning on 1% or 10% of the labels (paper
section 4.1 "Semi-supervised training", Table 2; appendix C.1; SPEC.md section 5).

The pretrained encoder and a new linear classifier are fine-tuned together (every parameter
trains, BN in training mode) on a labelled subset of the training images: SGD with Nesterov
momentum 0.9, batch 1024, no weight decay, cosine lr, random resized crop + flip as in linear
evaluation. Every setting of the lr x epochs grid {0.005, 0.01, 0.02, 0.05, 0.1} x {30, 50}
trains on the whole labelled subset; the one chosen on a local validation split (training images
outside the subset, as the paper) is reported on the validation split (top-1, top-5). Without
--pretrained the same protocol trains from random initialisation: the paper's "Supervised"
baseline. The grid's lrs are used as given, at any batch. The official evaluation code
multiplies its lr by batch / 256; if the paper's grid was before that scaling (SPEC.md calls
this unconfirmed), its lrs at batch 1024 were 4x these: --lr 0.02 0.04 0.08 0.2 0.4.

Labelled subsets (--subset)
    1percent, 10percent  the official ImageNet lists (12,811 and 128,116 file names, e.g.
                         n04235860_14959.JPEG), the same as SimCLR's and the paper's. Get them from
                         https://github.com/google-research/simclr/tree/master/imagenet_subsets
                         into --subset-dir (default: imagenet_subsets/ beside this script).
    FILE                 any such list: one file name (or <class>/<file>) per line.
    FRACTION             e.g. 0.1: a seeded class-balanced subset of any dataset, written to
                         <output-dir>/subset_<FRACTION>_seed<SEED>.txt (reusable as FILE).

Commands
    python semi_sup.py --data /work/shared/data/cifar10 --pretrained runs/byol/checkpoint.pth \
        --subset 0.1 --lr 0.02 0.05 --epochs 10 --workers 1                    # CPU, small grid
    python semi_sup.py --data /imagenet --pretrained runs/r50/encoder.pth --subset 1percent
    torchrun --nproc_per_node=8 semi_sup.py --data /imagenet --pretrained runs/r50/encoder.pth \
        --subset 10percent                                                     # paper protocol
  Omit --pretrained (give --arch) for the supervised baseline. Results are appended to
  <output-dir>/results.jsonl. The grid's progress is saved after every setting: the same
  command, run again, continues with the next setting.

Measured (CIFAR-10 JPEG folder, 2 CPU cores; all 10,000 validation images; BYOL encoder:
test_byol.py's convnet of width 16 after 5 epochs; random init: the same architecture and seed):
    10% labels (5,000), lr 0.1 x 4 epochs (test_byol.py):  random init 42.44%, BYOL 46.06%
  Earlier, with the setting chosen on 10% of the labelled images and trained on the other 90%,
  and PyTorch's default initialisation (lr grid 0.05 0.1 0.2):
    10% labels (4,500 + 500 held out), epochs 4 or 30: random init 63.24%, BYOL 63.40% (2.6 min)
    1% labels (450 + 50 held out), epochs 30 or 50:   random init 42.72%, BYOL 44.25% (0.8 min)
  With a few epochs of fine-tuning, or few labels, the pretrained encoder leads; with 30 epochs
  on 4,500 labels, supervised training catches up with an encoder of minutes. The paper's
  regime (a 1000-epoch ResNet-50 far above its supervised 10% baseline) needs a GPU.
"""
import copy
import hashlib
import json
import time
from pathlib import Path

import torch

import augment
import byol
import linear_eval
from byol import UserError, log

LR_GRID = (0.005, 0.01, 0.02, 0.05, 0.1)  # paper appendix C.1
EPOCHS_GRID = (30, 50)                     # paper appendix C.1
PAPER_BATCH = 1024                         # paper appendix C.1
MIN_STEPS_PER_EPOCH = 10                   # below this, the default batch is halved...
MIN_BATCH = 32                             # ...down to this (smaller batches make BN noisy)
NAMED_SUBSETS = ('1percent', '10percent')


def get_parser():
    p = byol.ArgumentParser(prog='semi_sup.py', description='Fine-tuning on a labelled subset '
                            '(BYOL paper, section 4.1 and appendix C.1).')
    a = p.add_argument
    byol.add_data_arguments(p)
    a('--subset', required=True, help='the labelled images: 1percent or 10percent (the official '
      'ImageNet lists), a FILE of file names, or a FRACTION in (0, 1] (class-balanced, seeded)')
    a('--subset-dir', default=str(Path(__file__).resolve().parent / 'imagenet_subsets'),
      help='where 1percent.txt and 10percent.txt are (default: imagenet_subsets/ beside this '
      'script)')
    linear_eval.add_encoder_arguments(p)  # omitted --pretrained: the supervised baseline
    a('--batch-size', type=byol.positive_int, help=f'global batch (paper: {PAPER_BATCH}; by '
      f'default halved, with a warning, until an epoch has {MIN_STEPS_PER_EPOCH} steps)')
    a('--lr', type=byol.nonnegative_float, nargs='+', default=LR_GRID, help='lr grid (paper: '
      + ' '.join(map(str, LR_GRID)) + ')')
    a('--epochs', type=byol.positive_int, nargs='+', default=EPOCHS_GRID, help='epochs grid '
      '(paper: ' + ' '.join(map(str, EPOCHS_GRID)) + ')')
    a('--holdout', type=byol.nonnegative_int, default=None, help='training images outside the '
      'subset that choose lr and epochs (default: 10,009 for ImageNet, as the paper, else 10%% '
      'of the training images; 0 for a single setting)')
    a('--val-images', type=byol.nonnegative_int, default=0, help='report on this many '
      'validation images (a seeded random subset, for quick runs; 0: all)')
    a('--seed', type=int, default=0, help='seeds the subset, the held-out split, the order, the '
      'augmentations and the new classifier (default: 0)')
    a('--output-dir', default='runs/semi_sup', help='results.jsonl is appended here (default: '
      'runs/semi_sup)')
    return p

# ------------------------------------------------------------------------------------------------
# Labelled subsets: the official ImageNet lists, other lists, seeded class-balanced fractions
# ------------------------------------------------------------------------------------------------


def image_keys(images):
    """Per training image, the name a subset file gives it: '<class>/<file>' for a folder (a line
    may also give the bare file name, as the ImageNet lists do), the index for a named dataset."""
    if not hasattr(images, 'samples'):
        return [str(i) for i in range(len(images))]
    return [f'{Path(path).parent.name}/{Path(path).name}' for path, _ in images.samples]


def read_subset_file(path, images):
    """The sorted indices of the images a subset file lists, one name per line (blank lines and
    '#' comments ignored). Every listed name must match exactly one training image."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f'cannot read subset file {path} ({e})') from None
    names = [line.strip() for line in lines if line.strip() and not line.startswith('#')]
    if not names:
        raise UserError(f'subset file {path} lists no images')
    keys = image_keys(images)
    by_key = {key: i for i, key in enumerate(keys)}
    by_file = {}  # bare file name -> every image of that name (CIFAR folders repeat names)
    for i, key in enumerate(keys):
        by_file.setdefault(key.rsplit('/', 1)[-1], []).append(i)
    indices, missing = [], []
    for name in names:
        found = [by_key[name]] if name in by_key else by_file.get(name, [])
        if len(found) > 1:
            raise UserError(f'{path}: {name} names {len(found)} images (in '
                            f'{", ".join(keys[i].split("/")[0] for i in found[:3])}, ...); '
                            'write it as <class>/<file>')
        if found:
            indices.append(found[0])
        else:
            missing.append(name)
    if missing:
        more = ''
        if len(missing) > 1:
            more = f' ({len(missing) - 1} more listed files are missing too)'
        raise UserError(f'{path} lists {missing[0]}, which is not among the training images of '
                        f'the --data folder{more}')
    seen = set()
    for i in indices:  # (a name may repeat, or one image appear as file and as <class>/<file>)
        if i in seen:
            raise UserError(f'{path} lists {keys[i]} more than once')
        seen.add(i)
    return sorted(indices)


def balanced_subset(labels, n_classes, fraction, seed):
    """round(fraction x N) images, the same number from every class (the first classes take one
    more when it does not divide; a class smaller than its share gives all it has), each class's
    drawn by a seeded permutation. A function of (labels, fraction, seed) only, so every process
    of a torchrun job, and every rerun, draws the same images."""
    total = round(fraction * len(labels))
    per_class, extra = divmod(total, n_classes)
    members = [[] for _ in range(n_classes)]
    for i, label in enumerate(labels):
        members[label].append(i)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for c, images in enumerate(members):
        order = torch.randperm(len(images), generator=generator).tolist()
        chosen += [images[j] for j in order[:per_class + (c < extra)]]
    return sorted(chosen)


def labelled_subset(args, images):
    """--subset -> (sorted indices of the labelled training images, the list file they are in)."""
    if args.subset in NAMED_SUBSETS:
        path = Path(args.subset_dir) / f'{args.subset}.txt'
        if not path.is_file():
            raise UserError(f'{path} not found: get {args.subset}.txt from https://github.com/'
                            'google-research/simclr/tree/master/imagenet_subsets into '
                            '--subset-dir')
        return read_subset_file(path, images), path
    try:
        fraction = float(args.subset)
    except ValueError:
        if not Path(args.subset).is_file():
            raise UserError(f'--subset {args.subset}: not {" or ".join(NAMED_SUBSETS)}, a '
                            'fraction in (0, 1] or an existing file') from None
        return read_subset_file(args.subset, images), Path(args.subset)
    if not 0 < fraction <= 1:
        raise UserError(f'--subset {args.subset}: a fraction must be in (0, 1]')
    indices = balanced_subset(images.labels, len(images.classes), fraction, args.seed)
    if not indices:
        raise UserError(f'--subset {args.subset} of {len(images)} images selects none')
    # Saved so that the run can be repeated, or compared with, on exactly these images.
    path = Path(args.output_dir) / f'subset_{args.subset}_seed{args.seed}.txt'
    if byol.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = image_keys(images)
        path.write_text(''.join(keys[i] + '\n' for i in indices))
    return indices, path

def local_validation(labelled, n_images, holdout, seed):
    """`holdout` training images outside the labelled subset (seeded; sorted indices): the local
    validation split on which the grid's setting is chosen."""
    outside = sorted(set(range(n_images)) - set(labelled))
    return [outside[i] for i in augment.random_indices(len(outside), holdout, seed)]

# ------------------------------------------------------------------------------------------------
# The network: encoder f and a new linear classifier, all of it trained
# ------------------------------------------------------------------------------------------------


def default_batch_size(n_train, world):
    """The paper's 1024, halved until an epoch has MIN_STEPS_PER_EPOCH steps or the batch is
    MIN_BATCH (ImageNet's 1% keeps 1024: 11,530 images after the held-out part), a multiple of
    the process count."""
    batch = PAPER_BATCH
    while batch > max(world, MIN_BATCH) and n_train // batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return max(world, batch - batch % world)

# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def grid_progress(args, batch, world):
    """(path, state) of the grid's saved progress in --output-dir: the held-out top-1 of every
    finished setting, the best one and its weights. The file's name holds a hash of every
    setting that changes the results, so that different runs sharing a folder never mix."""
    settings = {k: v for k, v in vars(args).items() if k not in ('workers', 'output_dir')}
    if args.pretrained:  # a checkpoint rewritten in place is another start
        stat = Path(args.pretrained).stat()
        settings['pretrained_file'] = [stat.st_size, stat.st_mtime_ns]
    key = json.dumps(dict(settings, batch=batch, world=world), sort_keys=True)
    path = Path(args.output_dir) / f'grid_{hashlib.sha1(key.encode()).hexdigest()[:12]}.pth'
    if path.exists():
        state = byol.load_file(path, 'grid progress file')
        if state.get('key') != key:
            raise UserError(f'{path} belongs to another run; delete it to start this one afresh')
        return path, state
    if byol.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
    return path, dict(key=key, holdout_top1=[], best=None, best_state=None)


def percent(accuracy):
    return 'n/a' if accuracy is None else f'{accuracy:.2f}%'


def main(argv=None):
    return byol.run_cli('semi_sup.py', run, get_parser(), argv)


def run(args):
    world, device, amp, workers = linear_eval.start(args)
    start = time.time()
    log('config: ' + json.dumps(vars(args), sort_keys=True))
    train_images = augment.load_images(args.data, args.data_root, args.download, 'train')
    val_images = augment.load_images(args.data, args.data_root, args.download, 'val')

    # Data: the labelled subset, the local validation split, the validation images. As the
    # paper (SPEC.md sections 4-5), every setting trains on the whole labelled subset and is
    # scored on training images outside it, whose labels serve only to choose the setting; the
    # chosen network is then the one reported. DEVIATION: the paper's local split is the last
    # 10,009 images of TF's train split; ours is a seeded random draw from the images outside
    # the subset (10,009 of ImageNet's, 10% of a smaller set's).
    labelled, subset_file = labelled_subset(args, train_images)
    grid = [(lr, epochs) for epochs in args.epochs for lr in args.lr]
    outside = len(train_images) - len(labelled)
    if args.holdout is not None:
        holdout = args.holdout
    elif len(grid) == 1:
        holdout = 0  # a single setting: nothing to choose
    else:
        holdout = min(outside, linear_eval.default_holdout(len(train_images)))
    if len(grid) > 1 and not outside:
        raise UserError(f'--subset {args.subset} labels every training image, which leaves none '
                        f'to choose among the {len(grid)} settings on; use a smaller --subset, '
                        'or one --lr and one --epochs')
    if (len(grid) > 1 and holdout == 0) or holdout > outside:
        raise UserError(f'--holdout {holdout}: choosing among {len(grid)} settings needs 1 to '
                        f'{outside} held-out images (training images outside the subset)')
    train_set = augment.Subset(train_images, labelled)
    holdout_set = augment.Subset(train_images, local_validation(labelled, len(train_images),
                                                                holdout, args.seed))
    if args.val_images and args.val_images < len(val_images):
        val_images = augment.Subset(val_images, augment.random_indices(
            len(val_images), args.val_images, args.seed))
    batch = args.batch_size or default_batch_size(len(train_set), world)
    if batch % world:
        raise UserError(f'--batch-size {batch} does not divide over {world} processes')
    if len(train_set) < batch:
        raise UserError(f'{len(train_set)} labelled training images are fewer than one batch of '
                        f'{batch}; lower --batch-size')
    if args.batch_size is None and batch < PAPER_BATCH:
        # DEVIATION: a smaller batch for small labelled sets, with the paper's lr grid unscaled
        # (the grid spans 20x and is selected on held-out images anyway).
        log(f'WARNING: batch {PAPER_BATCH} would give {len(train_set) // PAPER_BATCH} steps per '
            f'epoch on {len(train_set)} images; using batch {batch} (set --batch-size to choose)')

    # Network: pretrained (or random) encoder + new linear head; every run of the grid starts
    # from this same state.
    torch.manual_seed(args.seed)
    encoder, feature_dim, size = linear_eval.frozen_encoder(args, train_images, device)
    encoder.requires_grad_(True)  # fine-tuning: the whole network trains
    if not args.pretrained:
        log('no --pretrained: the supervised baseline, trained from random initialisation')
    net = linear_eval.Classifier(encoder, feature_dim, len(train_images.classes)).to(device)
    initial = copy.deepcopy(net.state_dict())
    # BN in training mode, per-process statistics (unsynced, as the official code).
    model = net
    if world > 1:
        model = byol.distributed_data_parallel(net, device, sync_buffers=True)
    log(f'{len(labelled)} labelled images from {subset_file}, {len(holdout_set)} other training '
        f'images to choose the setting, {len(val_images)} validation images; '
        f'{len(train_images.classes)} classes; batch {batch}, {world} process(es); grid of '
        f'{len(grid)}: lr {list(args.lr)} x epochs {list(args.epochs)}')

    # Augmentation as linear evaluation: random resized crop + flip; centre crops to evaluate.
    loader, _ = augment.batches(train_set, size, batch // world, 'train', args.seed, device,
                                workers)
    batches = linear_eval.augmented_batches(loader)

    def eval_logits(images):  # (N, C) on centre crops, BN in eval mode, gathered
        return linear_eval.features(net, images, size, batch // world, workers, device, amp)

    # The grid: each setting fine-tunes from the same start (its crops and order depend only on
    # the seed and the epoch), so settings are independent and a rerun can skip the finished
    # ones. The best on the held-out images so far is kept, the first of equals.
    state_path, grid_state = grid_progress(args, batch, world)
    holdout_top1, best, best_state = (grid_state['holdout_top1'], grid_state['best'],
                                      grid_state['best_state'])
    if holdout_top1:
        log(f'resuming the grid at setting {len(holdout_top1) + 1}/{len(grid)} from {state_path}')
    start_setting, setting_start = len(holdout_top1), time.time()
    for i, (lr, epochs) in enumerate(grid[start_setting:], start_setting):
        net.load_state_dict(initial)
        net.train()
        optimizer = linear_eval.nesterov_sgd([dict(params=net.parameters(), base_lr=lr)])
        # fit trains H classifiers side by side, (H, B, C) logits: here H = 1.
        linear_eval.fit(lambda x: model(x)[None], optimizer, batches, epochs, len(loader),
                        device, amp, name=f'lr {lr} x {epochs} ep')
        # (N, C) logits, BN in eval mode (running statistics), gathered over processes
        top1 = None  # (a single setting: no choice)
        if len(holdout_set):
            top1 = linear_eval.topk_accuracy(*eval_logits(holdout_set), ks=(1,))[0]
        holdout_top1.append(top1)
        if best is None or holdout_top1[i] > holdout_top1[best]:
            best = i
            best_state = {k: v.detach().to('cpu', copy=True) for k, v in net.state_dict().items()}
        if byol.is_main():
            byol.save_atomic(dict(key=grid_state['key'], holdout_top1=holdout_top1, best=best,
                                  best_state=best_state), state_path)
        done = sum(e for _, e in grid[start_setting:i + 1])
        eta = (time.time() - setting_start) / done * sum(e for _, e in grid[i + 1:])
        log(f'setting {i + 1}/{len(grid)}: lr {lr} x {epochs} epochs: held-out top-1 '
            f'{percent(holdout_top1[i])} (best so far: lr {grid[best][0]} x {grid[best][1]}) | '
            f'grid eta {byol.format_time(eta)}')

    # The chosen network on the validation images.
    net.load_state_dict(best_state)
    val_logits, val_labels = eval_logits(val_images)
    top1, top5 = linear_eval.topk_accuracy(val_logits, val_labels)
    # How far fine-tuning moved the encoder: ||theta - theta_0|| / ||theta_0|| (0: it was frozen).
    moved = [(p.detach(), initial[f'encoder.{name}']) for name, p in net.encoder.named_parameters()]
    encoder_change = (sum((p - p0).square().sum() for p, p0 in moved) /
                      sum(p0.square().sum() for _, p0 in moved)).sqrt().item()
    lr, epochs = grid[best]
    results = dict(data=args.data, pretrained=args.pretrained, subset=args.subset,
                   subset_file=str(subset_file), labelled_images=len(labelled),
                   train_images=len(train_set), holdout_images=len(holdout_set),
                   val_images=len(val_images), batch_size=batch, image_size=size, lr=lr,
                   epochs=epochs, top1=top1, top5=top5, encoder_change=encoder_change,
                   holdout_top1={f'{lr_}x{ep}': acc for (lr_, ep), acc in
                                 zip(grid, holdout_top1)},
                   time_s=round(time.time() - start, 1))
    log(f'lr {lr} x {epochs} epochs (held-out top-1 {percent(holdout_top1[best])}): val top-1 '
        f'{top1:.2f}%, top-5 {top5:.2f}%; the encoder moved by {100 * encoder_change:.1f}%')
    linear_eval.append_result(args.output_dir, results)
    if byol.is_main():
        state_path.unlink()  # the grid is done: its result is in results.jsonl
    return results


if __name__ == '__main__':
    main()

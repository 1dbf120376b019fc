"""transfer.py: BYOL's transfer benchmark on 12 image classification datasets (paper section 4.2,
Table 3; appendix D, Table 10).

A pretrained encoder is evaluated on other datasets in two ways (SPEC.md section 6):
  linear    the encoder is frozen (BN statistics too); its features of centre crops, computed once,
            train a multinomial logistic regression by full-batch L-BFGS, with the l2 penalty chosen
            from 45 log-spaced values in [1e-6, 1e5] on the validation split; the chosen penalty is
            refit on train + val and reported on test.
  finetune  the whole network and a new linear head are trained by SGD with Nesterov momentum 0.9,
            20,000 steps of batch 256, over a grid of 7 learning rates x 8 weight decays (the decay
            divided by the learning rate), chosen on validation and refit on train + val.
Each dataset reports its paper metric: top-1, mean per-class accuracy, or 11-point mAP (VOC2007).

Commands
    python transfer.py --dataset pets --data-root data --pretrained runs/r50/encoder.pth
    python transfer.py --all --data-root data --pretrained runs/r50/encoder.pth   # every dataset
        present under data/; one table against the paper's row in runs/transfer/table_linear.md
    python transfer.py --dataset dtd --data-root data --pretrained runs/r50/encoder.pth \
        --protocol finetune --grid quick --steps 2000                             # CPU-sized
    python transfer.py --dataset folder --data-root ../shared/data/cifar10 \
        --pretrained runs/byol/checkpoint.pth                                     # any image folder
  Without --pretrained a randomly initialised encoder is evaluated (a baseline). Nothing is
  downloaded unless --download is passed. Layouts expected under --data-root (torchvision's):
    food-101/  cifar-10-batches-py/ or cifar10/{train,val}/  cifar-100-python/ or cifar100/...
    birdsnap/{train,test}/<class>/<image>  SUN397/ (+ SUN397/Partitions/Training_01.txt ...)
    stanford_cars/  fgvc-aircraft-2013b/  VOCdevkit/VOC2007/ (trainval and test)  dtd/dtd/
    oxford-iiit-pet/  caltech101/101_ObjectCategories/  flowers-102/
  One process, on one GPU if there is one (no torchrun).

Measured (2 shared CPU cores, linear protocol, CIFAR-10 JPEG folder ../shared/data as the target:
45,000 / 5,000 / 10,000 images, 45 penalties; convnet of width 16 at 32 px):
    python transfer.py --dataset cifar10 --data-root ../shared/data --arch convnet --width 16
        random init: top-1 45.6% (l2 chosen 3.2e-3), 76 CPU-seconds in all
    python transfer.py --dataset cifar10 --data-root ../shared/data \
        --pretrained runs/byol/checkpoint.pth        # a 1-epoch CPU BYOL (the quick start)
        BYOL: top-1 48.3% (l2 chosen 5.6e-2), 71 CPU-seconds in all
  (those two with PyTorch's default initialisation and torch's bicubic crops; with the official
  initialisation and TF's bicubic, test_byol.py's 5-epoch encoder on 5,000 / 500 / 1,000 of
  those images: random init 41.9%, BYOL 50.4%)
"""
import bisect
import copy
import itertools
import json
import math
import time
import xml.etree.ElementTree as ElementTree
from collections import namedtuple
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import augment
import byol
import linear_eval
from byol import UserError, log

# ------------------------------------------------------------------------------------------------
# Configuration: the 12 datasets, their metrics and the paper's numbers (SPEC.md sections 6, 7)
# ------------------------------------------------------------------------------------------------
Benchmark = namedtuple('Benchmark', 'title metric sizes linear finetune path')
# In the paper's order (Table 3). sizes: the paper's (train, val, test) images (Table 10);
# linear / finetune: the paper's BYOL ResNet-50 results; path: what --data-root must hold.
DATASETS = {
    'food101': Benchmark('Food-101', 'top1', (68175, 7575, 25250), 75.3, 88.5, ('food-101',)),
    'cifar10': Benchmark('CIFAR-10', 'top1', (45000, 5000, 10000), 91.3, 97.8,
                         ('cifar-10-batches-py', 'cifar10/train')),
    'cifar100': Benchmark('CIFAR-100', 'top1', (44933, 5067, 10000), 78.4, 86.1,
                          ('cifar-100-python', 'cifar100/train')),
    'birdsnap': Benchmark('Birdsnap', 'top1', (42405, 4981, 2443), 57.2, 76.3,
                          ('birdsnap/train',)),
    'sun397': Benchmark('SUN397', 'top1', (15880, 3970, 19850), 62.2, 63.7, ('SUN397',)),
    'cars': Benchmark('Stanford Cars', 'top1', (6494, 1650, 8041), 67.8, 91.6,
                      ('stanford_cars',)),
    'aircraft': Benchmark('FGVC Aircraft', 'mean_per_class', (3334, 3333, 3333), 60.6, 88.1,
                          ('fgvc-aircraft-2013b',)),
    'voc2007': Benchmark('VOC2007', 'map11', (2501, 2510, 4952), 82.5, 85.4,
                         ('VOCdevkit/VOC2007',)),
    'dtd': Benchmark('DTD', 'top1', (1880, 1880, 1880), 75.5, 76.2, ('dtd/dtd',)),
    'pets': Benchmark('Oxford-IIIT Pets', 'mean_per_class', (2940, 740, 3669), 90.4, 91.7,
                      ('oxford-iiit-pet',)),
    'caltech101': Benchmark('Caltech-101', 'mean_per_class', (2550, 510, 6084), 94.2, 93.8,
                            ('caltech101/101_ObjectCategories',)),
    'flowers': Benchmark('Oxford Flowers', 'mean_per_class', (1020, 1020, 6149), 96.1, 97.0,
                         ('flowers-102',)),
}
# Not downloadable through torchvision (Cars: its URL is gone; Birdsnap: images are fetched from
# Flickr by the authors' script).
NOT_DOWNLOADABLE = ('birdsnap', 'cars')
METRIC_NAMES = {'top1': 'top-1', 'mean_per_class': 'mean per-class accuracy',
                'map11': '11-point mAP'}

# Linear protocol: 45 log-spaced l2 penalties in [1e-6, 1e5] (paper appendix D).
L2_GRID = tuple(10 ** (-6 + 11 * i / 44) for i in range(45))
# Fine-tuning (appendix D): 7 log-spaced lrs in [1e-4, 0.1] x 7 log-spaced wds in [1e-6, 1e-3]
# plus 0. The quick grid is a corner of it for CPU runs (not in the paper).
FINETUNE_GRIDS = {
    'full': (tuple(10 ** (-4 + i / 2) for i in range(7)),
             (0.0,) + tuple(10 ** (-6 + i / 2) for i in range(7))),
    'quick': ((0.01, 0.1), (0.0, 1e-5)),
}


def get_parser():
    p = byol.ArgumentParser(prog='transfer.py', description='Transfer of a frozen or fine-tuned '
                            'encoder to 12 classification datasets (BYOL paper, Table 3).')
    a = p.add_argument
    a('--dataset', choices=(*DATASETS, 'folder'), default=None, help='one dataset; folder: '
      '--data-root is an image folder with train/ and val/ or test/ (top-1 unless --metric)')
    a('--all', action='store_true', help='every dataset present under --data-root, in the '
      'paper\'s order; absent ones are skipped')
    byol.add_data_root_arguments(p)
    a('--protocol', choices=('linear', 'finetune'), default='linear', help='linear (the '
      'default) or finetune; the paper reports both')
    a('--metric', choices=tuple(METRIC_NAMES), default=None, help='override the dataset\'s '
      'metric (for --dataset folder)')
    linear_eval.add_encoder_arguments(p)
    a('--l2', type=byol.positive_float, nargs='+', default=L2_GRID, help='linear: the l2 '
      'penalties to choose from (default: the paper\'s 45 log-spaced values in [1e-6, 1e5])')
    a('--max-iter', type=byol.positive_int, default=1000, help='linear: L-BFGS iterations per '
      'penalty (default: 1000)')
    a('--grid', choices=tuple(FINETUNE_GRIDS), default='full', help='finetune: lr x wd grid '
      '(full: the paper\'s 7 x 8; quick: lr {0.01, 0.1} x wd {0, 1e-5})')
    a('--steps', type=byol.positive_int, default=20000, help='finetune: SGD steps per run '
      '(default: the paper\'s 20,000)')
    a('--batch-size', type=byol.positive_int, default=256, help='finetune batch, also the '
      'feature extraction batch (default: the paper\'s 256)')
    a('--train-images', type=byol.nonnegative_int, default=0, help='use this many training '
      'images (a seeded subset, for quick runs; default 0: all)')
    a('--seed', type=int, default=0, help='seeds the carved validation splits, the head and '
      'the fine-tuning order (default: 0)')
    a('--output-dir', default='runs/transfer', help='<dataset>_<protocol>.json and '
      'table_<protocol>.{json,md} (default: runs/transfer)')
    return p

# ------------------------------------------------------------------------------------------------
# Data: each dataset as image sources (byol.py's interface) with train / val / test splits
# ------------------------------------------------------------------------------------------------
# A split is an image source (len, load(i) -> uint8 (3, H, W), labels, classes, name(i)) and its
# targets: class indices (N,), or for multi-label data (N, C) with 1 = present, 0 = absent and
# -1 = present only as 'difficult' objects (ignored, as the VOC devkit).
Split = namedtuple('Split', 'images targets')


class FileImages(augment.FolderImages):
    """An image source over a list of files and labels (FolderImages' decoding, no folder scan)."""

    def __init__(self, files, labels, classes):
        self.samples = [(str(f), int(y)) for f, y in zip(files, labels)]
        self.labels = [y for _, y in self.samples]
        self.classes = list(classes)


class ConcatImages:
    """Image sources one after another (train + val, for the final refit)."""

    def __init__(self, *sources):
        self.sources = sources
        self.starts = list(itertools.accumulate([0] + [len(s) for s in sources]))
        self.labels = [y for s in sources for y in s.labels]
        self.classes = sources[0].classes

    def __len__(self):
        return self.starts[-1]

    def _locate(self, i):
        k = bisect.bisect_right(self.starts, i) - 1
        return self.sources[k], i - self.starts[k]

    def load(self, i):
        source, j = self._locate(i)
        return source.load(j)

    def read(self, indices):  # a list of file bytes or images, each from its own source
        items = []
        for i in torch.as_tensor(indices).tolist():
            source, j = self._locate(i)
            items += list(source.read([j]))
        return items

    @property
    def shared_size(self):
        sizes = {source.shared_size for source in self.sources}
        return sizes.pop() if len(sizes) == 1 else None

    def name(self, i):
        source, j = self._locate(i)
        return source.name(j)


def subset(split, indices):
    return Split(augment.Subset(split.images, list(indices)), split.targets[list(indices)])


def concat(a, b):
    return Split(ConcatImages(a.images, b.images), torch.cat([a.targets, b.targets]))


def labelled(images):
    return Split(images, torch.tensor(images.labels, dtype=torch.long))


def align(split, classes):
    """Re-index a split's targets to the training split's class list (each torchvision split
    and each folder numbers its own classes)."""
    if list(split.images.classes) == list(classes):
        return split
    index = {c: i for i, c in enumerate(classes)}
    missing = sorted(set(split.images.classes) - set(index))
    if missing:
        raise UserError(f'classes {missing[:5]} are not in the training split')
    targets = torch.tensor([index[split.images.classes[y]] for y in split.images.labels])
    return Split(split.images, targets)


def carve_random(split, name, seed):
    """(train, val): a seeded random validation subset, of the paper's size for this dataset
    (the same fraction if the training set is not the paper's)."""
    train, val, _ = DATASETS[name].sizes
    n_val = round(len(split.images) * val / (train + val))
    train_idx, val_idx = linear_eval.split_indices(len(split.images), n_val, 0, seed)
    return subset(split, sorted(train_idx)), subset(split, sorted(val_idx))


def per_class_split(labels, counts, seed):
    """Seeded random split of each class's images into len(counts) + 1 index lists: counts[0]
    images of each class, then counts[1], ..., and the rest."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(labels)
    parts = [[] for _ in range(len(counts) + 1)]
    for c in labels.unique().tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)].tolist()
        for k, end in enumerate(itertools.accumulate(counts)):
            parts[k] += members[end - counts[k]:end]
        parts[-1] += members[sum(counts):]
    return [sorted(p) for p in parts]


def torchvision_dataset(cls, root, download, **kwargs):
    try:
        return cls(str(root), download=download, **kwargs)
    except (RuntimeError, OSError, ValueError, KeyError) as e:
        raise UserError(f'{cls.__name__} under --data-root {root}: {str(e).strip()[:200]}') \
            from None


def from_torchvision(cls, root, download, **kwargs):
    """A file-based torchvision dataset as a Split. Its file list is private (_image_files,
    _images or _samples): torchvision offers no public accessor."""
    ds = torchvision_dataset(cls, root, download, **kwargs)
    if hasattr(ds, '_samples'):
        files, labels = zip(*ds._samples)
    else:
        files = ds._image_files if hasattr(ds, '_image_files') else ds._images
        labels = ds._labels
    return labelled(FileImages(files, labels, ds.classes))


def image_folder(path):
    return labelled(augment.load_images(str(path), split='train'))


def food101(root, download, seed):
    datasets = torchvision.datasets
    train = from_torchvision(datasets.Food101, root, download, split='train')
    return (*carve_random(train, 'food101', seed),
            from_torchvision(datasets.Food101, root, download, split='test'))


def cifar(name):
    def load(root, download, seed):
        folder = Path(root) / name
        if (folder / 'train').is_dir():  # an image folder (as ../shared/data/cifar10)
            train = image_folder(folder / 'train')
            test = image_folder(folder / ('test' if (folder / 'test').is_dir() else 'val'))
        else:
            train, test = (labelled(augment.named_images(name, str(root), is_train, download))
                           for is_train in (True, False))
        return (*carve_random(train, name, seed), test)
    return load


def birdsnap(root, download, seed):
    # DEVIATION: a random validation split; the paper's has class counts like the test set's.
    train = image_folder(Path(root) / 'birdsnap' / 'train')
    return (*carve_random(train, 'birdsnap', seed), image_folder(Path(root) / 'birdsnap' / 'test'))


def sun397(root, download, seed):
    """Split 1 of the official partitions (50 train + 50 test images per class); 40 of each
    class's 50 train for training, 10 for validation. torchvision's SUN397 lists the images but
    not the partition files: they are read from SUN397/Partitions/ (Partitions.zip)."""
    ds = torchvision_dataset(torchvision.datasets.SUN397, root, download)
    label = {str(p.relative_to(ds._data_dir)).replace('\\', '/'): y
             for p, y in zip(ds._image_files, ds._labels)}
    parts = []
    for part in ('Training_01.txt', 'Testing_01.txt'):
        path = next((d / part for d in (ds._data_dir / 'Partitions', Path(root) / 'Partitions')
                     if (d / part).is_file()), None)
        if path is None:
            raise UserError(f'{ds._data_dir}/Partitions/{part} not found: unzip the official '
                            'Partitions.zip (vision.princeton.edu/projects/2010/SUN) there')
        names = [line.strip().lstrip('/') for line in open(path) if line.strip()]
        parts.append(labelled(FileImages([ds._data_dir / n for n in names],
                                         [label[n] for n in names], ds.classes)))
    train_idx, val_idx, _ = per_class_split(parts[0].images.labels, (40, 10), seed)
    return subset(parts[0], train_idx), subset(parts[0], val_idx), parts[1]


def cars(root, download, seed):
    datasets = torchvision.datasets
    train = from_torchvision(datasets.StanfordCars, root, download, split='train')
    return (*carve_random(train, 'cars', seed),
            from_torchvision(datasets.StanfordCars, root, download, split='test'))


def aircraft(root, download, seed):
    return tuple(from_torchvision(torchvision.datasets.FGVCAircraft, root, download, split=s,
                                  annotation_level='variant') for s in ('train', 'val', 'test'))


VOC_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
               'cow', 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant',
               'sheep', 'sofa', 'train', 'tvmonitor')


def voc_targets(annotation):
    """(20,) targets of one image: 1 if the class has a non-difficult object, -1 if it has only
    difficult ones (the VOC devkit ignores those images for that class), else 0."""
    targets = torch.zeros(len(VOC_CLASSES), dtype=torch.long)
    for obj in ElementTree.parse(annotation).getroot().iter('object'):
        c = VOC_CLASSES.index(obj.findtext('name').strip())
        if (obj.findtext('difficult') or '0').strip() != '1':
            targets[c] = 1
        elif targets[c] == 0:
            targets[c] = -1
    return targets


def voc2007(root, download, seed):
    """VOCDetection 2007 as multi-label classification: official train / val / test."""
    splits = []
    for image_set in ('train', 'val', 'test'):
        ds = torchvision_dataset(torchvision.datasets.VOCDetection, root, download, year='2007',
                                 image_set=image_set)
        targets = torch.stack([voc_targets(a) for a in ds.annotations])
        # A source needs one integer label per image: the first present class (unused by the
        # metric).
        labels = (targets == 1).long().argmax(dim=1).tolist()
        splits.append(Split(FileImages(ds.images, labels, VOC_CLASSES), targets))
    return tuple(splits)


def dtd(root, download, seed):
    return tuple(from_torchvision(torchvision.datasets.DTD, root, download, split=s, partition=1)
                 for s in ('train', 'val', 'test'))


def pets(root, download, seed):
    datasets = torchvision.datasets
    trainval = from_torchvision(datasets.OxfordIIITPet, root, download, split='trainval')
    val_idx, train_idx = per_class_split(trainval.images.labels, (20,), seed)  # 20 val per class
    return (subset(trainval, train_idx), subset(trainval, val_idx),
            from_torchvision(datasets.OxfordIIITPet, root, download, split='test'))


def caltech101(root, download, seed):
    """25 training + 5 validation images per class, the rest for test. torchvision's class
    checks and downloads; the images are listed here because its list drops the
    BACKGROUND_Google class, which the paper's 102 classes (2550 = 102 x 25) include."""
    ds = torchvision_dataset(torchvision.datasets.Caltech101, root, download)
    folder = Path(ds.root) / '101_ObjectCategories'
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    files = [(f, y) for y, c in enumerate(classes) for f in sorted((folder / c).glob('*.jpg'))]
    everything = labelled(FileImages([f for f, _ in files], [y for _, y in files], classes))
    train_idx, val_idx, test_idx = per_class_split(everything.images.labels, (25, 5), seed)
    return tuple(subset(everything, i) for i in (train_idx, val_idx, test_idx))


def flowers(root, download, seed):
    return tuple(from_torchvision(torchvision.datasets.Flowers102, root, download, split=s)
                 for s in ('train', 'val', 'test'))


LOADERS = dict(food101=food101, cifar10=cifar('cifar10'), cifar100=cifar('cifar100'),
               birdsnap=birdsnap, sun397=sun397, cars=cars, aircraft=aircraft, voc2007=voc2007,
               dtd=dtd, pets=pets, caltech101=caltech101, flowers=flowers)


def present(name, root):
    return any((Path(root) / path).exists() for path in DATASETS[name].path)


def load_folder(root, seed):
    """An image folder: train/ and test/ and/or val/. With both, val/ validates and test/ tests;
    with one, it is the test split and 10% of train/ (seeded) validates."""
    root = Path(root)
    if not (root / 'train').is_dir():
        raise UserError(f'--data-root {root} has no train/ folder (--dataset folder expects '
                        'train/<class>/<image> and val/ or test/)')
    held = [s for s in ('val', 'test') if (root / s).is_dir()]
    if not held:
        raise UserError(f'--data-root {root} has neither val/ nor test/: nothing to test on')
    train = image_folder(root / 'train')
    test = image_folder(root / held[-1])
    if len(held) == 2:
        return train, image_folder(root / 'val'), test
    train_idx, val_idx = linear_eval.split_indices(len(train.images), len(train.images) // 10,
                                                   0, seed)
    return subset(train, sorted(train_idx)), subset(train, sorted(val_idx)), test


def load_dataset(name, root, download=False, seed=0):
    """-> {'train', 'val', 'test'}: Splits whose targets index the training split's classes."""
    if name == 'folder':
        train, val, test = load_folder(root, seed)
    else:
        if not present(name, root) and not (download and name not in NOT_DOWNLOADABLE):
            expected = ' or '.join(f'{root}/{p}' for p in DATASETS[name].path)
            if name in NOT_DOWNLOADABLE:
                how = 'place it there by hand (torchvision cannot download it)'
            else:
                how = 'pass --download to fetch it'
            raise UserError(f'{DATASETS[name].title} not found: expected {expected}; {how}')
        train, val, test = LOADERS[name](root, download, seed)
    if train.targets.dim() == 1:
        val, test = (align(s, train.images.classes) for s in (val, test))
    return dict(train=train, val=val, test=test)

# ------------------------------------------------------------------------------------------------
# Metrics: top-1, mean per-class accuracy, 11-point mAP (paper appendix D)
# ------------------------------------------------------------------------------------------------


def top1(scores, targets):
    """Percentage of images whose highest score is their class."""
    return linear_eval.topk_accuracy(scores, targets, ks=(1,))[0]


def mean_per_class_accuracy(scores, targets):
    """The mean over classes of each class's top-1 (%). Classes without images in `targets` are
    left out: their accuracy is undefined."""
    correct = (scores.argmax(dim=1) == targets).float()
    n_classes = scores.shape[1]
    hits = torch.zeros(n_classes).index_add_(0, targets.cpu(), correct.cpu())
    counts = torch.bincount(targets.cpu(), minlength=n_classes).float()
    return 100.0 * (hits[counts > 0] / counts[counts > 0]).mean().item()


def average_precision_11point(scores, positive):
    """VOC2007's AP of one class: the mean over recall levels t = 0, 0.1, ..., 1 of the highest
    precision reached at a recall >= t (0 if none). scores, positive: (N,)."""
    order = scores.argsort(descending=True, stable=True)
    hits = positive[order].double()
    true_positives = hits.cumsum(0)
    precision = true_positives / torch.arange(1, len(hits) + 1, dtype=torch.float64)
    recall = true_positives / hits.sum()
    total = 0.0
    for t in (i / 10 for i in range(11)):
        reached = recall >= t - 1e-12
        total += precision[reached].max().item() if reached.any() else 0.0
    return total / 11


def mean_average_precision_11point(scores, targets):
    """11-point mAP (%) over classes, for multi-label targets (N, C) in {1, 0, -1}. Images whose
    target is -1 for a class are ignored for that class (VOC's 'difficult'); classes with no
    positive image are left out of the mean (their AP is undefined)."""
    scores, targets = scores.cpu(), targets.cpu()
    aps = []
    for c in range(targets.shape[1]):
        keep = targets[:, c] != -1
        positive = targets[keep, c] == 1
        if positive.any():
            aps.append(average_precision_11point(scores[keep, c], positive))
    return 100.0 * sum(aps) / len(aps) if aps else float('nan')


METRICS = dict(top1=top1, mean_per_class=mean_per_class_accuracy,
               map11=mean_average_precision_11point)


def training_targets(targets):
    """What the cross-entropy trains on: class indices, or for multi-label targets each image's
    present classes as a uniform distribution.

    DEVIATION (VOC2007 only): the paper names one multinomial logistic regression for every
    dataset; for multi-label images we train that softmax on soft targets (uniform over the
    present classes), not one sigmoid per class, which the paper does not describe."""
    if targets.dim() == 1:
        return targets
    present_classes = (targets == 1).float()
    return present_classes / present_classes.sum(dim=1, keepdim=True).clamp_min(1)

# ------------------------------------------------------------------------------------------------
# Linear protocol: frozen features, multinomial logistic regression by L-BFGS, l2 chosen on val
# ------------------------------------------------------------------------------------------------


def logits(x, w):
    """Scores of the logistic regression W (D + 1, C), bias in the last row: (N, D) -> (N, C)."""
    return x @ w[:-1] + w[-1]


def logistic_regression(x, y, l2, n_classes, init=None, max_iter=1000):
    """Multinomial logistic regression by full-batch L-BFGS -> W (D + 1, C) minimising

        (1/N) sum_i CE(softmax(W^T x_i + b), y_i) + l2 / (2N) ||W||^2,

    which is scikit-learn's LogisticRegression(C = 1 / l2) objective divided by N (the bias is
    not penalised, as there). UNCONFIRMED: the paper gives the penalty's range, not how it
    enters the objective; we take scikit-learn's convention, the usual L-BFGS logistic
    regression, for which a range of [1e-6, 1e5] spans weak to total regularisation.
    The problem is convex: `init` (a warm start) changes the time to the optimum, not the optimum.
    """
    # Preconditioning, an exact change of variables (the optimum is the same): centred features
    # (the unpenalised bias absorbs the mean) and W = s V with s_j = 1 / sqrt(var_j + l2 / N),
    # which gives every coordinate a curvature of order one. Raw features of very different
    # scales, or a penalty that dwarfs the data term at the strong end of the grid, otherwise
    # leave L-BFGS far from the optimum when its gradient test already passes.
    n = len(x)
    mean = x.mean(dim=0)
    scale = 1 / (x.var(dim=0, unbiased=False) + l2 / n + 1e-12).sqrt()[:, None]  # (D, 1)
    xc = x - mean
    if init is None:
        v = x.new_zeros(x.shape[1] + 1, n_classes)
    else:  # W = s V;  b' = b + mean W (the bias of the centred features)
        v = torch.cat([init[:-1] / scale, init[-1:] + mean @ init[:-1]])
    v.requires_grad_(True)
    # Gradient tolerance as scikit-learn's (1e-4), here on the preconditioned variables.
    optimizer = torch.optim.LBFGS([v], lr=1, max_iter=max_iter, tolerance_grad=1e-4,
                                  tolerance_change=1e-9, history_size=10,
                                  line_search_fn='strong_wolfe')

    def objective():
        optimizer.zero_grad()
        w = scale * v[:-1]
        loss = F.cross_entropy(xc @ w + v[-1], y) + l2 / (2 * n) * w.square().sum()
        loss.backward()
        return loss
    optimizer.step(objective)
    with torch.no_grad():
        w = scale * v[:-1]
        return torch.cat([w, v[-1:] - mean @ w])


def regularisation_path(train, val, grid, metric, n_classes, max_iter=1000):
    """Fit the logistic regression for every l2 penalty of the grid, the strongest first, each
    warm-started from the previous solution; score each on the validation split.
    train, val: (features (N, D), targets). -> (index of the best penalty, validation score of
    every penalty, the best weights). Ties go to the stronger penalty."""
    (x, t), (val_x, val_t) = train, val
    y = training_targets(t)
    scores, w, best, best_w = [None] * len(grid), None, None, None
    start = time.time()
    for i in sorted(range(len(grid)), key=lambda i: -grid[i]):
        w = logistic_regression(x, y, grid[i], n_classes, init=w, max_iter=max_iter)
        score = metric(logits(val_x, w), val_t)
        scores[i] = score if math.isfinite(score) else -math.inf
        if best is None or scores[i] > scores[best]:
            best, best_w = i, w
        log(f'l2 {grid[i]:.3g}: val {score:.2f} ({time.time() - start:.0f}s)')
    return best, scores, best_w


def linear_protocol(args, splits, metric, encoder, size, device, amp, workers):
    """Features of every split, computed once; the l2 penalty chosen on val; refit on train +
    val with it; the test score."""
    def features(images):  # frozen features of centre crops, BN in eval mode
        # UNCONFIRMED (SPEC.md section 6): the paper resizes the shorter side to 224 and does
        # not say whether a centre crop follows; we take it (SimCLR's description of the same
        # protocol has one, and it keeps batches of one shape): the whole centred square.
        return linear_eval.features(encoder, images, size, args.batch_size, workers, device,
                                    amp, center_fraction=1.0)[0]

    start = time.time()
    x = {k: features(s.images) for k, s in splits.items()}
    t = {k: s.targets.to(device) for k, s in splits.items()}
    log(f'features: {", ".join(f"{k} {tuple(v.shape)}" for k, v in x.items())} '
        f'({byol.format_time(time.time() - start)})')
    best, scores, w = regularisation_path((x['train'], t['train']), (x['val'], t['val']),
                                          args.l2, metric, len(splits['train'].images.classes),
                                          args.max_iter)
    trainval_t = torch.cat([t['train'], t['val']])
    w = logistic_regression(torch.cat([x['train'], x['val']]), training_targets(trainval_t),
                            args.l2[best], w.shape[1], init=w, max_iter=args.max_iter)
    return dict(l2=args.l2[best], val=scores[best], test=metric(logits(x['test'], w), t['test']),
                val_by_l2={f'{l2:.4g}': s for l2, s in zip(args.l2, scores)})

# ------------------------------------------------------------------------------------------------
# Fine-tune protocol: the whole network, SGD Nesterov, lr x wd grid chosen on val
# ------------------------------------------------------------------------------------------------


def bn_momentum(steps_per_epoch):
    """Paper appendix D: BN decay max(1 - 10/s, 0.9) for s steps per epoch, i.e. torch's
    momentum (1 - decay) = min(10/s, 0.1): running statistics that average over ~one epoch."""
    return 1 - max(1 - 10 / steps_per_epoch, 0.9)


def finetune(args, encoder, feature_dim, train, evaluate, metric, lr, wd, size, device, amp,
             workers):
    """One fine-tuning run from the pretrained weights -> {split: score} on the `evaluate`
    splits. Random resized crop + flip for training, the 0.875 centre crop (resize 256, crop
    224) for evaluation."""
    torch.manual_seed(args.seed)
    n_classes = len(train.images.classes)
    model = linear_eval.Classifier(copy.deepcopy(encoder), feature_dim, n_classes).to(device)
    model.requires_grad_(True)
    steps_per_epoch = len(train.images) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f'{len(train.images)} training images are fewer than one batch of '
                        f'{args.batch_size}; lower --batch-size')
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = bn_momentum(steps_per_epoch)
    # Paper: the weight decay is divided by the learning rate (so lr x decay = wd per step at
    # the start). UNCONFIRMED: the lr schedule is not stated; linear_eval.fit's cosine is used,
    # and the decay applies to every parameter.
    optimizer = linear_eval.nesterov_sgd([dict(params=model.parameters(), base_lr=lr,
                                               weight_decay=wd / lr)])
    loader, _ = augment.batches(train.images, size, args.batch_size, 'train', args.seed, device,
                                workers)
    epoch_batches = linear_eval.augmented_batches(loader,
                                                  training_targets(train.targets).to(device))

    def stream():  # batches of augmented views, epoch after epoch
        for epoch in itertools.count():
            yield from epoch_batches(epoch)
    # fit() runs 'epochs' of steps_per_epoch steps: chunks of the stream, so that exactly
    # --steps steps run and the cosine reaches 0 at the last one.
    chunk = max(d for d in range(1, min(steps_per_epoch, args.steps) + 1) if args.steps % d == 0)
    batches = stream()
    model.train()
    linear_eval.fit(lambda x: model(x)[None], optimizer,  # fit's (H = 1, B, C)
                    lambda _: itertools.islice(batches, chunk),
                    args.steps // chunk, chunk, device, amp, name=f'lr {lr:.3g} wd {wd:.3g}')
    batches.close()  # ends the loader's epoch (and its worker processes) now, not at exit
    results = {}
    for name, split in evaluate.items():
        scores = linear_eval.features(model, split.images, size, args.batch_size, workers,
                                      device, amp)[0]
        results[name] = metric(scores, split.targets.to(device))
    return results


def finetune_protocol(args, splits, metric, encoder, feature_dim, size, device, amp, workers):
    lrs, wds = FINETUNE_GRIDS[args.grid]
    runs = []
    for lr, wd in itertools.product(lrs, wds):
        score = finetune(args, encoder, feature_dim, splits['train'], dict(val=splits['val']),
                         metric, lr, wd, size, device, amp, workers)['val']
        runs.append((score if math.isfinite(score) else -math.inf, lr, wd))
        log(f'lr {lr:.3g} wd {wd:.3g}: val {score:.2f}')
    score, lr, wd = max(runs, key=lambda r: r[0])
    test = finetune(args, encoder, feature_dim, concat(splits['train'], splits['val']),
                    dict(test=splits['test']), metric, lr, wd, size, device, amp, workers)['test']
    return dict(lr=lr, wd=wd, val=score, test=test,
                val_by_lr_wd={f'{lr:.3g},{wd:.3g}': s for s, lr, wd in runs})

# ------------------------------------------------------------------------------------------------
# The benchmark: one dataset, or every one present, and the table against the paper
# ------------------------------------------------------------------------------------------------


def evaluate_dataset(args, name, device, amp, workers):
    start = time.time()
    splits = load_dataset(name, args.data_root, args.download, args.seed)
    if args.train_images and args.train_images < len(splits['train'].images):
        splits['train'] = subset(splits['train'], augment.random_indices(
            len(splits['train'].images), args.train_images, args.seed))
    metric_name = args.metric or (DATASETS[name].metric if name in DATASETS else 'top1')
    if metric_name == 'map11' and splits['train'].targets.dim() == 1:
        raise UserError('--metric map11 needs multi-label targets (VOC2007)')
    title = DATASETS[name].title if name in DATASETS else str(args.data_root)
    sizes = tuple(len(s.images) for s in splits.values())
    log(f'{title}: train / val / test {sizes[0]} / {sizes[1]} / {sizes[2]} images'
        + (f' (paper: {" / ".join(map(str, DATASETS[name].sizes))})' if name in DATASETS else '')
        + f', {len(splits["train"].images.classes)} classes, {METRIC_NAMES[metric_name]}')
    torch.manual_seed(args.seed)
    # DEVIATION: the paper evaluates at 224 px; an encoder is evaluated at the size it was
    # trained at (linear_eval.frozen_encoder), e.g. 32 px for one pretrained on CIFAR.
    encoder, feature_dim, size = linear_eval.frozen_encoder(args, splits['train'].images, device)
    log(f'{args.protocol} protocol at {size} px')
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    metric = METRICS[metric_name]
    if args.protocol == 'linear':
        result = linear_protocol(args, splits, metric, encoder, size, device, amp, workers)
    else:
        result = finetune_protocol(args, splits, metric, encoder, feature_dim, size, device,
                                   amp, workers)
    # Fine-tuning trains copies: the loaded encoder itself must come out bitwise unchanged.
    if any(not torch.equal(v, before[k]) for k, v in encoder.state_dict().items()):
        raise RuntimeError('the frozen encoder changed during evaluation')
    paper = getattr(DATASETS[name], args.protocol) if name in DATASETS else None
    result = dict(dataset=name, title=title, metric=metric_name, protocol=args.protocol,
                  pretrained=args.pretrained, image_size=size, train_val_test=list(sizes),
                  paper=paper, time_s=round(time.time() - start, 1), **result)
    log(f'{title}: test {METRIC_NAMES[metric_name]} {result["test"]:.2f}'
        + (f' (paper, BYOL ResNet-50: {paper})' if paper is not None else '')
        + f' in {byol.format_time(result["time_s"])}')
    return result


def number(value):
    return '-' if value is None else f'{value:.1f}'


def write_table(results, skipped, protocol, out):
    """table_<protocol>.json and .md: this project against the paper's BYOL row."""
    rows = [dict(dataset=r['title'], metric=METRIC_NAMES[r['metric']], ours=round(r['test'], 2),
                 paper=r['paper']) for r in results]
    rows += [dict(dataset=DATASETS[n].title, metric=METRIC_NAMES[DATASETS[n].metric], ours=None,
                  paper=getattr(DATASETS[n], protocol), note=why) for n, why in skipped]
    with open(out / f'table_{protocol}.json', 'w') as f:
        json.dump(rows, f, indent=1)
    lines = [f'| dataset ({protocol}) | metric | this project | paper (BYOL, ResNet-50) |',
             '|---|---|---|---|']
    lines += [f'| {r["dataset"]} | {r["metric"]} | {number(r["ours"])} | {number(r["paper"])} |'
              for r in rows]
    (out / f'table_{protocol}.md').write_text('\n'.join(lines) + '\n')
    return '\n'.join(lines)


def run(args):
    if bool(args.dataset) == args.all:
        raise UserError('pass --dataset NAME or --all (one of the two)')
    _, device, amp, workers = linear_eval.start(args)  # one process (no torchrun)
    names, skipped = ([args.dataset], []) if args.dataset else ([], [])
    if args.all:
        for name in DATASETS:
            if present(name, args.data_root):
                names.append(name)
            else:
                where = ' or '.join(f'{args.data_root}/{p}' for p in DATASETS[name].path)
                log(f'{DATASETS[name].title}: skipped, not found ({where})')
                skipped.append((name, 'not found'))
        if not names:
            raise UserError(f'none of the 12 datasets is under --data-root {args.data_root}')
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        result = evaluate_dataset(args, name, device, amp, workers)
        with open(out / f'{name}_{args.protocol}.json', 'w') as f:
            json.dump(result, f, indent=1)
        results.append(result)
    log(write_table(results, skipped, args.protocol, out))
    return results


def main(argv=None):
    return byol.run_cli('transfer.py', run, get_parser(), argv)


if __name__ == '__main__':
    main()

"""linear_eval.py: BYOL's linear evaluation protocol (paper section 4.1, appendix C.1), and the
evaluation hub that semi_sup.py and transfer.py build on: the encoder to evaluate and its settings,
frozen features, kNN, top-k, and the training loop of every evaluation protocol.

A linear classifier is trained on top of the frozen encoder (BN in eval mode, no extra BN): SGD with
Nesterov momentum 0.9, batch 1024, 80 epochs, no weight decay, cosine lr, random resized crop + flip
for training and a centre crop (0.875) for testing. The lr is chosen from {0.4, 0.3, 0.2, 0.1, 0.05}
on a held-out part of the training set (10,009 images for ImageNet, as the paper) and the chosen
classifier is reported on the validation split (top-1, top-5). All five classifiers train together
on the same frozen features, so the grid costs one pass over the data per epoch.

--cached (the default below 200k training images): the encoder runs once over centre crops, and the
classifiers train on the cached features (many epochs in seconds); a weighted kNN accuracy (k=20,
cosine) is reported as well.

Every evaluation script reads its encoder here: a byol.py checkpoint.pth, an exported
encoder.pth (with its encoder.json), or one of DeepMind's released checkpoints (.pkl, read by a
restricted unpickler, with TF's SAME padding); --checkpoint-classifier evaluates a checkpoint's
own online classifier without training one.

Commands
    python linear_eval.py --data /work/shared/data/cifar10 --pretrained runs/byol/checkpoint.pth
    python linear_eval.py --data /imagenet --pretrained runs/r50/encoder.pth     # paper protocol
    torchrun --nproc_per_node=8 linear_eval.py --data /imagenet --pretrained runs/r50/encoder.pth
    python linear_eval.py --data /imagenet --pretrained pretrain_res50x1.pkl --checkpoint-classifier
    python linear_eval.py --pretrained pretrain_res50x1.pkl --export-encoder runs/official_r50
  Without --pretrained the randomly initialised encoder is evaluated (a baseline).

Measured: see README.md (CIFAR-10 folder, convnet, CPU: random init vs BYOL).
"""
import _compat_pickle
import argparse
import contextlib
import functools
import json
import math
import pickle
import time
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import augment
import byol
from byol import UserError, log

LR_GRID = (0.4, 0.3, 0.2, 0.1, 0.05)  # paper appendix C.1
IMAGENET_HOLDOUT = 10009              # paper appendix C.1: the last 10,009 training images

# ================================================================================================
# The protocol (paper section 4.1, appendix C.1), and what every evaluation script shares
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# The protocol (paper appendix C.1)
# ------------------------------------------------------------------------------------------------


def run(args):
    world, device, amp, workers = start(args)
    started = time.time()
    if args.export_encoder:
        return export(args)
    if not args.data:
        raise UserError('--data is required (see linear_eval.py --help)')
    if args.batch_size % world:
        raise UserError(f'--batch-size {args.batch_size} does not divide over {world} processes')
    val_images = augment.load_images(args.data, args.data_root, args.download, 'val')
    if args.checkpoint_classifier:
        return evaluate_checkpoint_classifier(args, val_images, world, device, workers)
    train_images = augment.load_images(args.data, args.data_root, args.download, 'train')
    torch.manual_seed(args.seed)
    encoder, feature_dim, size = frozen_encoder(args, train_images, device)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    n_classes = len(train_images.classes)
    holdout = default_holdout(len(train_images)) if args.holdout is None else args.holdout
    train_idx, holdout_idx = split_indices(len(train_images), holdout, args.train_images,
                                           args.seed)
    cached = args.cached if args.cached is not None else len(train_images) < 200_000
    log(f'{len(train_idx)} training, {len(holdout_idx)} held-out, {len(val_images)} validation '
        f'images; {n_classes} classes; {"cached features" if cached else "images"}, '
        f'{args.epochs} epochs, lr grid {list(args.lr)}')

    def frozen_features(images):  # of centre crops, gathered over processes
        return features(encoder, images, size, args.batch_size // world, workers, device, amp)

    torch.manual_seed(args.seed)
    heads = Heads(feature_dim, n_classes, len(args.lr)).to(device)
    optimizer = nesterov_sgd([dict(params=h.parameters(), base_lr=lr)
                              for h, lr in zip(heads.heads, args.lr)])
    results = dict(data=args.data, pretrained=args.pretrained, cached=cached, epochs=args.epochs,
                   train_images=len(train_idx), image_size=size)
    if cached:
        x, y = frozen_features(augment.Subset(train_images, train_idx))
        # DEVIATION (cached mode only): the classifiers train on the features of centre crops,
        # computed once, without the protocol's random resized crop and flip; and the features
        # are standardised with the training features' mean and std, a fixed affine map (the
        # classifier stays linear in the features) that lets 80 epochs of SGD converge on small
        # sets whatever the features' scale.
        mean, std = x.mean(dim=0), x.std(dim=0) + 1e-6
        heads.standardize = (mean, std)
        batches = feature_batches(x, y, args.batch_size, args.seed)
        fit(heads, optimizer, batches, args.epochs, math.ceil(len(x) / args.batch_size), device,
            name='linear')
    else:  # the paper's protocol: random resized crop + flip, features recomputed every epoch
        loader, _ = augment.batches(augment.Subset(train_images, train_idx), size,
                                    args.batch_size // world, 'train', args.seed, device, workers)

        def batches(epoch):  # features of freshly augmented images, every epoch
            for x, labels in augmented_batches(loader)(epoch):
                with torch.no_grad(), byol.autocast(device, amp):
                    y = encoder(x).float()
                yield y, labels  # (not inside no_grad: the heads need gradients)
        model = heads
        if world > 1:
            model = byol.distributed_data_parallel(heads, device)
        fit(model, optimizer, batches, args.epochs, len(loader), device, name='linear')
    held_out_x, held_out_y = frozen_features(augment.Subset(train_images, holdout_idx))
    val_x, val_y = frozen_features(val_images)
    best, holdout_top1 = select(predict(heads, held_out_x), held_out_y, args.lr)
    results['top1'], results['top5'] = topk_accuracy(predict(heads, val_x)[best], val_y)
    if cached:
        knn_scores = knn_predict(x, y, val_x, n_classes)
        results['knn_top1'] = topk_accuracy(knn_scores, val_y, ks=(1,))[0]
    results.update(lr=args.lr[best], holdout_top1=dict(zip(map(str, args.lr), holdout_top1)),
                   time_s=round(time.time() - started, 1))

    after = encoder.state_dict()
    if any(not torch.equal(before[k], after[k]) for k in before):
        raise RuntimeError('the frozen encoder changed during linear evaluation')
    log('encoder unchanged after evaluation (bitwise): OK')
    log(f'lr {args.lr[best]} (held-out top-1 {holdout_top1[best]:.2f}%): val top-1 '
        f'{results["top1"]:.2f}%, top-5 {results["top5"]:.2f}%'
        + (f', kNN top-1 {results["knn_top1"]:.2f}%' if 'knn_top1' in results else ''))
    append_result(args.output_dir, results)
    return results


def append_result(output_dir, results):
    """One JSON line appended to <output_dir>/results.jsonl (rank 0), so runs can be tabulated."""
    if byol.is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / 'results.jsonl', 'a') as f:
            f.write(json.dumps(results) + '\n')

# ------------------------------------------------------------------------------------------------
# The encoder to evaluate, and its settings
# ------------------------------------------------------------------------------------------------


def describe_encoder(state):
    """(arch, width, small_images) of a plain encoder state dict, read from its keys and shapes."""
    if 'conv1.weight' not in state:
        return 'convnet', state['0.0.weight'].shape[0], False
    conv1 = state['conv1.weight']
    bottleneck = 'layer1.0.conv3.weight' in state
    layers = [len({k.split('.')[1] for k in state if k.startswith(f'layer{i}.')})
              for i in (1, 2, 3, 4)]
    arch = next((name for name, (block, blocks) in byol.RESNET_LAYERS.items()
                 if blocks == layers and (block is byol.Bottleneck) == bottleneck), None)
    if arch is None:
        raise UserError(f'unknown ResNet layout {layers}')
    return arch, conv1.shape[0] // 64, conv1.shape[-1] == 3


def encoder_state(checkpoint, path):
    """The online encoder's state dict and its settings {arch, width, small_images, image_size}
    from a byol.py checkpoint, or from an encoder.pth and the encoder.json beside it (without
    one: arch, width and stem read from the weights, image_size None)."""
    if 'online' in checkpoint and 'config' in checkpoint:
        state = {k[len('encoder.'):]: v for k, v in checkpoint['online'].items()
                 if k.startswith('encoder.')}
        return state, {k: checkpoint['config'][k] for k in byol.ENCODER_SETTINGS}
    if not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise KeyError('neither a byol.py checkpoint nor an encoder state dict')
    side = byol.settings_file(path)
    if side.is_file():
        settings = json.loads(side.read_text())
        return checkpoint, {**{k: settings[k] for k in byol.ENCODER_SETTINGS},
                            'padding': settings.get('padding', 'torch')}
    arch, width, small_images = describe_encoder(checkpoint)
    return checkpoint, dict(arch=arch, width=width, small_images=small_images, image_size=None)


class Network(NamedTuple):
    """What load_network gives: the online encoder, its feature size, its settings ({arch, width,
    small_images, image_size, padding}), the online classifier (nn.Linear; None if the file has
    none) and the step the file was saved at (None if unknown)."""
    encoder: nn.Module
    feature_dim: int
    settings: dict
    classifier: Optional[nn.Linear]
    step: Optional[int]


def load_encoder(path):
    """(encoder, feature_dim, settings) from a byol.py checkpoint, an exported encoder.pth or a
    released DeepMind checkpoint (.pkl): load_network's first three."""
    return load_network(path)[:3]


def load_network(path):
    """The online network of a byol.py checkpoint, an exported encoder.pth (no classifier) or a
    released DeepMind checkpoint (.pkl, read_released) -> Network; image_size None if unknown,
    padding 'tf_same' for converted official weights. One-line UserError if the file is missing
    or is none of these."""
    if Path(path).suffix == '.pkl':
        return read_released(path)
    checkpoint = byol.load_file(path)
    try:
        state, settings = encoder_state(checkpoint, path)
    except (KeyError, AttributeError, IndexError, ValueError) as e:
        raise UserError(f'{path} is not a byol.py checkpoint or encoder.pth ({e})') from None
    encoder, feature_dim = byol.build_encoder(settings['arch'], settings['small_images'],
                                              settings['width'])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f'{path}: its weights do not fit a {settings["arch"]} encoder '
                        f'({str(e).splitlines()[1].strip()[:150]})') from None
    try:
        classifier = online_classifier(checkpoint)
    except RuntimeError as e:
        raise UserError(f'{path}: its online classifier is broken ({str(e)[:150]})') from None
    if settings.setdefault('padding', 'torch') == 'tf_same':
        tf_same_padding(encoder)
    return Network(encoder, feature_dim, settings, classifier, checkpoint.get('step'))


def online_classifier(checkpoint):
    """byol.py's online classifier (the monitor, trained on labelled data) from its checkpoint,
    or None (an encoder.pth, or a run without labels)."""
    online = checkpoint.get('online', {})
    if 'classifier.weight' not in online:
        return None
    classifier = nn.Linear(*online['classifier.weight'].shape[::-1])
    classifier.load_state_dict({k[len('classifier.'):]: v for k, v in online.items()
                                if k.startswith('classifier.')})
    return classifier


def evaluation_size(args, settings, images):
    """The input size to evaluate an encoder at -> (size, why): --image-size; else the size it
    was trained at (settings from checkpoint.pth or encoder.json; None if the file does not say);
    else byol.py's default for the data (`images`)."""
    if args.image_size:
        return args.image_size, '--image-size'
    if settings and settings['image_size']:
        return settings['image_size'], 'its training size'
    return augment.default_image_size(images), 'the data\'s default: no training size known'


def frozen_encoder(args, images, device):
    """The encoder to evaluate, frozen and in eval mode (BN uses its stored statistics), and the
    input size to evaluate it at: one policy for every evaluation script -> (encoder,
    feature_dim, size). --pretrained: the encoder as it was trained (architecture, width, stem,
    image size: from checkpoint.pth, or the encoder.json beside encoder.pth); omitted: a randomly
    initialised --arch (a baseline) at byol.py's default size for the data (`images`).
    --image-size overrides either."""
    if args.pretrained:
        encoder, feature_dim, settings = load_encoder(args.pretrained)
        arch = settings['arch']
        if args.arch and args.arch != arch:
            raise UserError(f'{args.pretrained} holds a {arch} encoder, not --arch {args.arch}; '
                            'drop --arch (it is read from the checkpoint) or pass another file')
        size, why = evaluation_size(args, settings, images)
        log(f'encoder: {arch} from {args.pretrained}, at {size} px ({why})')
    else:
        size, _ = evaluation_size(args, None, images)
        small = args.small_images
        if small is None:
            small = size <= 64
        encoder, feature_dim = byol.build_encoder(args.arch or 'resnet50', small, args.width)
        log(f'WARNING: no --pretrained given: a RANDOMLY INITIALISED encoder (a baseline), at '
            f'{size} px')
    encoder.requires_grad_(False)
    return encoder.to(device).eval(), feature_dim, size

# ------------------------------------------------------------------------------------------------
# Frozen features, kNN, top-k
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def features(model, images, size, batch_size, workers, device, amp='none', center_fraction=0.875):
    """The model's outputs on centre crops of every image (BN in eval mode), gathered over
    processes -> (features (N, D) float32, labels (N,)), in the images' order."""
    loader, _ = augment.batches(images, size, batch_size, 'eval', device=device, workers=workers,
                                center_fraction=center_fraction)
    was_training = model.training
    model.eval()
    outputs, labels, indices = [], [], []
    loader.set_epoch(0)
    for (x,), label, index in loader:
        with byol.autocast(device, amp):
            outputs.append(model(x).float())
        labels.append(label)
        indices.append(index)
    outputs, labels, indices = torch.cat(outputs), torch.cat(labels), torch.cat(indices)
    if byol.world_size() > 1:  # every process holds the same number of (padded) items
        outputs, labels, indices = (all_gather(t) for t in (outputs, labels, indices))
    out = torch.zeros(len(images), outputs.shape[1], device=device)
    out[indices] = outputs
    out_labels = torch.zeros(len(images), dtype=torch.long, device=device)
    out_labels[indices] = labels
    model.train(was_training)
    return out, out_labels


def all_gather(t):
    gathered = [torch.empty_like(t) for _ in range(byol.world_size())]
    dist.all_gather(gathered, t)
    return torch.cat(gathered)


def knn_predict(train_features, train_labels, test_features, n_classes, k=20, temperature=0.07):
    """Weighted kNN (Wu et al. 2018; as DINO): the k most cosine-similar training features vote
    for their label with weight exp(similarity / temperature) -> class scores (N_test, C)."""
    train = F.normalize(train_features, dim=1)
    scores = []
    for chunk in F.normalize(test_features, dim=1).split(1024):
        similarity, neighbours = (chunk @ train.T).topk(min(k, len(train)), dim=1)  # (c, k)
        votes = torch.zeros(len(chunk), n_classes, device=chunk.device)
        votes.scatter_add_(1, train_labels[neighbours], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def topk_accuracy(scores, labels, ks=(1, 5)):
    """Percentage of rows whose label is among the k highest scores, for each k."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices  # (N, kmax)
    hits = top == labels[:, None]
    return [100.0 * hits[:, :k].any(dim=1).float().mean().item() for k in ks]

# ------------------------------------------------------------------------------------------------
# Classifiers and their training loop (also used by semi_sup.py and transfer.py)
# ------------------------------------------------------------------------------------------------


class Heads(nn.Module):
    """One linear classifier per learning rate: (B, D) features -> (H, B, C) logits."""

    def __init__(self, feature_dim, n_classes, n_heads):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(feature_dim, n_classes) for _ in range(n_heads))
        self.standardize = None  # optional fixed (mean, std) applied to the features first

    def forward(self, y):
        if self.standardize is not None:
            y = (y - self.standardize[0]) / self.standardize[1]
        return torch.stack([head(y) for head in self.heads])


class Classifier(nn.Module):
    """Encoder f and a new linear layer, trained together (fine-tuning in semi_sup.py and
    transfer.py): images (B, 3, S, S) -> logits (B, C)."""

    def __init__(self, encoder, feature_dim, n_classes):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, n_classes)

    def forward(self, x):
        return self.head(self.encoder(x))


def augmented_batches(loader, targets=None):
    """batches(epoch) for fit from an augment.batches loader of mode 'train' (random resized
    crop + flip): images (B, 3, S, S) and their labels, or their rows of `targets` (indexed by
    image, on the device)."""
    def batches(epoch):
        loader.set_epoch(epoch)
        for (x,), labels, index in loader:
            yield x, labels if targets is None else targets[index]
    return batches


def nesterov_sgd(param_groups):
    """SGD with Nesterov momentum 0.9 and no weight decay (paper appendix C.1); each group's
    'base_lr' is scaled by the cosine schedule every step."""
    for group in param_groups:
        group.setdefault('lr', group['base_lr'])
    return torch.optim.SGD(param_groups, momentum=0.9, nesterov=True, weight_decay=0.0)


def fit(model, optimizer, batches, epochs, steps_per_epoch, device, amp='none', name='train'):
    """The training loop of the evaluation protocols: for each batch (x, y) of batches(epoch),
    model(x) -> logits (H, B, C) of H classifiers, loss = the sum of their cross-entropies,
    per-step cosine lr, a loss scaler for fp16 (as byol.py). Prints about ten lines with the
    ETA."""
    total, step, start = epochs * steps_per_epoch, 0, time.time()
    scaler = torch.amp.GradScaler(device.type, enabled=amp == 'fp16')
    for epoch in range(epochs):
        loss_sum = torch.zeros((), device=device)
        for x, y in batches(epoch):
            for group in optimizer.param_groups:
                group['lr'] = group['base_lr'] * byol.cosine_decay(step, total)
            with byol.autocast(device, amp):
                logits = model(x)
            loss = sum(F.cross_entropy(z.float(), y) for z in logits)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            step += 1
        if (epoch + 1) % max(1, epochs // 10) == 0 or epoch == epochs - 1:  # ~10 lines a run
            eta = (time.time() - start) / (epoch + 1) * (epochs - epoch - 1)
            log(f'{name} epoch {epoch + 1}/{epochs} | loss per classifier '
                f'{loss_sum.item() / steps_per_epoch / len(logits):.4f} | '
                f'eta {byol.format_time(eta)}')
    return model


@torch.no_grad()
def predict(model, features, batch_size=4096):
    """Logits (H, N, C) of the classifiers on features (N, D), in chunks."""
    return torch.cat([model(x).float() for x in features.split(batch_size)], dim=1)


def select(logits, labels, lrs):
    """Index of the head with the best top-1 on the held-out split, and every head's top-1."""
    accuracies = [topk_accuracy(z, labels, ks=(1,))[0] for z in logits]
    return max(range(len(lrs)), key=lambda i: accuracies[i]), accuracies


def feature_batches(features, labels, batch_size, seed=None):
    """Batches of cached features: shuffled per epoch when seeded, else in order."""
    def batches(epoch=0):
        if seed is None:
            order = torch.arange(len(features), device=features.device)
        else:
            generator = torch.Generator().manual_seed(seed * 1000 + epoch)
            order = torch.randperm(len(features), generator=generator).to(features.device)
        return zip(features[order].split(batch_size), labels[order].split(batch_size))
    return batches


def default_holdout(n_train):
    """Held-out training images that choose the hyper-parameters: the paper's 10,009 for an
    ImageNet-size training set, else 10% of it."""
    return IMAGENET_HOLDOUT if n_train >= 1_000_000 else n_train // 10


def split_indices(n, holdout, train_images, seed):
    """Seeded split of range(n) into (train, held-out) index lists.

    DEVIATION: the paper holds out the last 10,009 images of TF's (shuffled) train split; a
    class-sorted folder's last images are whole classes, so we hold out a seeded random subset."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held_out, train = order[:holdout], order[holdout:]
    return (train[:train_images] if train_images else train), held_out

# ================================================================================================
# Running it: the command line, the shared setup
# ================================================================================================


def add_encoder_arguments(p):
    """The encoder to evaluate, shared by the evaluation scripts: a byol.py checkpoint or
    encoder.pth, or (omitted) a randomly initialised one described by --arch and --width; its
    input size; the precision and the loader's workers."""
    a = p.add_argument
    a('--pretrained', help='byol.py checkpoint.pth or exported encoder.pth; omitted: a randomly '
      'initialised encoder (a baseline)')
    a('--arch', choices=byol.ARCHS, help='encoder when --pretrained is omitted (default '
      'resnet50; resnet18/34 are torchvision\'s, not the paper\'s: byol.py --help); with '
      '--pretrained it is read from the checkpoint')
    a('--width', type=byol.positive_int, help='as byol.py, when --pretrained is omitted')
    a('--small-images', action=argparse.BooleanOptionalAction, help='as byol.py, when '
      '--pretrained is omitted (default: on when the image size is <= 64)')
    a('--image-size', type=byol.positive_int, help='input size (default: the size the encoder '
      'was trained at, from checkpoint.pth or the encoder.json beside encoder.pth; for a random '
      'init or a file without it, byol.py\'s default for the data)')
    byol.add_amp_argument(p)
    byol.add_workers_argument(p)


def get_parser():
    p = byol.ArgumentParser(prog='linear_eval.py', description='Linear evaluation of a frozen '
                            'encoder (BYOL paper, appendix C.1).')
    a = p.add_argument
    byol.add_data_arguments(p, required=False)  # (not for --export-encoder)
    add_encoder_arguments(p)
    a('--checkpoint-classifier', action='store_true', help='evaluate the checkpoint\'s own '
      'online classifier (the official code\'s monitor: a released .pkl, or a byol.py '
      'checkpoint.pth of labelled data) on the validation split, instead of training one; '
      'always in float32, as the official evaluation (--amp does not apply)')
    a('--export-encoder', metavar='DIR', help='save --pretrained\'s encoder as DIR/encoder.pth '
      'and encoder.json (e.g. a released .pkl, for the other scripts and torchvision), and stop')
    a('--batch-size', type=byol.positive_int, default=1024, help='global batch (default: the '
      'paper\'s 1024)')
    a('--epochs', type=byol.positive_int, default=80, help='default: the paper\'s 80')
    a('--lr', type=byol.nonnegative_float, nargs='+', default=LR_GRID, help='the lr grid, chosen '
      'on the held-out split (default: the paper\'s 0.4 0.3 0.2 0.1 0.05)')
    a('--holdout', type=byol.nonnegative_int, default=None, help='held-out training images for '
      f'the lr choice (default: {IMAGENET_HOLDOUT} for 1M+ images, as the paper; else 10%%)')
    a('--train-images', type=byol.nonnegative_int, default=0, help='train on this many training '
      'images (a seeded random subset; default 0: all)')
    a('--cached', action=argparse.BooleanOptionalAction, default=None,
      help='train on cached centre-crop features (default: on below 200k training images)')
    a('--seed', type=int, default=0, help='seeds the held-out split, the order and the heads '
      '(default: 0)')
    a('--output-dir', default='runs/linear_eval', help='results.jsonl is appended here '
      '(default: runs/linear_eval)')
    return p


def start(args):
    """What every evaluation script does first: the processes (torchrun or not) and a writable
    output folder (byol.set_up), then --amp and --workers where not given, and the device's
    settings for that precision -> (world, device, amp, workers)."""
    world, device = byol.set_up(args.output_dir)
    amp, workers = byol.precision_and_workers(args)
    byol.configure_device(device, amp)
    return world, device, amp, workers


def main(argv=None):
    return byol.run_cli('linear_eval.py', run, get_parser(), argv)

# ================================================================================================
# DeepMind's released checkpoints, and a checkpoint's own classifier
# ================================================================================================
# The released files, read without JAX, Haiku or dill: the official README and SPEC.md section 10.
# They are dill pickles (protocol 2) of
# {experiment_state: _ByolExperimentState(online_params, target_params, online_state,
# target_state, opt_state), step, rng}; params and state are Haiku mappings keyed by module
# paths such as 'res_net50/~/block_group_0/~/block_0/~/conv_0', of numpy arrays: convolutions
# 'w' (H, W, I, O), batch norms 'scale' and 'offset' (1, 1, 1, C), their moving averages
# '.../~/mean_ema' and '.../~/var_ema' with 'average' in the state, and the online classifier
# 'classifier' ('w' (D, C), 'b'). The released files are told apart by their content: the
# architecture and the step the official loop saves last, max_steps = 1000 epochs of ImageNet's
# 1,281,167 images at batch 4096 (the 300-epoch ablations and any other run stop elsewhere).
# The official README's top-1 of their online classifiers on ImageNet:
RELEASED_STEP = 1000 * 1281167 // 4096  # 312,784
RELEASED_TOP1 = {('resnet50', 1): 74.4, ('resnet200', 2): 79.6}
FIELDS = ('online_params', 'target_params', 'online_state', 'target_state', 'opt_state')


class Inert:
    """Stands in for a class or function the file names but this reader does not know (a Haiku
    mapping, the experiment's NamedTuple, an optimizer state, a jax array's rebuild function): it
    records what it was given (arguments, state, items); it runs nothing."""

    def __new__(cls, *args):  # pickle's NEWOBJ (an instance of a class) calls __new__ alone,
        obj = super().__new__(cls)
        obj.args, obj.state, obj.items, obj.called = args, None, {}, False
        return obj

    def __init__(self, *args):  # its REDUCE (a call of the name) __init__ as well
        self.called = True

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):  # the items of a dict subclass (older Haiku's FlatMapping)
        self.items[key] = value


class InertTuple(tuple):
    """A NamedTuple type the file defines by name and fields (dill's _create_namedtuple), as a
    plain tuple of its fields: the module it names is never imported. No __dict__: a file can
    give it no attributes (numpy reads some, __array_interface__ for one, as raw memory)."""
    __slots__ = ()
    _fields = ()

    def __new__(cls, *fields):
        return super().__new__(cls, fields)


@functools.cache
def safe_globals():
    """The only callables a released file may invoke, by (module, name): numpy's array and scalar
    reconstruction (under the names numpy 1.x and 2.x give them), protocol 2's byte decoding, and
    plain containers. Not numpy.array or asarray: given an object whose attributes the file set
    (__array_interface__), they read any memory address. An OrderedDict is read as a dict, which
    takes no attributes."""
    import _codecs
    import builtins
    core = getattr(np, '_core', None) or np.core
    allowed = {('_codecs', 'encode'): _codecs.encode, ('collections', 'OrderedDict'): dict,
               ('numpy', 'ndarray'): np.ndarray, ('numpy', 'dtype'): np.dtype}
    for package in ('numpy.core', 'numpy._core'):
        for module in ('multiarray', '_multiarray_umath'):
            allowed[f'{package}.{module}', '_reconstruct'] = core.multiarray._reconstruct
            allowed[f'{package}.{module}', 'scalar'] = core.multiarray.scalar
    for name in ('dict', 'list', 'tuple', 'set', 'frozenset', 'int', 'float', 'bool', 'str',
                 'bytes', 'bytearray', 'complex', 'slice'):
        allowed['builtins', name] = allowed['__builtin__', name] = getattr(builtins, name)
    return allowed


class ModuleName(str):
    """A module that dill's _import_module names and the allow-list holds: its name, for
    _get_attr to look up in the allow-list; nothing is imported."""


def dill_import_module(name, safe=False):
    """dill._dill._import_module(name) (dill 0.3.x reaches numpy's functions through it)."""
    if not any(module == name for module, _ in safe_globals()):
        raise UserError(f'it imports {name}, which a checkpoint has no need of: not loaded')
    return ModuleName(name)


def dill_get_attr(module, name):
    """dill._dill._get_attr(module, name): an allowed function of an allowed module, only."""
    if not isinstance(module, ModuleName) or (module, name) not in safe_globals():
        raise UserError(f'it asks for {module}.{name}, which a checkpoint has no need of: not '
                        'loaded')
    return safe_globals()[module, name]


def dill_create_namedtuple(name, fields, module, defaults=None):
    """dill._dill._create_namedtuple: an InertTuple type named as the file's NamedTuple."""
    if not all(isinstance(s, str) for s in (name, module, *fields)):
        raise UserError(f'it defines a NamedTuple {name!r} of fields {fields!r}: not loaded')
    return type(name, (InertTuple,), {'_fields': tuple(fields), '__module__': module,
                                      '__slots__': ()})


def dill_create_array(f, args, state, npdict=None):
    """dill._dill._create_array (dill 0.4.x wraps every array in it): numpy's own reconstruction
    of an ndarray, f(*args) then __setstate__(state), as pickle does without dill."""
    reconstruct = safe_globals()['numpy.core.multiarray', '_reconstruct']
    if f is not reconstruct or not isinstance(args, tuple) or args[:1] != (np.ndarray,) or npdict:
        raise UserError(f'it builds an array with {f!r}: not loaded')
    array = f(*args)
    array.__setstate__(state)
    return array


# dill's helpers that a released file uses (0.2.x wrote them in module dill.dill), each resolved to
# the one safe thing it stands for; every other name of dill (such as _create_function or
# _eval_repr, which rebuild and run code) is refused.
DILL_MODULES = ('dill._dill', 'dill.dill')
DILL_HELPERS = {'_import_module': dill_import_module, '_get_attr': dill_get_attr,
                '_create_namedtuple': dill_create_namedtuple, '_create_array': dill_create_array}
# Modules for system access or code execution: no checkpoint has a reason to name them, and a
# file that does is refused; so is any name of numpy or dill outside the allow-list (numpy's
# runstring, for one, executes a string). Everything else unknown stays an Inert stand-in.
FORBIDDEN_MODULES = ('builtins', '__builtin__', 'os', 'posix', 'nt', 'sys', 'subprocess',
                     'shutil', 'socket', 'pty', 'importlib', 'runpy', 'code', 'codeop',
                     'ctypes', 'marshal', 'pickle', 'webbrowser', 'multiprocessing', 'signal',
                     'pdb', 'types', 'io', 'tempfile', 'pathlib', 'numpy', 'dill')


class ReleasedUnpickler(pickle.Unpickler):
    """A restricted unpickler: numpy arrays and plain containers are rebuilt (also through dill's
    helpers, which dill itself is never needed for); a class (or any other callable) it does not
    know becomes an Inert stand-in, which runs nothing; a name from a module for system access or
    code execution, or from numpy or dill beyond what arrays need, is refused."""

    def find_class(self, module, name):
        # the Python 3 name that pickle itself would import (protocol 2: e.g. __builtin__ is
        # builtins, commands.getoutput is subprocess.getoutput), as its own find_class does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[module, name]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in safe_globals():
            return safe_globals()[module, name]
        if module in DILL_MODULES and name in DILL_HELPERS:
            return DILL_HELPERS[name]
        if module.split('.')[0] in FORBIDDEN_MODULES:
            raise UserError(f'it names {module}.{name}, which could run code or is not one a '
                            'checkpoint needs: not loaded; is it a file from the official BYOL '
                            'release?')
        return type(name, (Inert,), {'__module__': module})


def plain(obj):
    """The stand-ins replaced by plain containers: a mapping for a Haiku mapping (its items, or
    its storage given as its one argument or held in its state), a tuple of the fields for an
    instance made from them (a NamedTuple); a call of a name this reader does not know (a jax
    array's rebuild, say) stays an Inert stand-in, for the reader to name."""
    if isinstance(obj, Inert):
        state = obj.state
        if isinstance(state, tuple) and len(state) == 2 and state[0] is None:
            state = state[1]                                  # (None, slots)
        mappings = []
        if isinstance(state, dict):
            mappings = [v for v in state.values() if isinstance(v, dict)]
        if obj.items:
            return plain(obj.items)
        if len(obj.args) == 1 and isinstance(obj.args[0], dict):
            return plain(obj.args[0])
        if len(mappings) == 1:
            return plain(mappings[0])
        if obj.called:
            return obj
        return tuple(plain(a) for a in obj.args) if obj.args else plain(state)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj] if isinstance(obj, list) else tuple(map(plain, obj))
    return obj


def read_released(path):
    """A released BYOL checkpoint -> Network (its encoder with TF's SAME padding): the online
    network's weights and BN statistics, its classifier and step. One-line UserError for a file
    that is not one, says why."""
    if not Path(path).is_file():
        raise UserError(f'checkpoint {path} does not exist')
    try:
        with open(path, 'rb') as f:
            checkpoint = plain(ReleasedUnpickler(f).load())
        params, state = (checkpoint['experiment_state'][FIELDS.index(k)]
                         for k in ('online_params', 'online_state'))
    except UserError as e:
        raise UserError(f'{path}: {e}') from None
    except Exception as e:  # truncated, not a pickle, another layout
        raise UserError(f'cannot read {path} as a released BYOL checkpoint '
                        f'({type(e).__name__}: {str(e)[:100]}); download it again?') from None
    try:
        encoder, feature_dim, settings, classifier = released_network(params, state)
    except UserError as e:
        raise UserError(f'{path}: {e}') from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as e:
        raise UserError(f'{path}: not the layout of a released BYOL checkpoint '
                        f'({type(e).__name__}: {str(e)[:150]})') from None
    step = checkpoint.get('step')
    step = int(step) if isinstance(step, (int, np.integer)) else None
    return Network(encoder, feature_dim, settings, classifier, step)


def official_top1(released):
    """The official README's top-1 of a released file's online classifier; None for any other
    file (another step, or another network)."""
    if released.step != RELEASED_STEP:
        return None
    return RELEASED_TOP1.get((released.settings['arch'], released.settings['width']))


def released_array(tree, module, name, shape=None):
    """tree[module][name] as float32 numpy, checked: it exists, is a numpy array (not a stand-in
    for a jax array or another object) and has `shape` (or, given an int, that many values)."""
    entries = tree.get(module)
    if not isinstance(entries, dict) or name not in entries:
        raise UserError(f'it has no {module} {name} (a ResNet of another layout?)')
    value = entries[name]
    if isinstance(value, Inert):  # a call this reader does not make, such as a jax array's
        raise UserError(f'{module} {name} is {type(value).__module__}.{type(value).__name__}'
                        '(...), not a numpy array (a jax array? the official Checkpointer saves '
                        'numpy arrays, through jax.device_get)')
    if not isinstance(value, np.ndarray) or value.dtype.kind not in 'fiu':
        raise UserError(f'{module} {name} is a {type(value).__module__}.{type(value).__name__}'
                        ', not a numpy array of numbers')
    if isinstance(shape, tuple) and value.shape != shape:
        raise UserError(f'{module} {name} has shape {value.shape}; the network needs {shape}')
    if isinstance(shape, int) and value.size != shape:
        raise UserError(f'{module} {name} has shape {value.shape}; the network needs {shape} '
                        'values')
    return value.astype(np.float32, copy=False)


def released_network(params, state):
    """The online parameters and BN averages (Haiku's mappings) -> (encoder with TF's SAME
    padding, feature_dim, settings, the online classifier as nn.Linear or None)."""
    if not isinstance(params, dict) or not isinstance(state, dict):
        raise UserError('its online parameters and state are not mappings')
    modules = {k.split('/')[0] for k in params if isinstance(k, str)}
    scope = next((s for s in ('res_net50', 'res_net200') if s in modules), None)
    if scope is None:
        raise UserError(f'it holds no ResNet-50 or ResNet-200 encoder (modules: '
                        f'{", ".join(sorted(modules)[:5])})')
    arch = {'res_net50': 'resnet50', 'res_net200': 'resnet200'}[scope]
    stem = released_array(params, released_module(params, scope, 'initial_conv'), 'w')
    if stem.ndim != 4 or stem.shape[:3] != (7, 7, 3) or stem.shape[3] % 64:
        raise UserError(f'its initial_conv w has shape {stem.shape}, not (7, 7, 3, 64 width)')
    settings = dict(arch=arch, width=stem.shape[3] // 64, small_images=False, image_size=224,
                    padding='tf_same')
    with torch.device('meta'):  # no weights drawn (seconds for a ResNet-50): all are loaded
        encoder, feature_dim = byol.build_encoder(arch, False, settings['width'])
    encoder.load_state_dict(released_state_dict(params, state, scope, encoder), assign=True)
    classifier = None
    if 'classifier' in params:
        w = released_array(params, 'classifier', 'w')                     # (D, C)
        if w.ndim != 2 or w.shape[0] != feature_dim:
            raise UserError(f'classifier w has shape {w.shape}, not ({feature_dim}, classes)')
        classifier = nn.Linear(*w.shape)
        classifier.weight.data = torch.from_numpy(w.T.copy())
        classifier.bias.data = torch.from_numpy(released_array(params, 'classifier', 'b',
                                                               (w.shape[1],)).copy())
    return tf_same_padding(encoder), feature_dim, settings, classifier


def released_module(params, scope, name):
    """The module path of `name`: some converters' files name the stem 'initial_conv_1'."""
    key = f'{scope}/~/{name}'
    if key not in params and f'{key}_1' in params:
        return f'{key}_1'
    return key


def ema_updates(state, module):
    """How many updates a Haiku moving average has had (its 'counter'), for BatchNorm's
    num_batches_tracked: fine-tuning then continues the released running statistics as the
    official code would (byol.BatchNorm debiases by it), where a count of 0 would replace them
    with the first batch's. A file without a counter: a count large enough not to debias."""
    entry = state.get(module) if isinstance(state, dict) else None
    counter = entry.get('counter') if isinstance(entry, dict) else None
    try:
        return int(np.asarray(counter).reshape(()))
    except (TypeError, ValueError):
        return 10 ** 9


def released_state_dict(params, state, scope, encoder):
    """Haiku's online parameters and BN averages as the torchvision ResNet's state dict: HWIO ->
    OIHW convolutions, (1, 1, 1, C) -> (C,) scales, offsets and statistics; every entry checked
    against the shape the encoder needs."""
    expected = encoder.state_dict()
    out = {}

    def conv(name, key):
        o, i, h, w = expected[f'{key}.weight'].shape
        hwio = released_array(params, released_module(params, scope, name), 'w', (h, w, i, o))
        out[f'{key}.weight'] = torch.from_numpy(hwio).permute(3, 2, 0, 1).contiguous()

    def bn(name, key):
        path, c = released_module(params, scope, name), expected[f'{key}.weight'].numel()
        for suffix, tree, module, entry in (
                ('weight', params, path, 'scale'), ('bias', params, path, 'offset'),
                ('running_mean', state, f'{path}/~/mean_ema', 'average'),
                ('running_var', state, f'{path}/~/var_ema', 'average')):
            out[f'{key}.{suffix}'] = torch.from_numpy(
                released_array(tree, module, entry, c).reshape(-1))
        out[f'{key}.num_batches_tracked'] = torch.tensor(ema_updates(state, f'{path}/~/mean_ema'))

    conv('initial_conv', 'conv1')
    bn('initial_batchnorm', 'bn1')
    for g, layer in enumerate((encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4)):
        for b in range(len(layer)):
            block, key = f'block_group_{g}/~/block_{b}/~/', f'layer{g + 1}.{b}'
            for i in range(3):
                conv(f'{block}conv_{i}', f'{key}.conv{i + 1}')
                bn(f'{block}batchnorm_{i}', f'{key}.bn{i + 1}')
            if b == 0:
                conv(f'{block}shortcut_conv', f'{key}.downsample.0')
                bn(f'{block}shortcut_batchnorm', f'{key}.downsample.1')
    return out


def same_padding(size, kernel, stride):
    """TF's SAME padding of one side: (before, after), the extra one after (stride 2 on an even
    side: (0, 1) for a 3x3 kernel, (2, 3) for the 7x7 stem; PyTorch pads both sides equally)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """A convolution padded as TF's SAME (the official weights were trained so)."""

    def forward(self, x):
        (top, bottom), (left, right) = (same_padding(s, k, st) for s, k, st in
                                        zip(x.shape[-2:], self.kernel_size, self.stride))
        return self._conv_forward(F.pad(x, (left, right, top, bottom)), self.weight, self.bias)


class SameMaxPool2d(nn.MaxPool2d):
    """A max-pool padded as TF's SAME (with -inf)."""

    def forward(self, x):
        (top, bottom), (left, right) = (same_padding(s, self.kernel_size, self.stride)
                                        for s in x.shape[-2:])
        return F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf),
                            self.kernel_size, self.stride)


def tf_same_padding(encoder):
    """The stride-2 convolutions and the max-pool of a torchvision ResNet padded as TF's SAME, in
    place; the state dict keeps its keys (torchvision still loads it; it then pads symmetrically,
    which costs the official weights about 4 points of top-1: README)."""
    for m in encoder.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.__class__, m.padding = SameConv2d, (0, 0)
        elif isinstance(m, nn.MaxPool2d):
            m.__class__, m.padding = SameMaxPool2d, 0
    return encoder


def export(args):
    """--export-encoder: --pretrained's encoder in this project's format (DIR/encoder.pth, a plain
    torchvision state dict, and its settings in DIR/encoder.json)."""
    if not args.pretrained:
        raise UserError('--export-encoder needs --pretrained (the file to convert)')
    out = Path(args.export_encoder)
    byol.check_output_dir(out)
    encoder, _, settings = load_encoder(args.pretrained)
    if byol.is_main():
        out.mkdir(parents=True, exist_ok=True)
        byol.export_encoder(encoder, settings, out)
    log(f'{args.pretrained}: {settings["arch"]} encoder saved as {out / "encoder.pth"} '
        f'({json.dumps(settings)})')
    return settings


@contextlib.contextmanager
def exact_float32():
    """Convolutions and matrix products in IEEE float32 while inside: no TF32 on GPUs (cuDNN
    takes it for convolutions by default), as the official evaluation computes."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def evaluate_checkpoint_classifier(args, images, world, device, workers):
    """The checkpoint's own online classifier on the validation images, no training, computed as
    the official evaluation computes it: in float32 whatever --amp says (bf16 moved logits by
    1.4% of their maximum and changed the top-1 of 1 image in 16), centre crop 0.875, bicubic
    resize to 224, TF's padding. For a released file (told apart by its content: official_top1)
    this checks the whole pipeline against the official figure in one pass (ResNet-50: 74.4%).

    DEVIATION: an image is decoded whole, then cropped (torchvision cannot decode a window); the
    official tf.image.decode_and_crop_jpeg decodes the crop window alone, whose edges come out
    otherwise: up to 56 levels on the crop's edge columns, on 4 of 16 images measured.
    DEVIATION: JPEGs are decoded with libjpeg-turbo's accurate integer IDCT, torchvision's only
    one; TF 2.x decodes with INTEGER_FAST by default: up to 18 levels per pixel. Measured on one
    network, these and the resize's rounding together moved logits by up to 3.7% of their
    maximum (SPEC.md section 10)."""
    if not args.pretrained:
        raise UserError('--checkpoint-classifier needs --pretrained')
    network = load_network(args.pretrained)
    encoder, settings, classifier = network.encoder, network.settings, network.classifier
    released = None
    if Path(args.pretrained).suffix == '.pkl':
        released = network
    if classifier is None:
        raise UserError(f'{args.pretrained} holds no online classifier (byol.py trains one on '
                        'labelled data, in checkpoint.pth; encoder.pth has none)')
    if classifier.out_features != len(images.classes):
        raise UserError(f'the classifier of {args.pretrained} has {classifier.out_features} '
                        f'classes, the validation split {len(images.classes)}')
    size, _ = evaluation_size(args, settings, images)
    model = nn.Sequential(encoder, classifier).to(device)
    with exact_float32():  # (no autocast: amp 'none')
        logits, labels = features(model, images, size, args.batch_size // world, workers,
                                  device, 'none')
    top1, top5 = topk_accuracy(logits, labels)
    official = official_top1(released) if released else None
    if official:
        note = f' (the official code, the same weights: {official}%)'
    elif released:
        note = f' (not a released file, step {released.step}: no official figure to compare)'
    else:
        note = ''
    log(f'the checkpoint\'s own classifier at {size} px, in float32 (--amp does not apply): '
        f'val top-1 {top1:.2f}%, top-5 {top5:.2f}%{note}')
    results = dict(data=args.data, pretrained=args.pretrained, checkpoint_classifier=True,
                   image_size=size, top1=top1, top5=top5, official_top1=official)
    append_result(args.output_dir, results)
    return results


if __name__ == '__main__':
    main()

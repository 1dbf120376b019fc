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

Commands
    python linear_eval.py --data /work/shared/data/cifar10 --pretrained runs/byol/checkpoint.pth
    python linear_eval.py --data /imagenet --pretrained runs/r50/encoder.pth     # paper protocol
    torchrun --nproc_per_node=8 linear_eval.py --data /imagenet --pretrained runs/r50/encoder.pth
  Without --pretrained the randomly initialised encoder is evaluated (a baseline).

Measured: see README.md (CIFAR-10 folder, convnet, CPU: random init vs BYOL).
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import augment
import byol
from byol import UserError, log

LR_GRID = (0.4, 0.3, 0.2, 0.1, 0.05)  # paper appendix C.1
IMAGENET_HOLDOUT = 10009              # paper appendix C.1: the last 10,009 training images

# ------------------------------------------------------------------------------------------------
# The command line: the arguments every evaluation script shares, and this protocol's
# ------------------------------------------------------------------------------------------------


def add_data_arguments(p):
    """--data, --data-root, --download: as byol.py's."""
    p.add_argument('--data', required=True, help='as byol.py: an image folder with train/ and '
                   'val/, or one of ' + ', '.join(augment.NAMED_DATASETS))
    p.add_argument('--data-root', default='data', help='where named datasets live (default: '
                   './data)')
    p.add_argument('--download', action='store_true', help='download a missing named dataset')


def add_encoder_arguments(p):
    """The encoder to evaluate, shared by the evaluation scripts: a byol.py checkpoint or
    encoder.pth, or (omitted) a randomly initialised one described by --arch and --width; its
    input size; the precision and the loader's workers."""
    a = p.add_argument
    a('--pretrained', help='byol.py checkpoint.pth or exported encoder.pth; omitted: a randomly '
      'initialised encoder (a baseline)')
    a('--arch', choices=byol.ARCHS, help='encoder when --pretrained is omitted (default '
      'resnet50); with --pretrained it is read from the checkpoint')
    a('--width', type=byol.positive_int, help='as byol.py, when --pretrained is omitted')
    a('--small-images', action='store_true', default=None, help='as byol.py, when --pretrained '
      'is omitted (default: on when the image size is <= 64)')
    a('--image-size', type=byol.positive_int, help='input size (default: the size the encoder '
      'was trained at, from checkpoint.pth or the encoder.json beside encoder.pth; for a random '
      'init or a file without it, byol.py\'s default for the data)')
    a('--amp', choices=byol.AMP_CHOICES, help='autocast precision, as byol.py (default: bf16 on '
      'GPUs and on CPUs with AMX, else none)')
    a('--workers', type=byol.nonnegative_int, help='data-loader processes per process')


def get_parser():
    p = byol.ArgumentParser(prog='linear_eval.py', description='Linear evaluation of a frozen '
                            'encoder (BYOL paper, appendix C.1).')
    a = p.add_argument
    add_data_arguments(p)
    add_encoder_arguments(p)
    a('--batch-size', type=byol.positive_int, default=1024, help='global batch (paper: 1024)')
    a('--epochs', type=byol.positive_int, default=80, help='paper: 80')
    a('--lr', type=byol.nonnegative_float, nargs='+', default=LR_GRID,
      help='lr grid, selected on the held-out '
      'split (paper: 0.4 0.3 0.2 0.1 0.05)')
    a('--holdout', type=byol.nonnegative_int, default=None,
      help='held-out training images for the lr choice '
      f'(default: {IMAGENET_HOLDOUT} for 1M+ images as the paper, else 10%%)')
    a('--train-images', type=byol.nonnegative_int, default=0,
      help='train on this many training images (a seeded '
      'random subset; 0: all)')
    a('--cached', action=argparse.BooleanOptionalAction, default=None,
      help='train on cached centre-crop features (default: on below 200k training images)')
    a('--seed', type=int, default=0, help='seeds the held-out split, the order and the heads')
    a('--output-dir', default='runs/linear_eval', help='results.jsonl is appended here')
    return p


# ------------------------------------------------------------------------------------------------
# The shared setup: processes, precision, the encoder to evaluate and its settings
# ------------------------------------------------------------------------------------------------


def start(args):
    """What every evaluation script does first: check the output folder, set up the processes
    (torchrun or not) -> (world, device, amp, workers)."""
    _, world, device = byol.setup_distributed()
    byol.check_output_dir(args.output_dir)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    amp = args.amp or byol.default_amp()
    return world, device, amp, augment.default_workers() if args.workers is None else args.workers


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
        return checkpoint, {k: settings[k] for k in byol.ENCODER_SETTINGS}
    arch, width, small_images = describe_encoder(checkpoint)
    return checkpoint, dict(arch=arch, width=width, small_images=small_images, image_size=None)


def load_encoder(path):
    """(encoder, feature_dim, settings) from a byol.py checkpoint or an exported encoder.pth;
    settings: {arch, width, small_images, image_size} (image_size None if unknown). One-line
    UserError if the file is missing or is neither."""
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
    return encoder, feature_dim, settings


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
        size = args.image_size or settings['image_size'] or augment.default_image_size(images)
        why = '--image-size' if args.image_size else 'its training size' if \
            settings['image_size'] else 'the data\'s default: the file gives no training size'
        log(f'encoder: {arch} from {args.pretrained}, at {size} px ({why})')
    else:
        size = args.image_size or augment.default_image_size(images)
        small = args.small_images if args.small_images is not None else size <= 64
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


def cosine(step, total_steps):
    """Cosine decay from 1 to 0 over total_steps, per step."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


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
                group['lr'] = group['base_lr'] * cosine(step, total)
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
        order = torch.arange(len(features), device=features.device) if seed is None else \
            torch.randperm(len(features), generator=torch.Generator().manual_seed(
                seed * 1000 + epoch)).to(features.device)
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

# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def append_result(output_dir, results):
    """One JSON line appended to <output_dir>/results.jsonl (rank 0), so runs can be tabulated."""
    if byol.is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(output_dir) / 'results.jsonl', 'a') as f:
            f.write(json.dumps(results) + '\n')


def main(argv=None):
    return byol.run_cli('linear_eval.py', run, get_parser(), argv)


def run(args):
    world, device, amp, workers = start(args)
    started = time.time()
    train_images = augment.load_images(args.data, args.data_root, args.download, 'train')
    val_images = augment.load_images(args.data, args.data_root, args.download, 'val')
    if args.batch_size % world:
        raise UserError(f'--batch-size {args.batch_size} does not divide over {world} processes')
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
        model = DistributedDataParallel(heads) if world > 1 else heads
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


if __name__ == '__main__':
    main()

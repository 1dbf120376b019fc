"""byol.py: BYOL pretraining ("Bootstrap Your Own Latent", Grill et al., NeurIPS 2020).

An online network (encoder f, projector g, predictor q) learns to predict, from one augmented view
of an image, the projection that a target network (f', g') makes of another view. The target's
weights are an exponential moving average of the online ones; no negative pairs are used.
Paper sections: 3.1 (method), 3.3 (implementation), appendices A, B, J. Numbers: ../shared/SPEC.md.

Commands
    python byol.py --data cifar10 --data-root DIR --arch convnet --epochs 10 --batch-size 256
        (CPU or one GPU; see README.md for the CPU quick start on a CIFAR-10 image folder)
    python byol.py --data /imagenet                    # one GPU, paper defaults (1000 epochs)
    torchrun --nproc_per_node=8 byol.py --data /imagenet --output-dir runs/r50
    torchrun --nnodes=4 --node_rank=$R --master_addr=$HOST --master_port=29500 \
        --nproc_per_node=8 byol.py --data /imagenet --output-dir runs/r50
  A rerun of the same command resumes from <output-dir>/checkpoint.pth. The final encoder is
  exported as <output-dir>/encoder.pth, loadable by torchvision.models.<arch>().

Measured (README.md has the table): CIFAR-10 JPEG folder, --arch convnet --width 32, 3 epochs
(1,170 steps of 128, fp32) in 6.7 minutes on 2 CPU cores: linear probe 51.1% (random init) ->
55.8% (BYOL), kNN 43.6% -> 47.7%.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import augment

# ------------------------------------------------------------------------------------------------
# Configuration: paper defaults, presets keyed by epochs (SPEC.md section 0)
# ------------------------------------------------------------------------------------------------
# epochs: (base lr, weight decay, base tau), from the official configs/byol.py.
PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
           1000: (0.2, 1.5e-6, 0.996)}
# Named torchvision datasets for small experiments.
NAMED_DATASETS = ('cifar10', 'cifar100', 'stl10', 'fashionmnist')
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet200', 'convnet')
MAX_IN_MEMORY = 200_000  # images held on the device: CIFAR, STL-10 (105k at 96 px: 2.9 GB)
SYNC_EVERY = 5  # steps between the loop's host synchronisations (loss check, preemption flag)
AMP_CHOICES = ('bf16', 'fp16', 'none')  # autocast precisions, the same in every script
# What an encoder needs to be rebuilt and fed: travels with it (checkpoint.pth, encoder.json).
ENCODER_SETTINGS = ('arch', 'width', 'small_images', 'image_size')
# Settings that define a run: a resumed run must use the same ones.
RUN_SETTINGS = ('arch', 'width', 'small_images', 'image_size', 'hidden_dim', 'projection_dim',
                'epochs', 'batch_size', 'lr', 'wd', 'tau', 'warmup_epochs', 'seed')


class UserError(Exception):
    """A problem with the user's input: reported as one line, without a traceback."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UserError(f'{message} (see {self.prog} --help)')


def _bounded(cast, low, low_inclusive, name):
    """An argparse type: `cast` of the text, at least `low` (or above it)."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {name}') from None
        if value < low or (value == low and not low_inclusive) or value != value:
            raise argparse.ArgumentTypeError(f'{text!r} is not {name}')
        return value
    return parse


positive_int = _bounded(int, 0, False, 'a positive integer')
nonnegative_int = _bounded(int, 0, True, 'an integer >= 0')
positive_float = _bounded(float, 0.0, False, 'a positive number')
nonnegative_float = _bounded(float, 0.0, True, 'a number >= 0')


def fraction(text):
    """An argparse type: a number in [0, 1] (tau)."""
    value = nonnegative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f'{text!r} is not in [0, 1]')
    return value


def get_parser():
    p = ArgumentParser(prog='byol.py', description='BYOL pretraining (Grill et al., 2020).')
    a = p.add_argument
    a('--data', required=True, help='an ImageNet-style folder (DATA/train/<class>/<image> or '
      'DATA/<class>/<image>), or one of ' + ', '.join(NAMED_DATASETS))
    a('--data-root', default='data', help='where named datasets live (default: ./data)')
    a('--download', action='store_true', help='download a named dataset if it is missing')
    a('--arch', default='resnet50', choices=ARCHS, help='encoder f (paper: resnet50)')
    a('--width', type=positive_int, default=None,
      help='ResNet channel multiplier, 1, 2 or 4 (paper '
      'Table 1b; default 1); for convnet, the first layer width (default 32)')
    a('--small-images', action=argparse.BooleanOptionalAction, default=None,
      help='3x3 stride-1 stem and no max-pool (default: on when --image-size <= 64)')
    a('--image-size', type=positive_int, default=None, help='crop size (paper: 224; default: 224, '
      'or the native size of a dataset whose images all share one smaller size, e.g. CIFAR\'s 32)')
    a('--hidden-dim', type=positive_int, default=4096,
      help='projector/predictor hidden width (paper 4096)')
    a('--projection-dim', type=positive_int, default=256, help='projection width (paper 256)')
    a('--epochs', type=positive_int, default=1000,
      help='paper headline: 1000; sets the preset of --lr, '
      '--wd and --tau: ' + ', '.join(f'{e} ep: {v}' for e, v in PRESETS.items()) +
      ' (the smallest preset with at least this many epochs)')
    a('--batch-size', type=positive_int, default=4096,
      help='global batch over all processes (paper 4096)')
    a('--lr', type=positive_float, default=None,
      help='base lr; peak lr = lr x batch / 256 (preset)')
    a('--wd', type=nonnegative_float, default=None, help='LARS weight decay (preset)')
    a('--tau', type=fraction, default=None, help='base EMA rate tau of the target, cosine to 1 '
      '(preset)')
    a('--warmup-epochs', type=nonnegative_float, default=10,
      help='linear lr warmup (paper: 10 epochs)')
    a('--data-on-device', action=argparse.BooleanOptionalAction, default=None,
      help='hold the whole dataset on the training device and crop there (default: on for named '
      f'datasets and folders of at most {MAX_IN_MEMORY} images of one size)')
    a('--decode-on-device', action='store_true', help='decode JPEGs on the GPU (nvJPEG, '
      'batched) and crop there; the loader only reads files (image folders only)')
    a('--compile', action='store_true', help='torch.compile the networks (minutes of '
      'compilation at the start; opt-in)')
    a('--workers', type=nonnegative_int, default=None, help='data-loader processes per GPU/process '
      '(default: the CPU cores per process less one, at most 10)')
    a('--seed', type=int, default=0, help='seeds the initialisation, the data order and every '
      'augmentation')
    a('--amp', choices=AMP_CHOICES, default=None, help='autocast precision (default: bf16 on '
      'GPUs and on CPUs with AMX, where it is faster, else none; a resumed run keeps its own)')
    a('--output-dir', default='runs/byol', help='checkpoint.pth, encoder.pth, log.jsonl')
    a('--resume', default=None, help='checkpoint to resume from (default: '
      '<output-dir>/checkpoint.pth if it exists)')
    a('--stop-at-step', type=positive_int, default=None,
      help='save and stop after this global step; '
      'the schedules stay those of the full run (for preemptible queues)')
    a('--log-every', type=positive_int, default=20, help='steps between progress lines')
    a('--eval-every', type=nonnegative_int, default=0, help='every N epochs, a kNN accuracy on the '
      'labelled split (named datasets: test; folders: DATA/val); 0: never')
    a('--eval-train-images', type=nonnegative_int, default=0,
      help='kNN memory bank size drawn from the '
      'training split (0: all of it)')
    return p


def resolve_config(args, images, saved=None):
    """Fill the defaults that depend on other settings or on the data: presets by epochs, image
    size and stem (default_image_size), width, precision (a resumed run keeps its own), workers.
    saved: the configuration of the checkpoint being resumed, if any."""
    preset = next((PRESETS[e] for e in sorted(PRESETS) if e >= args.epochs), PRESETS[1000])
    for name, value in zip(('lr', 'wd', 'tau'), preset):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.image_size is None:
        args.image_size = default_image_size(images)
    if args.small_images is None:
        args.small_images = args.image_size <= 64
    if args.width is None:
        args.width = 32 if args.arch == 'convnet' else 1
    if args.amp is None:
        args.amp = saved['amp'] if saved and saved.get('amp') in AMP_CHOICES else default_amp()
    if args.workers is None:
        args.workers = default_workers()
    return args


def default_image_size(images):
    """The paper's 224 (with the ImageNet stem), except for a dataset whose images all share one
    smaller size (CIFAR's 32 px, STL-10's 96): its native size (the small-image stem at <= 64 px).
    Image folders of photos of varied sizes, and folders too large to check, train at 224."""
    size = images.shared_size
    return min(224, *size) if size else 224


def default_amp():
    """The autocast precision that is faster on this hardware: bf16 on GPUs that support it and
    on CPUs with AMX (measured 1.9x for a ResNet-18 step, bench/RESULTS.md), float32 elsewhere
    (a CPU with AVX-512 BF16 but no AMX ran the bf16 step at 0.73x of float32)."""
    if torch.cuda.is_available():
        return 'bf16' if torch.cuda.is_bf16_supported() else 'none'
    return 'bf16' if getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)() else 'none'


def default_workers():
    """The CPU cores of this process less one (the training loop's), at most 10."""
    per_process = (os.cpu_count() or 2) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))
    return max(0, min(10, per_process - 1))

# ------------------------------------------------------------------------------------------------
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK) and rank-0 output
# ------------------------------------------------------------------------------------------------


def setup_distributed():
    """-> (rank, world_size, device). One process per GPU under torchrun; gloo on CPU."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', device_id=(
            device if device.type == 'cuda' else None))
    return rank, world, device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*message):
    if is_main():
        print(*message, flush=True)


def format_time(seconds):
    seconds = int(seconds)
    return f'{seconds // 3600}h{seconds % 3600 // 60:02d}m' if seconds >= 3600 else \
        f'{seconds // 60}m{seconds % 60:02d}s'

# ------------------------------------------------------------------------------------------------
# Networks: encoder f, projector g and predictor q, the BYOL module (paper section 3.3)
# ------------------------------------------------------------------------------------------------


def convnet(width=32):
    """A small encoder for CPU runs: four 3x3 conv-BN-ReLU layers of width w, 2w, 4w, 8w, max-pool
    after the first three, global average pool. Not in the paper."""
    layers, channels = [], 3
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                                 nn.MaxPool2d(2) if i < 3 else nn.Identity())]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


RESNET_LAYERS = {'resnet18': (BasicBlock, [2, 2, 2, 2]), 'resnet34': (BasicBlock, [3, 4, 6, 3]),
                 'resnet50': (Bottleneck, [3, 4, 6, 3]), 'resnet101': (Bottleneck, [3, 4, 23, 3]),
                 'resnet152': (Bottleneck, [3, 8, 36, 3]),
                 'resnet200': (Bottleneck, [3, 24, 36, 3])}


def resnet(arch, width=1):
    """torchvision's ResNet, with every layer's channels multiplied by `width` for the paper's
    ResNet-50 (2x) and (4x) (stem and outputs too; torchvision's wide_resnet50_2 widens only the
    inner 3x3 convolutions)."""
    block, layers = RESNET_LAYERS[arch]
    if width == 1:
        return ResNet(block, layers)
    if block is not Bottleneck:
        raise UserError(f'--width {width} applies to the bottleneck ResNets (resnet50 and deeper), '
                        f'as in the paper; use --width 1 with {arch}')
    # A Bottleneck's inner width is planes * width_per_group / 64 and its output planes *
    # expansion: widening both by `width` widens every layer.
    wide_block = type(f'Bottleneck{width}x', (Bottleneck,), {'expansion': 4 * width})
    net = ResNet(wide_block, layers, width_per_group=64 * width)
    net.inplanes = 64 * width  # the stem widens too, so rebuild it and the first stage
    net.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * width)
    net.layer1 = net._make_layer(wide_block, 64, layers[0])
    return net


def official_init(module):
    """The official code's initialisation (Haiku's defaults, SPEC.md section 1): every
    convolution and linear weight from a normal of std 1/sqrt(fan_in) truncated at 2 std, biases
    0; BN gamma 1 and beta 0 everywhere (the paper's; torchvision's default too)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            std = m.weight[0].numel() ** -0.5  # fan_in = in_channels x kernel area
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def build_encoder(arch, small_images=False, width=None):
    """Encoder f without its classifier -> (module, feature_dim), initialised as the official
    code."""
    if arch == 'convnet':
        width = width or 32
        return official_init(convnet(width)), 8 * width
    if arch not in RESNET_LAYERS:
        raise UserError(f'unknown --arch {arch}; choose one of {", ".join(ARCHS)}')
    net = resnet(arch, width or 1)
    if small_images:  # CIFAR-size inputs: 3x3 stride-1 stem, no max-pool (SPEC.md section 0)
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return official_init(net), feature_dim


def mlp(in_dim, hidden_dim, out_dim):
    """Projector g and predictor q (paper 3.3): Linear -> BN -> ReLU -> Linear, nothing on the
    output, initialised as the official code. DEVIATION: the last Linear has no bias, as the
    official code (appendix J's pseudo-code has one)."""
    return official_init(nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False)))


def regression_loss(p, z):
    """Paper Eq. 2: ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z), per sample: (B, d) -> (B,)."""
    p = F.normalize(p.float(), dim=-1, eps=1e-6)  # eps^2 = 1e-12 on the squared norm, as official
    z = F.normalize(z.float(), dim=-1, eps=1e-6)
    return 2 - 2 * (p * z).sum(dim=-1)


def projection_std(z):
    """Std over the batch of the l2-normalised projections, averaged over dimensions: ~0 when the
    representation has collapsed to a constant, ~1/sqrt(d) when it spreads over the sphere."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()


class BYOL(nn.Module):
    """Online network (f, g, q) and target network (f', g'): forward(v1, v2) -> loss.

    Both views go through each network in separate calls (per-view BN statistics, as the
    official code), inside one forward so that DDP sees one call per step. The target runs with
    BN in training mode (batch statistics, its own running stats) and receives no gradient."""

    def __init__(self, encoder, feature_dim, hidden_dim=4096, projection_dim=256):
        super().__init__()
        self.online = nn.ModuleDict(dict(
            encoder=encoder,                                        # f_theta
            projector=mlp(feature_dim, hidden_dim, projection_dim),  # g_theta
            predictor=mlp(projection_dim, hidden_dim, projection_dim)))  # q_theta
        # DEVIATION (minor): the target starts as a copy of the online network, as the paper's
        # appendix J; the official code draws it from another seed ("no noticeable difference").
        self.target = nn.ModuleDict(dict(encoder=copy.deepcopy(encoder),  # f_xi
                                         projector=copy.deepcopy(self.online.projector)))  # g_xi
        self.target.requires_grad_(False)

    def forward(self, v1, v2, return_std=False):
        online, target = self.online, self.target
        z1 = online.projector(online.encoder(v1))             # (B, 256) projections
        z2 = online.projector(online.encoder(v2))
        q1, q2 = online.predictor(z1), online.predictor(z2)   # (B, 256) predictions
        with torch.no_grad():                                 # sg(z'): stop-gradient
            t1 = target.projector(target.encoder(v1))         # (B, 256) target projections
            t2 = target.projector(target.encoder(v2))
        # Symmetrised loss (paper Eq. 2 plus its mirror), summed over the two orders, batch mean.
        loss = (regression_loss(q1, t2) + regression_loss(q2, t1)).mean()
        return (loss, projection_std(z1)) if return_std else loss

    def online_target_pairs(self):
        online = [*self.online.encoder.parameters(), *self.online.projector.parameters()]
        return online, list(self.target.parameters())

    @torch.no_grad()
    def update_target(self, tau):
        """Paper section 3.1: xi <- tau xi + (1 - tau) theta, for the parameters only (BN gamma
        and beta included; BN running statistics are the target's own, as the official code)."""
        online, target = self.online_target_pairs()
        torch._foreach_lerp_(target, online, 1.0 - tau)


def all_reduce_sum(t):
    """t summed over all processes, in place (unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


class SyncBatchNormFunction(torch.autograd.Function):
    """y = gamma x_hat + beta, x_hat = (x - mean) invstd, with the global batch's statistics;
    the backward all-reduces the sums of dy and dy x_hat, the input gradient's only global
    terms (as nn.SyncBatchNorm's): dx = gamma invstd (dy - mean(dy) - x_hat mean(dy x_hat))."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        x_hat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x_hat, weight, invstd, count)
        ctx.dtype = x.dtype
        return x_hat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, dy):
        x_hat, weight, invstd, count = ctx.saved_tensors
        shape, dims = (1, -1) + (1,) * (dy.dim() - 2), [0, *range(2, dy.dim())]
        local = torch.stack([dy.sum(dims), (dy * x_hat).sum(dims)])  # (2, C): d beta, d gamma
        mean_dy, mean_dy_x_hat = (all_reduce_sum(local.double()) / count).float()
        dx = (dy - mean_dy.view(shape) - x_hat * mean_dy_x_hat.view(shape)) * \
            (weight * invstd).view(shape)
        return dx.to(ctx.dtype), local[1], local[0], None, None, None


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch, for CPU (gloo) runs: torch's
    nn.SyncBatchNorm is CUDA-only. One all-reduce in the forward, in float64, of each process's
    count n, n mean and n (var + mean^2), from its own float32 var_mean: the global variance
    is never E[x^2] - E[x]^2 of float32 sums, which cancels when |mean| >> std (at mean/std =
    1000 that lost 10% of it, and gave NaN at 3000); one all-reduce in the backward."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2-D input, got {x.dim()}-D')

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        dims, c = [0, *range(2, x.dim())], x.shape[1]
        with torch.no_grad():
            var, mean = (t.double() for t in torch.var_mean(x.float(), dims, correction=0))
            n = torch.full_like(mean, x.numel() // c)
            n, sum_x, sum_x2 = all_reduce_sum(torch.stack([n, n * mean, n * (var + mean ** 2)]))
            mean, var = sum_x / n, (sum_x2 / n - (sum_x / n) ** 2).clamp_min(0)  # biased
            self.running_mean.lerp_(mean.float(), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).float(), self.momentum)
            self.num_batches_tracked += 1
        return SyncBatchNormFunction.apply(x, self.weight, self.bias, mean.float(),
                                           (var + self.eps).rsqrt().float(), n[0])


def synchronize_batchnorm(module, device):
    """BN statistics over the global batch (SPEC.md section 1): nn.SyncBatchNorm on GPUs,
    AllReduceBatchNorm on CPU. Parameters and buffers are kept, so state dicts are unchanged."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        synced = AllReduceBatchNorm(module.num_features, module.eps, module.momentum)
        synced.weight, synced.bias = module.weight, module.bias
        synced.load_state_dict(module.state_dict())
        return synced
    for name, child in module.named_children():
        module.add_module(name, synchronize_batchnorm(child, device))
    return module

# ------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step, set every step (paper 3.3, SPEC.md sections 1-2)
# ------------------------------------------------------------------------------------------------


def target_tau(step, total_steps, base_tau):
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, 1 at k = K."""
    k = min(step, total_steps)
    return 1 - (1 - base_tau) * (math.cos(math.pi * k / total_steps) + 1) / 2


def learning_rate(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup from 0 over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * 0.5 * (1 + math.cos(math.pi * progress))

# ------------------------------------------------------------------------------------------------
# LARS (You et al., 2017) as BYOL uses it (SPEC.md section 2)
# ------------------------------------------------------------------------------------------------


class LARS(torch.optim.Optimizer):
    """Per tensor w with gradient g, in order:
        u = g + wd w;  u <- u eta ||w|| / ||u|| (when both norms are > 0);  m <- momentum m + u;
        w <- w - lr m.
    Groups with lars=False (biases, norm layers) skip both the weight decay and the trust ratio.
    Written with multi-tensor (foreach) ops and no host synchronisation."""

    def __init__(self, params, lr=0.0, momentum=0.9, weight_decay=0.0, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group['params'] if p.grad is not None]
            if not params:
                continue
            u = [p.grad for p in params]
            if group['lars']:
                u = torch._foreach_add(u, params, alpha=group['weight_decay'])
                w_norm = torch.stack(torch._foreach_norm(params))
                u_norm = torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group['eta'] * w_norm / u_norm,
                                    1.0)
                torch._foreach_mul_(u, list(trust.unbind()))
            momenta = [self.state[p].setdefault('momentum_buffer', torch.zeros_like(p))
                       for p in params]
            torch._foreach_mul_(momenta, group['momentum'])
            torch._foreach_add_(momenta, u)
            torch._foreach_add_(params, momenta, alpha=-group['lr'])


def lars_param_groups(model, weight_decay):
    """Two groups: conv and linear weights get weight decay and the trust ratio; biases and the
    parameters of every normalisation layer get neither. Frozen parameters are left out."""
    adapted, excluded = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (excluded if is_norm or name == 'bias' else adapted).append(p)
    return [dict(params=adapted, weight_decay=weight_decay, lars=True),
            dict(params=excluded, weight_decay=0.0, lars=False)]

# ------------------------------------------------------------------------------------------------
# Data: image sources, crops made in the loader, a resumable distributed sampler
# ------------------------------------------------------------------------------------------------


class FolderImages:
    """Images of a <root>/<class>/<image> folder, decoded to uint8 (3, H, W)."""

    def __init__(self, root):
        try:
            folder = torchvision.datasets.ImageFolder(root)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f'{root} holds no images in class folders ({str(e).strip()}); '
                            'expected <root>/<class>/<image>.jpg') from None
        self.samples, self.classes = folder.samples, folder.classes
        self.labels = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def name(self, i):
        return self.samples[i][0]

    @functools.cached_property
    def shared_size(self):
        """(H, W) if every image has that one size, read from the files' headers (seconds for
        50,000 images; it stops at the second size it meets), else None. Folders of more than
        MAX_IN_MEMORY images are not read (None). Unreadable files are left to load()."""
        if len(self) > MAX_IN_MEMORY:
            return None
        from PIL import Image
        sizes = set()
        for path, _ in self.samples:
            try:
                with Image.open(path) as image:
                    sizes.add(image.size[::-1])
            except Exception:
                continue
            if len(sizes) > 1:
                return None
        return sizes.pop() if sizes else None

    def load(self, i):
        path = self.samples[i][0]
        try:  # libjpeg-turbo / libpng through torchvision: faster than PIL, the same pixels
            return torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)
        except Exception:  # formats it lacks (bmp, tiff), or a torchvision without it: PIL
            from PIL import Image
            with Image.open(path) as image:
                return torchvision.transforms.functional.pil_to_tensor(image.convert('RGB'))


class ArrayImages:
    """Images held in memory as uint8 (N, 3, H, W) with integer labels."""

    def __init__(self, data, labels, classes):
        self.data, self.labels, self.classes = data, [int(y) for y in labels], classes
        self.shared_size = tuple(data.shape[-2:])

    def __len__(self):
        return len(self.data)

    def name(self, i):
        return f'image {i}'

    def load(self, i):
        return self.data[i]


def random_indices(n, k, seed):
    """k of range(n), drawn by a seeded permutation, in increasing order (quick-run subsets)."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


class Subset:
    """Some of an image source's images, by index."""

    def __init__(self, images, indices):
        self.images, self.indices = images, indices
        self.labels = [images.labels[i] for i in indices]
        self.classes = images.classes

    @property
    def shared_size(self):
        return self.images.shared_size

    def __len__(self):
        return len(self.indices)

    def name(self, i):
        return self.images.name(self.indices[i])

    def load(self, i):
        return self.images.load(self.indices[i])


def named_images(name, root, train, download):
    """A torchvision dataset held in memory as ArrayImages (train or test split)."""
    datasets = torchvision.datasets
    try:
        if name == 'stl10':
            ds = datasets.STL10(root, split='train+unlabeled' if train else 'test',
                                download=download)
            data, labels = torch.as_tensor(ds.data), ds.labels
        else:
            cls = {'cifar10': datasets.CIFAR10, 'cifar100': datasets.CIFAR100,
                   'fashionmnist': datasets.FashionMNIST}[name]
            ds = cls(root, train=train, download=download)
            data, labels = torch.as_tensor(ds.data), ds.targets
            data = data[:, None].expand(-1, 3, -1, -1) if data.dim() == 3 else \
                data.permute(0, 3, 1, 2)
    except RuntimeError as e:
        raise UserError(f'{name} not found under --data-root {root} ({str(e).strip()}); pass '
                        '--download to fetch it, or point --data-root at its folder') from None
    return ArrayImages(data.contiguous(), labels, ds.classes)


def load_images(data, data_root='data', download=False, split='train'):
    """--data as an image source: a named dataset (split 'val' is its test set), or an
    ImageNet-style folder (DATA/train and DATA/val, or class folders directly under DATA for the
    training split)."""
    if data.lower() in NAMED_DATASETS:
        return named_images(data.lower(), data_root, split == 'train', download)
    path = Path(data)
    if not path.is_dir():
        raise UserError(f'--data {data}: no such folder; give an ImageNet-style folder '
                        f'(DATA/train/<class>/<image>) or one of {", ".join(NAMED_DATASETS)}')
    if (path / split).is_dir():
        path = path / split
    elif split != 'train':
        raise UserError(f'{data} has no {split}/ folder: labelled evaluation needs '
                        f'{data}/{split}/<class>/<image>')
    images = FolderImages(path)
    try:
        images.load(0)
    except Exception as e:
        raise UserError(f'cannot read image {images.name(0)} ({str(e).strip()[:200]}); '
                        f'is {path} a folder of images?') from None
    return images


def warn_unreadable(name, error):
    print(f'warning: skipping unreadable image {name}: {str(error).strip()[:200]}',
          file=sys.stderr, flush=True)


def load_or_skip(images, i):
    """Image i, or, if it cannot be read, the next readable one (with a warning naming it)."""
    for j in range(i, i + 100):
        j %= len(images)
        try:
            return images.load(j)
        except Exception as e:
            warn_unreadable(images.name(j), e)
    raise RuntimeError(f'100 unreadable images in a row from {images.name(i)}')


class Crops(torch.utils.data.Dataset):
    """Batches of crops made in the data loader: keys [(epoch, i), ...] ->
    (crops uint8 (b, V, 3, S, S), uniforms (b, V, N_SLOTS), labels (b,), indices (b,)).

    random=True: V random resized crops (the geometric half of T and T'); random=False: one
    centre crop (evaluation). All randomness comes from augment.uniforms(seed, epoch, i)."""

    def __init__(self, images, size, n_views=2, random=True, seed=0, center_fraction=0.875):
        self.images, self.size, self.n_views, self.random, self.seed = \
            images, size, n_views, random, seed
        self.center_fraction = center_fraction  # random=False: the centre crop's side / min(H, W)

    def __len__(self):
        return len(self.images)

    def __getitems__(self, keys):  # the DataLoader asks for whole batches through this
        epochs, indices = (torch.tensor(k) for k in zip(*keys))
        u = augment.uniforms(self.seed, epochs, indices, self.n_views)  # (b, V, N_SLOTS)
        labels = torch.tensor([self.images.labels[i] for i in indices.tolist()])
        return self.crops(indices.tolist(), u), u, labels, indices

    def crops(self, indices, u):
        images = [load_or_skip(self.images, i) for i in indices]
        return crop_images(images, u, self.size, None if self.random else self.center_fraction)

    def __getitem__(self, key):
        return tuple(t[0] for t in self.__getitems__([key]))


def crop_images(images, u, size, center_fraction=None):
    """Uint8 images (3, H, W) of any sizes -> crops (b, V, 3, S, S) uint8: the random resized
    crops of uniforms u (b, V, N_SLOTS), or, given center_fraction, centre crops."""
    heights, widths = torch.tensor([image.shape[-2:] for image in images]).T
    if center_fraction is None:
        boxes = [augment.crop_boxes(u[:, v].cpu(), heights, widths) for v in range(u.shape[1])]
    else:
        boxes = [torch.tensor([augment.center_crop_box(h, w, center_fraction)
                               for h, w in zip(heights.tolist(), widths.tolist())])] * u.shape[1]
    return augment.crops_of(images, torch.stack(boxes, dim=1), size)  # boxes (b, V, 4)


def two_views(crops, u):
    """The photometric halves of T and T' on a batch of crop pairs (b, 2, 3, S, S) uint8 ->
    normalised views v1 ~ T, v2 ~ T' (b, 3, S, S)."""
    return (augment.augment_batch(crops[:, 0], u[:, 0], augment.T),
            augment.augment_batch(crops[:, 1], u[:, 1], augment.T_PRIME))


class EncodedCrops(Crops):
    """Crops for --decode-on-device: the loader only reads the files; decoding (nvJPEG, batched)
    and cropping happen on the device -> (file bytes [b], uniforms (b, V, N_SLOTS), labels,
    indices). The uniforms, hence the crops, are those of Crops."""

    def crops(self, indices, u):
        return [torchvision.io.read_file(self.images.name(i)) for i in indices]


def decode_crops(files, u, size, device, names=None):
    """JPEG bytes -> random resized crop pairs (b, 2, 3, S, S) uint8 on the device. Files the
    batched decoder refuses (PNG, CMYK, corrupt) are decoded one by one on the CPU; one that
    cannot be read at all is replaced by its batch neighbour, with a warning."""
    mode = torchvision.io.ImageReadMode.RGB
    try:
        images = torchvision.io.decode_jpeg(files, mode=mode, device=device)
    except RuntimeError:
        images = []
        for i, data in enumerate(files):
            try:
                images.append(torchvision.io.decode_image(data, mode=mode).to(device))
            except RuntimeError as e:
                warn_unreadable(names[i] if names else i, e)
                images.append(None)
        images = [image if image is not None else next(x for x in images if x is not None)
                  for image in images]
    return crop_images(images, u, size)


def views_in_loader(batch):
    """Loader-side augmentation (CPU runs: it then overlaps with the training step)."""
    return (*two_views(batch[0], batch[1]), *batch[2:])


def _collate(batch, transform=None):
    return transform(batch) if transform else batch


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index) and can start mid-epoch, so that a resumed
    run sees exactly the batches the interrupted one would have. With drop_last, batch k of
    the global batch B holds permutation[kB:(k+1)B] whatever the number of processes."""

    def __init__(self, dataset, shuffle=True, seed=0):
        super().__init__(dataset, num_replicas=world_size(),
                         rank=dist.get_rank() if dist.is_initialized() else 0,
                         shuffle=shuffle, seed=seed, drop_last=shuffle)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self):
        return self.num_samples - self.skip


def images_in_memory(images):
    """All images as one uint8 tensor (N, 3, H, W) if they fit (a named dataset, or a folder of
    at most MAX_IN_MEMORY images of one size and 8 GiB in all), else None."""
    if isinstance(images, ArrayImages):
        return images.data
    size = images.shared_size
    if size is None or len(images) * 3 * size[0] * size[1] > 8 * 2 ** 30:  # 8 GiB
        return None
    data = torch.empty(len(images), 3, *size, dtype=torch.uint8)
    for i in range(len(images)):
        image = load_or_skip(images, i)
        if image.shape[-2:] != size:  # a header that disagrees with its pixels
            return None
        data[i] = image
    return data


class DeviceCrops:
    """Batches of crop pairs from a dataset held whole on the training device: no DataLoader.
    The same EpochSampler keys and the same uniforms as Crops, so the same crops (up to uint8
    rounding), computed over the batch -> (crops (b, 2, 3, S, S) uint8, uniforms (b, 2, K))."""

    def __init__(self, data, size, batch_size, seed, device):
        self.data, self.size, self.batch_size, self.seed = data.to(device), size, batch_size, seed
        self.sampler = EpochSampler(range(len(data)), shuffle=True, seed=seed)

    def __len__(self):
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        keys = torch.tensor([i for _, i in self.sampler], device=self.data.device)
        height, width = self.data.shape[-2:]
        for k in range(len(self)):
            indices = keys[k * self.batch_size:(k + 1) * self.batch_size]
            u = augment.uniforms(self.seed, self.sampler.epoch, indices)   # (b, 2, N_SLOTS)
            images = self.data[indices]
            yield torch.stack([augment.resized_crops(images, augment.crop_boxes(
                u[:, v], height, width), self.size) for v in range(2)], dim=1), u


def make_loader(dataset, batch_size, workers, shuffle, seed, device, transform=None):
    """A DataLoader over Crops with an EpochSampler; batch_size is per process; transform runs
    on each batch in the loader's workers."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=EpochSampler(dataset, shuffle, seed),
        num_workers=workers, collate_fn=functools.partial(_collate, transform=transform),
        pin_memory=device.type == 'cuda', drop_last=shuffle, persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None)

# ------------------------------------------------------------------------------------------------
# Evaluation helpers: frozen features and a k-nearest-neighbour classifier
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def extract_features(encoder, loader, device, amp='none'):
    """Features of every image of loader's dataset (centre crops), gathered on every process
    -> (features (N, D) float32, labels (N,)). The encoder runs in eval mode (BN running stats)."""
    was_training = encoder.training
    encoder.eval()
    n = len(loader.dataset)
    features, labels, indices = [], [], []
    loader.sampler.set_epoch(0)
    for crops, _, label, index in loader:
        with autocast(device, amp):
            y = encoder(augment.eval_batch(crops[:, 0].to(device, non_blocking=True)))
        features.append(y.float())
        labels.append(label.to(device))
        indices.append(index.to(device))
    features, labels, indices = torch.cat(features), torch.cat(labels), torch.cat(indices)
    if world_size() > 1:  # every process holds the same number of (padded) items
        features, labels, indices = (_all_gather(t) for t in (features, labels, indices))
    out = torch.zeros(n, features.shape[1], device=device)
    out[indices] = features
    out_labels = torch.zeros(n, dtype=torch.long, device=device)
    out_labels[indices] = labels
    encoder.train(was_training)
    return out, out_labels


def centre_crop_features(model, images, size, batch_size, workers, device, amp='none',
                         center_fraction=0.875):
    """extract_features over centre crops of an image source (the evaluation scripts' inputs)."""
    crops = Crops(images, size, n_views=1, random=False, center_fraction=center_fraction)
    loader = make_loader(crops, batch_size, workers, False, 0, device)
    return extract_features(model, loader, device, amp)


def _all_gather(t):
    gathered = [torch.empty_like(t) for _ in range(world_size())]
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


def autocast(device, amp):
    dtype = {'bf16': torch.bfloat16, 'fp16': torch.float16}.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, unwrapped state dicts; load_encoder for the evaluation scripts
# ------------------------------------------------------------------------------------------------


def save_atomic(obj, path):
    """torch.save (or, for bytes, a plain write) to a temporary file, flushed to disk, then
    renamed: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'wb') as f:
        f.write(obj) if isinstance(obj, bytes) else torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_file(path, what='checkpoint'):
    if not Path(path).is_file():
        raise UserError(f'{what} {path} does not exist')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise UserError(f'cannot read {what} {path} ({str(e).strip().splitlines()[0][:150]}); '
                        'is it a file written by byol.py?') from None


def describe_encoder(state):
    """(arch, width, small_images) of a plain encoder state dict, read from its keys and shapes."""
    if 'conv1.weight' not in state:
        return 'convnet', state['0.0.weight'].shape[0], False
    conv1 = state['conv1.weight']
    bottleneck = 'layer1.0.conv3.weight' in state
    layers = [len({k.split('.')[1] for k in state if k.startswith(f'layer{i}.')})
              for i in (1, 2, 3, 4)]
    arch = next((name for name, (block, blocks) in RESNET_LAYERS.items()
                 if blocks == layers and (block is Bottleneck) == bottleneck), None)
    if arch is None:
        raise UserError(f'unknown ResNet layout {layers}')
    return arch, conv1.shape[0] // 64, conv1.shape[-1] == 3


def settings_file(path):
    """encoder.pth -> encoder.json: the encoder's settings (ENCODER_SETTINGS) beside its plain
    state dict, which torchvision's loader then reads as it is."""
    return Path(path).with_suffix('.json')


def encoder_state(checkpoint, path):
    """The online encoder's state dict and its settings {arch, width, small_images, image_size}
    from a byol.py checkpoint, or from an encoder.pth and the encoder.json beside it (without
    one: arch, width and stem read from the weights, image_size None)."""
    if 'online' in checkpoint and 'config' in checkpoint:
        state = {k[len('encoder.'):]: v for k, v in checkpoint['online'].items()
                 if k.startswith('encoder.')}
        return state, {k: checkpoint['config'][k] for k in ENCODER_SETTINGS}
    if not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise KeyError('neither a byol.py checkpoint nor an encoder state dict')
    side = settings_file(path)
    if side.is_file():
        settings = json.loads(side.read_text())
        return checkpoint, {k: settings[k] for k in ENCODER_SETTINGS}
    arch, width, small_images = describe_encoder(checkpoint)
    return checkpoint, dict(arch=arch, width=width, small_images=small_images, image_size=None)


def load_encoder(path):
    """(encoder, feature_dim, settings) from a byol.py checkpoint or an exported encoder.pth;
    settings: {arch, width, small_images, image_size} (image_size None if unknown). One-line
    UserError if the file is missing or is neither."""
    checkpoint = load_file(path)
    try:
        state, settings = encoder_state(checkpoint, path)
    except (KeyError, AttributeError, IndexError, ValueError) as e:
        raise UserError(f'{path} is not a byol.py checkpoint or encoder.pth ({e})') from None
    encoder, feature_dim = build_encoder(settings['arch'], settings['small_images'],
                                         settings['width'])
    try:
        encoder.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f'{path}: its weights do not fit a {settings["arch"]} encoder '
                        f'({str(e).splitlines()[1].strip()[:150]})') from None
    return encoder, feature_dim, settings


def check_output_dir(path):
    """Fail at once, before any data is read or model built, if the folder cannot be created
    or written (a file in the way, no permission); nothing is created here."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UserError(f'--output-dir {path}: {existing} is a file, not a folder; choose '
                        'another --output-dir')
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f'--output-dir {path}: {existing} is not writable; choose another '
                        '--output-dir')


def check_resumable(checkpoint, config, path):
    """A checkpoint of another run (architecture, batch, schedule) cannot be resumed."""
    if 'online' not in checkpoint or 'config' not in checkpoint:
        raise UserError(f'{path} is not a byol.py training checkpoint; pass --resume a '
                        'checkpoint.pth written by byol.py')
    saved = checkpoint['config']
    diffs = [f'--{k.replace("_", "-")} {saved.get(k)} (now {config[k]})'
             for k in RUN_SETTINGS if saved.get(k) != config[k]]
    if diffs:
        raise UserError(f'{path} was made with {", ".join(diffs)}: resume with the same settings, '
                        'or choose a new --output-dir')

# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def save_checkpoint(path, byol, optimizer, scaler, step, config):
    """Everything a resumed run needs, as unwrapped state dicts; written by rank 0 only."""
    if is_main():
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        save_atomic(dict(online=byol.online.state_dict(), target=byol.target.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                         config=config, rng=dict(torch=torch.get_rng_state(), cuda=cuda_rng)),
                    path)
    if world_size() > 1:
        dist.barrier()


@contextlib.contextmanager
def preemption_signals():
    """SIGTERM / SIGUSR1 (preemption, SLURM's --signal) are recorded, not fatal: the loop saves a
    checkpoint and exits cleanly within SYNC_EVERY steps."""
    received = []
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def train(args):
    rank, world, device = setup_distributed()
    # Resume: --resume, or the output folder's last checkpoint. Checked before any heavy work.
    out = Path(args.output_dir)
    check_output_dir(out)
    resume = args.resume or (out / 'checkpoint.pth' if (out / 'checkpoint.pth').exists() else None)
    checkpoint = load_file(resume) if resume else None
    saved = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    images = load_images(args.data, args.data_root, args.download, 'train')
    args = resolve_config(args, images, saved if isinstance(saved, dict) else None)
    config = vars(args).copy()
    if checkpoint is not None:
        check_resumable(checkpoint, config, resume)
    if args.batch_size % world:
        raise UserError(f'--batch-size {args.batch_size} does not divide over {world} processes; '
                        f'use a multiple of {world}')
    torch.manual_seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data: labels are never used for the loss. Small datasets live on the device, cropped and
    # augmented there in whole batches. Otherwise loader workers decode and crop; the
    # photometric half then runs on the GPU over the batch, or, on CPU, in the workers.
    data = images_in_memory(images) if args.data_on_device is not False else None
    if args.data_on_device and data is None:
        raise UserError(f'--data-on-device needs at most {MAX_IN_MEMORY} images of one size')
    if args.decode_on_device and (data is not None or not isinstance(images, FolderImages)):
        raise UserError('--decode-on-device is for image folders read from disk; '
                        'add --no-data-on-device, or drop --decode-on-device')
    augment_on_device = data is not None or args.decode_on_device or device.type == 'cuda'
    if data is not None:
        loader = DeviceCrops(data, args.image_size, args.batch_size // world, args.seed, device)
    else:
        crops = (EncodedCrops if args.decode_on_device else Crops)(
            images, args.image_size, n_views=2, random=True, seed=args.seed)
        loader = make_loader(crops, args.batch_size // world, args.workers, True, args.seed,
                             device, transform=None if augment_on_device else views_in_loader)
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f'{len(images)} images are fewer than one batch of {args.batch_size}; '
                        'lower --batch-size')
    # DEVIATION: the official code counts K = epochs * N // B steps over a repeated stream; we run
    # whole epochs of N // B steps (312,000 instead of 312,784 for 1000 ImageNet epochs).
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256
    eval_loaders = make_eval_loaders(args, images, device) if args.eval_every else None

    # Networks, optimizer, mixed precision.
    encoder, feature_dim = build_encoder(args.arch, args.small_images, args.width)
    byol = BYOL(encoder, feature_dim, args.hidden_dim, args.projection_dim)
    if world > 1:
        byol = synchronize_batchnorm(byol, device)
    memory_format = torch.channels_last if device.type == 'cuda' else torch.contiguous_format
    byol.to(device, memory_format=memory_format)
    optimizer = LARS(lars_param_groups(byol, args.wd), lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')

    step = 0
    if checkpoint is not None:
        byol.online.load_state_dict(checkpoint['online'])
        byol.target.load_state_dict(checkpoint['target'])
        optimizer.load_state_dict(checkpoint['optimizer'])
        if checkpoint['scaler'] and scaler.is_enabled():  # fp16 then and now: its loss scale
            scaler.load_state_dict(checkpoint['scaler'])
        torch.set_rng_state(checkpoint['rng']['torch'])
        step = checkpoint['step']
        if saved.get('amp') != args.amp:
            log(f'note: steps 1-{step} ran with --amp {saved.get("amp")}; the run continues with '
                f'--amp {args.amp}')
        del checkpoint
    model = DistributedDataParallel(byol, device_ids=[device] if device.type == 'cuda' else None) \
        if world > 1 else byol
    if args.compile:  # the forward and backward of both networks; the EMA and LARS stay eager
        model = torch.compile(model)
    if is_main():
        out.mkdir(parents=True, exist_ok=True)
    log('config: ' + json.dumps(config, sort_keys=True))
    log(f'{len(images)} images{" on the device" if data is not None else ""}, {world} '
        f'process(es) on {device.type}, {steps_per_epoch} steps '
        f'of {args.batch_size} per epoch, {total_steps} steps, peak lr {peak_lr:g}, '
        f'{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M encoder parameters'
        + (f'; resumed from {resume} at step {step}' if resume else ''))

    model.train()  # the target too: its BN uses batch statistics (SPEC.md section 0)
    start_time, start_step, stopped = time.time(), step, False
    window_time, window_loss, window_steps = start_time, torch.zeros((), device=device), 0
    with preemption_signals() as received:
        for epoch in range(step // steps_per_epoch, args.epochs):
            loader.sampler.set_epoch(epoch, skip=(step % steps_per_epoch) * loader.batch_size)
            epoch_loss, epoch_steps = torch.zeros((), device=device), 0
            for batch in loader:
                if args.decode_on_device:
                    names = [images.name(i) for i in batch[3].tolist()]
                    batch = (decode_crops(batch[0], batch[1], args.image_size, device, names),
                             batch[1])
                v1, v2 = (t.to(device, non_blocking=True) for t in batch[:2])
                if augment_on_device:
                    v1, v2 = two_views(v1, v2)  # (crops, uniforms) -> views (b, 3, S, S) x 2
                v1, v2 = (v.contiguous(memory_format=memory_format) for v in (v1, v2))

                lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group['lr'] = lr
                # DEVIATION: the paper trains in float32; --amp bf16 (the default where it is
                # faster: GPUs, AMX CPUs) runs the convolutions and matmuls in bfloat16, close
                # to what TPUs do with JAX's default precision; a CIFAR run learns the same
                # within seed noise (README, "Precision").
                with autocast(device, args.amp):
                    loss, z_std = model(v1, v2, return_std=True)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)                   # online: theta <- LARS(theta, grad)
                scaler.update()
                tau = target_tau(step, total_steps, args.tau)
                byol.update_target(tau)                  # target: xi <- tau xi + (1 - tau) theta
                step += 1
                window_loss += loss.detach()
                epoch_loss += loss.detach()
                window_steps += 1
                epoch_steps += 1

                log_now = step % args.log_every == 0 or step % steps_per_epoch == 0
                if not (log_now or step % SYNC_EVERY == 0 or step == args.stop_at_step):
                    continue
                # One synchronisation every few steps: global mean loss, collapse signal, and
                # whether any process received a preemption signal (all must stop together).
                stats = torch.stack([window_loss / window_steps, z_std.detach().float(),
                                     torch.tensor(float(bool(received)), device=device)])
                if world > 1:
                    dist.all_reduce(stats)
                    stats /= world
                loss_mean, std, stop = stats.tolist()
                if not math.isfinite(loss_mean):
                    kept = out / 'checkpoint.pth'
                    raise UserError(f'the loss is {loss_mean} at step {step}; lower --lr or use '
                                    '--amp none; ' + (f'{kept} keeps the last good state' if
                                                      kept.exists() else 'nothing was saved'))
                if log_now or stop or step == args.stop_at_step:
                    now = time.time()
                    eta = (now - start_time) / (step - start_step) * (total_steps - step)
                    log(f'step {step}/{total_steps} | ep {epoch} | loss {loss_mean:.4f} | '
                        f'lr {lr:.4g} | tau {tau:.5f} | z_std {std:.4f} | '
                        f'{args.batch_size * window_steps / (now - window_time):.0f} img/s | '
                        f'eta {format_time(eta)}')
                    window_time, window_loss, window_steps = now, torch.zeros((), device=device), 0
                if stop or step == args.stop_at_step:
                    stopped = True
                    break

            if step % steps_per_epoch == 0:  # the epoch is complete
                if world > 1:
                    dist.all_reduce(epoch_loss)
                    epoch_loss /= world
                record = dict(epoch=epoch, step=step, loss=epoch_loss.item() / epoch_steps,
                              lr=lr, tau=tau, z_std=std, time=time.time() - start_time)
                if eval_loaders and (epoch + 1) % args.eval_every == 0:
                    record['knn_top1'] = knn_evaluation(byol.online.encoder, eval_loaders,
                                                        device, args.amp)
                    log(f'epoch {epoch}: kNN top-1 {record["knn_top1"]:.2f}%')
                save_checkpoint(out / 'checkpoint.pth', byol, optimizer, scaler, step, config)
                if is_main():
                    with open(out / 'log.jsonl', 'a') as f:
                        f.write(json.dumps(record) + '\n')
            elif stopped:
                save_checkpoint(out / 'checkpoint.pth', byol, optimizer, scaler, step, config)
            if stopped:
                log(f'stopped by {"a signal" if stop else "--stop-at-step"} at step {step}; '
                    f'checkpoint saved in {out}; run the same command again to resume')
                return
    if is_main():
        settings = {k: config[k] for k in ENCODER_SETTINGS}
        save_atomic((json.dumps(settings) + '\n').encode(), settings_file(out / 'encoder.pth'))
        save_atomic(byol.online.encoder.state_dict(), out / 'encoder.pth')
        log(f'done: {out / "checkpoint.pth"}; encoder exported to {out / "encoder.pth"} (its '
            f'settings in {settings_file(out / "encoder.pth")})')


def make_eval_loaders(args, train_images, device):
    """Labelled loaders for the kNN monitor: (train memory bank, test split), centre crops."""
    test_images = load_images(args.data, args.data_root, args.download, 'val')
    if args.eval_train_images and args.eval_train_images < len(train_images):
        train_images = Subset(train_images, random_indices(len(train_images),
                                                           args.eval_train_images, args.seed))
    return [make_loader(Crops(images, args.image_size, n_views=1, random=False), 256,
                        args.workers, False, args.seed, device)
            for images in (train_images, test_images)]


def knn_evaluation(encoder, loaders, device, amp):
    """kNN top-1 (%) of the encoder's frozen features: training split as the memory bank."""
    (train_x, train_y), (test_x, test_y) = (extract_features(encoder, loader, device, amp)
                                            for loader in loaders)
    n_classes = len(loaders[0].dataset.images.classes)
    return topk_accuracy(knn_predict(train_x, train_y, test_x, n_classes), test_y, ks=(1,))[0]


def run_cli(prog, run, parser, argv=None):
    """run(parser's arguments), with a UserError printed as one line ('prog: error: ...') and
    exit status 2; shared by every script of the project."""
    try:
        return run(parser.parse_args(argv))
    except UserError as e:
        print(f'{prog}: error: {e}', file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv=None):
    run_cli('byol.py', train, get_parser(), argv)


if __name__ == '__main__':
    main()

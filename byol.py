"""byol.py: BYOL pretraining ("Bootstrap Your Own Latent", Grill et al., NeurIPS 2020).

An online network (encoder f, projector g, predictor q) learns to predict, from one augmented view
of an image, the projection that a target network (f', g') makes of another view. The target's
weights are an exponential moving average of the online ones; no negative pairs are used.
Paper sections: 3.1 (method), 3.3 (implementation), appendices A, B, J. Numbers: ../shared/SPEC.md.
The method and its loop, in the paper's order; the data side (image sources, T and T', the
loader) is augment.py; evaluation is linear_eval.py, semi_sup.py and transfer.py.

Commands
    python byol.py --data cifar10 --data-root DIR --arch convnet --batch-size 256 --epochs 10 # CPU
    python byol.py --data /imagenet                    # one GPU, paper defaults (1000 epochs)
    torchrun --nproc_per_node=8 byol.py --data /imagenet --output-dir runs/r50
        (several nodes, SLURM and preemption: README.md)
  The same command again resumes from <output-dir>/checkpoint.pth. The final encoder goes to
  <output-dir>/encoder.pth (for torchvision.models.<arch>()), its settings to encoder.json.

Measured (README.md has the table): CIFAR-10 JPEG folder, --arch convnet --width 16, one epoch
(390 x 128, float32) in 1.4 min, 2 CPU cores: linear probe 42.2% (random) -> 45.0% (BYOL), 3 seeds.
"""
import argparse
import copy
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
from torch.nn.parallel import DistributedDataParallel
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import augment
from augment import UserError

# epochs: (base lr, weight decay, base tau), from the official configs/byol.py (SPEC.md section 0).
PRESETS = {40: (0.45, 1e-6, 0.97), 100: (0.45, 1e-6, 0.99), 300: (0.3, 1e-6, 0.99),
           1000: (0.2, 1.5e-6, 0.996)}
# DEVIATION: runs under 40 epochs (no paper preset) take the short-run recipe (README.md, "Short
# runs"): these, warmup epochs / 10 (10 would fill the run), g and q sized to f (resolve_config).
SHORT_RUN = (4.0, 1e-6, 0.99)
ARCHS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet200', 'convnet')
AMP_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16, 'none': torch.float32}
AMP_CHOICES = tuple(AMP_DTYPES)  # autocast precisions, the same in every script
# What an encoder needs to be rebuilt and fed: travels with it (checkpoint.pth, encoder.json).
ENCODER_SETTINGS = ('arch', 'width', 'small_images', 'image_size')
# Settings that define a run: a resumed run must use the same ones.
RUN_SETTINGS = ('arch', 'width', 'small_images', 'image_size', 'hidden_dim', 'projection_dim',
                'epochs', 'batch_size', 'lr', 'wd', 'tau', 'warmup_epochs', 'seed',
                'no_predictor', 'constant_tau')
SYNC_EVERY = 5  # steps between the loop's host synchronisations (loss check, preemption flag)

# ------------------------------------------------------------------------------------------------
# Encoder f (paper section 3.3: ResNet-50; wider and deeper ResNets, Table 1b)
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

# ------------------------------------------------------------------------------------------------
# Projector g and predictor q (paper section 3.3)
# ------------------------------------------------------------------------------------------------


def mlp(in_dim, hidden_dim, out_dim):
    """Projector g and predictor q: Linear -> BN -> ReLU -> Linear, nothing on the output,
    initialised as the official code. DEVIATION: the last Linear has no bias, as the official
    code (appendix J's pseudo-code has one)."""
    return official_init(nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim, bias=False)))

# ------------------------------------------------------------------------------------------------
# The loss (paper Eq. 2 and its symmetrisation)
# ------------------------------------------------------------------------------------------------


def regression_loss(p, z):
    """Paper Eq. 2: ||p/||p|| - z/||z|| ||^2 = 2 - 2 cos(p, z), per sample: (B, d) -> (B,)."""
    p = F.normalize(p.float(), dim=-1, eps=1e-6)  # eps^2 = 1e-12 on the squared norm, as official
    z = F.normalize(z.float(), dim=-1, eps=1e-6)
    return 2 - 2 * (p * z).sum(dim=-1)


def symmetric_loss(q1, q2, z1_target, z2_target):
    """L + L~: each view's prediction of the other view's target projection, summed over the two
    orders (not averaged, as the official code), mean over the batch."""
    return (regression_loss(q1, z2_target) + regression_loss(q2, z1_target)).mean()


def projection_std(z):
    """Std over the batch of the l2-normalised projections, averaged over dimensions: ~0 when the
    representation has collapsed to a constant, ~1/sqrt(d) when it spreads over the sphere."""
    return F.normalize(z.detach().float(), dim=-1).std(dim=0).mean()

# ------------------------------------------------------------------------------------------------
# The BYOL module: online and target networks (paper section 3.1)
# ------------------------------------------------------------------------------------------------


class BYOL(nn.Module):
    """Online network (f, g, q) and target network (f', g'): forward(v1, v2, labels) -> (loss,
    monitor), monitor = (BYOL loss, projection std, classifier top-1), detached.

    Both views go through each network in separate calls (per-view BN statistics, as the
    official code), inside one forward so that DDP sees one call per step. The target runs with
    BN in training mode (batch statistics, its own running stats) and receives no gradient.
    With n_classes, the official code's monitor: a linear classifier trained on the online
    representation of v1 under stop-gradient (its cross-entropy is added to the loss but reaches
    nothing else); its top-1 is what the official code reports."""

    def __init__(self, encoder, feature_dim, hidden_dim=4096, projection_dim=256, n_classes=0,
                 predictor=True):
        super().__init__()
        self.online = nn.ModuleDict(dict(
            encoder=encoder,                                        # f_theta
            projector=mlp(feature_dim, hidden_dim, projection_dim),  # g_theta
            predictor=mlp(projection_dim, hidden_dim, projection_dim)))  # q_theta
        if not predictor:  # ABLATION (--no-predictor, paper Table 5b): q is the identity, the
            self.online['predictor'] = nn.Identity()  # online projection regresses the target's
        if n_classes:
            self.online['classifier'] = official_init(nn.Linear(feature_dim, n_classes))
        # DEVIATION (minor): the target starts as a copy of the online network, as the paper's
        # appendix J; the official code draws it from another seed ("no noticeable difference").
        self.target = nn.ModuleDict(dict(encoder=copy.deepcopy(encoder),  # f_xi
                                         projector=copy.deepcopy(self.online.projector)))  # g_xi
        self.target.requires_grad_(False)

    def forward(self, v1, v2, labels=None):
        online, target = self.online, self.target
        y1 = online.encoder(v1)                               # (B, 2048) representation
        z1, z2 = online.projector(y1), online.projector(online.encoder(v2))  # (B, 256)
        q1, q2 = online.predictor(z1), online.predictor(z2)   # (B, 256) predictions
        with torch.no_grad():                                 # sg(z'): stop-gradient
            t1 = target.projector(target.encoder(v1))         # (B, 256) target projections
            t2 = target.projector(target.encoder(v2))
        byol_loss = symmetric_loss(q1, q2, t1, t2)
        loss, top1 = byol_loss, torch.zeros((), device=v1.device)
        if 'classifier' in online and labels is not None:
            logits = online.classifier(y1.detach()).float()  # (B, classes), on sg(y1)
            labelled = labels >= 0  # (-1: an unlabelled image, as STL-10's)
            n = labelled.sum().clamp(1)
            loss = loss + F.cross_entropy(logits, labels, ignore_index=-1, reduction='sum') / n
            top1 = ((logits.argmax(1) == labels) & labelled).sum() / n
        return loss, torch.stack([byol_loss.detach(), projection_std(z1), top1.detach()])

    def online_target_pairs(self):
        """(theta, xi): the online parameters that the target's mirror, in the same order."""
        online = [*self.online.encoder.parameters(), *self.online.projector.parameters()]
        return online, list(self.target.parameters())

    @torch.no_grad()
    def update_target(self, tau):
        """Paper section 3.1: xi <- tau xi + (1 - tau) theta, for the parameters only (BN gamma
        and beta included; BN running statistics are the target's own, as the official code)."""
        for theta, xi in zip(*self.online_target_pairs()):
            xi.mul_(tau).add_(theta, alpha=1 - tau)

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
    No host synchronisation: the norms stay on the device."""

    def __init__(self, params, lr=0.0, momentum=0.9, weight_decay=0.0, eta=1e-3):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for w in group['params']:
                if w.grad is None:
                    continue
                u = w.grad
                if group['lars']:
                    u = u + group['weight_decay'] * w
                    w_norm, u_norm = w.norm(), u.norm()
                    u = u * torch.where((w_norm > 0) & (u_norm > 0),
                                        group['eta'] * w_norm / u_norm, 1.0)
                m = self.state[w].setdefault('momentum_buffer', torch.zeros_like(w))
                m.mul_(group['momentum']).add_(u)
                w.add_(m, alpha=-group['lr'])


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
# Distributed setup (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK), BN over the global batch
# ------------------------------------------------------------------------------------------------


def setup_distributed():
    """-> (rank, world_size, device). One process per GPU under torchrun; gloo on CPU."""
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    rank, world, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    device = torch.device('cuda', local_rank) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(device)
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
    m, s = divmod(int(seconds), 60)
    return f'{m // 60}h{m % 60:02d}m' if m >= 60 else f'{m}m{s:02d}s'


def all_reduce_sum(t):
    """t summed over all processes, in place (unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


class SyncBatchNormFunction(torch.autograd.Function):
    """y = gamma (x - mean) / sqrt(var + eps) + beta with the global batch's statistics, in x's
    dtype; the backward all-reduces the sums of dy and dy x_hat, the input gradient's only global
    terms (as nn.SyncBatchNorm's): dx = gamma invstd (dy - mean(dy) - x_hat mean(dy x_hat))."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps, count):
        ctx.save_for_backward(x, weight, mean, var, count)
        ctx.eps = eps
        return F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, var, count = ctx.saved_tensors
        shape, dims = (1, -1) + (1,) * (dy.dim() - 2), [0, *range(2, dy.dim())]
        invstd, dy = (var + ctx.eps).rsqrt(), dy.float()
        x_hat = (x.float() - mean.view(shape)) * invstd.view(shape)
        local = torch.stack([dy.sum(dims), (dy * x_hat).sum(dims)])  # (2, C): d beta, d gamma
        mean_dy, mean_dy_x_hat = (all_reduce_sum(local.double()) / count).float()
        dx = (dy - mean_dy.view(shape) - x_hat * mean_dy_x_hat.view(shape)) * \
            (weight * invstd).view(shape)
        return dx.to(x.dtype), local[1], local[0], None, None, None, None


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm with the statistics of the global batch, on CPUs (gloo) and GPUs (NCCL) alike,
    with no host synchronisation (nn.SyncBatchNorm is CUDA-only and waits for the host at
    every call, 218 times a ResNet-50 step). One all-reduce in the forward, in float64, of each
    process's count n, n mean and n (var + mean^2), from its own float32 var_mean: the global
    variance is never E[x^2] - E[x]^2 of float32 sums, which cancels when |mean| >> std (at
    mean/std = 1000 that lost 10% of it); one all-reduce in the backward."""

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
        return SyncBatchNormFunction.apply(x, self.weight, self.bias, mean.float(), var.float(),
                                           self.eps, n[0])


def synchronize_batchnorm(module):
    """BN statistics over the global batch (SPEC.md section 1): every BN of the module becomes
    an AllReduceBatchNorm in place, parameters and buffers kept (state dicts unchanged)."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.__class__ = AllReduceBatchNorm
    return module


def autocast(device, amp):
    dtype = AMP_DTYPES.get(amp, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def default_amp():
    """The autocast precision that is faster on this hardware: bf16 where it is native, on
    GPUs from Ampere on (is_bf16_supported() is also true before, by slow emulation) and on
    CPUs with AMX (measured 1.9x for a ResNet-18 step, bench/RESULTS.md), float32 elsewhere
    (bf16 ran at 0.73x of float32 with AVX-512 BF16 but no AMX, and 0.32x with neither)."""
    if torch.cuda.is_available():
        return 'bf16' if torch.cuda.get_device_capability()[0] >= 8 else 'none'
    return 'bf16' if getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)() else 'none'

# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, unwrapped state dicts; load_encoder for the evaluation scripts
# ------------------------------------------------------------------------------------------------


def save_atomic(obj, path):
    """torch.save (or, for bytes, a plain write) to a temporary file, flushed to disk, then
    renamed: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def save_checkpoint(path, byol, optimizer, scaler, step, config):
    """Everything a resumed run needs, as unwrapped state dicts; written by rank 0 only."""
    if is_main():
        cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        save_atomic(dict(online=byol.online.state_dict(), target=byol.target.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                         config=config, rng=dict(torch=torch.get_rng_state(), cuda=cuda_rng)), path)
    if world_size() > 1:
        dist.barrier()


def find_checkpoint(resume, out):
    """-> (path, checkpoint) or (None, None), as rank 0 finds them (--resume, else the output
    folder's checkpoint.pth), sent whole to every process: where the output folders are local
    to each node, the other nodes would start afresh."""
    found = [None, None, None]  # path, checkpoint, error
    if is_main():
        found[0] = resume or (out / 'checkpoint.pth' if (out / 'checkpoint.pth').exists() else None)
        try:
            found[1] = load_file(found[0]) if found[0] else None
        except UserError as e:
            found[2] = str(e)
    if world_size() > 1:
        dist.broadcast_object_list(found, src=0)
    if found[2]:
        raise UserError(found[2])
    return found[:2]


def check_resumable(checkpoint, config, path):
    """A checkpoint of another run (architecture, batch, schedule) cannot be resumed."""
    if not isinstance(checkpoint, dict) or not {'online', 'config'} <= checkpoint.keys():
        raise UserError(f'{path} is not a byol.py training checkpoint; pass --resume a '
                        'checkpoint.pth written by byol.py')
    saved = {'no_predictor': False, 'constant_tau': False, **checkpoint['config']}  # (older)
    diffs = [f'--{k.replace("_", "-")} {saved.get(k)} (now {config[k]})'
             for k in RUN_SETTINGS if saved.get(k) != config[k]]
    if diffs:
        raise UserError(f'{path} was made with {", ".join(diffs)}: resume with the same settings, '
                        'or choose a new --output-dir')


def settings_file(path):
    """encoder.pth -> encoder.json: the encoder's settings (ENCODER_SETTINGS) beside its plain
    state dict, which torchvision's loader then reads as it is."""
    return Path(path).with_suffix('.json')


def export_encoder(encoder, settings, out):
    """out/encoder.pth (a plain torchvision state dict, fc removed), encoder.json beside it."""
    save_atomic((json.dumps(settings) + '\n').encode(), settings_file(out / 'encoder.pth'))
    save_atomic(encoder.state_dict(), out / 'encoder.pth')


def check_output_dir(path):
    """Fail at once, before any data is read or model built, if the folder cannot be created
    or written (a file in the way, no permission); nothing is created here."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    problem = 'is a file, not a folder' if not existing.is_dir() else None if os.access(
        existing, os.W_OK | os.X_OK) else 'is not writable'
    if problem:
        raise UserError(f'--output-dir {path}: {existing} {problem}; choose another --output-dir')

# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------


def train(args, received):
    _, world, device = setup_distributed()
    out = Path(args.output_dir)
    check_output_dir(out)
    resume, checkpoint = find_checkpoint(args.resume, out)  # before any heavy work
    saved = checkpoint.get('config') if isinstance(checkpoint, dict) else None
    images = augment.load_images(args.data, args.data_root, args.download, 'train')
    args = resolve_config(args, images, saved if isinstance(saved, dict) else None)
    config = vars(args).copy()
    if checkpoint is not None:
        check_resumable(checkpoint, config, resume)
    if args.batch_size % world:
        raise UserError(f'--batch-size {args.batch_size} does not divide over {world} processes; '
                        f'use a multiple of {world}')
    steps_per_epoch = len(images) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f'{len(images)} images are fewer than one batch of {args.batch_size}; '
                        'lower --batch-size')
    torch.manual_seed(args.seed)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data (augment.py): batches of two views on the device, labels only for the monitor.
    batches, where = augment.batches(images, args.image_size, args.batch_size // world, 'byol',
                                     args.seed, device, args.workers, args.data_on_device,
                                     args.on_device, dtype=AMP_DTYPES[args.amp])
    n_classes = len(images.classes) if len(images.classes) > 1 else 0
    val = augment.batches(augment.load_images(args.data, args.data_root, args.download, 'val'),
                          args.image_size, 256, 'eval', device=device, workers=args.workers)[0] \
        if args.eval_every and n_classes else None  # the monitor's labelled split
    # DEVIATION: the official code counts K = epochs * N // B steps over a repeated stream; we run
    # whole epochs of N // B steps (312,000 instead of 312,784 for 1000 ImageNet epochs).
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256

    # Networks, optimizer, mixed precision.
    encoder, feature_dim = build_encoder(args.arch, args.small_images, args.width)
    byol = BYOL(encoder, feature_dim, args.hidden_dim, args.projection_dim, n_classes,
                predictor=not args.no_predictor)
    if world > 1:
        byol = synchronize_batchnorm(byol)
    memory_format = torch.channels_last if device.type == 'cuda' or args.arch == 'convnet' else \
        torch.contiguous_format  # on CPUs: convnet 1.47x, ResNet-18 0.75x (bench/RESULTS.md)
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
            log(f'note: steps 1-{step} ran with --amp {saved.get("amp")}, the rest '
                f'--amp {args.amp}')
        del checkpoint
    model = DistributedDataParallel(byol, device_ids=[device] if device.type == 'cuda' else None) \
        if world > 1 else byol
    if args.compile:  # the forward and backward of both networks; the EMA and LARS stay eager
        model = torch.compile(model)
    log('recipe: ' + (f'short run (--epochs {args.epochs} < 40, the paper\'s shortest preset; '
        'README.md, "Short runs")' if args.epochs < 40 else 'the paper\'s preset') + '; flags win')
    log('config: ' + json.dumps(config, sort_keys=True))
    log(f'{where}; {world} process(es), {steps_per_epoch} steps of {args.batch_size} per epoch, '
        f'{total_steps} steps, peak lr {peak_lr:g}, '
        f'{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M encoder parameters'
        + (f'; resumed from {resume} at step {step}' if resume else ''))

    model.train()  # the target too: its BN uses batch statistics (SPEC.md section 0)
    start_time, start_step, stopped = time.time(), step, False
    window_time, window = start_time, torch.zeros(4, device=device)  # monitor sums, steps
    for epoch in range(step // steps_per_epoch, args.epochs):
        batches.set_epoch(epoch, skip_batches=step % steps_per_epoch)
        epoch_sums = torch.zeros(4, device=device)
        for (v1, v2), labels, _ in batches:  # v1 ~ T, v2 ~ T' (B, 3, S, S), normalised
            v1, v2 = (v.contiguous(memory_format=memory_format) for v in (v1, v2))
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr
            # DEVIATION: the paper trains in float32; --amp bf16 (the default where faster)
            # multiplies in bfloat16, as TPUs do under JAX's default precision; a CIFAR run
            # learns the same within seed noise (README, "Precision").
            with autocast(device, args.amp):
                loss, monitor = model(v1, v2, labels if n_classes else None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)                   # online: theta <- LARS(theta, grad)
            scaler.update()
            tau = args.tau if args.constant_tau else target_tau(step, total_steps, args.tau)
            byol.update_target(tau)                  # target: xi <- tau xi + (1 - tau) theta
            step += 1
            window += (counted := torch.cat([monitor, monitor.new_ones(1)]))  # and steps
            epoch_sums += counted

            log_now = step % args.log_every == 0 or step % steps_per_epoch == 0
            if not (log_now or step % SYNC_EVERY == 0 or step == args.stop_at_step):
                continue
            # One synchronisation every few steps: the global means of the monitor (BYOL
            # loss, projection std, classifier top-1) and whether any process received a
            # preemption signal (all must stop together).
            stats = all_reduce_sum(torch.cat([window[:3] / window[3], torch.full(
                (1,), float(bool(received)), device=device)])) / world  # (a fill: no copy)
            loss_mean, z_std, top1, stop = stats.tolist()
            if not math.isfinite(loss_mean):
                kept = out / 'checkpoint.pth'
                raise UserError(f'the loss is {loss_mean} at step {step}; lower --lr or use '
                                '--amp none; ' + (f'{kept} keeps the last good state' if
                                                  kept.exists() else 'nothing was saved'))
            if log_now or stop or step == args.stop_at_step:
                now = time.time()
                eta = (now - start_time) / (step - start_step) * (total_steps - step)
                log(f'step {step}/{total_steps} | ep {epoch} | loss {loss_mean:.4f} | '
                    f'lr {lr:.4g} | tau {tau:.5f} | z_std {z_std:.4f} | '
                    + (f'top-1 {100 * top1:.1f}% | ' if n_classes else '')
                    + f'{args.batch_size * window[3] / (now - window_time):.0f} img/s | '
                    f'eta {format_time(eta)}')
                window_time, window = now, torch.zeros(4, device=device)
            if stop or step == args.stop_at_step:
                stopped = True
                break

        if step % steps_per_epoch == 0:  # the epoch is complete
            loss, z_std, top1 = (all_reduce_sum(epoch_sums[:3]) / world / epoch_sums[3]).tolist()
            record = dict(epoch=epoch, step=step, loss=loss, lr=lr, tau=tau, z_std=z_std,
                          time=time.time() - start_time)
            if n_classes:
                record['train_top1'] = 100 * top1
            if val and (epoch + 1) % args.eval_every == 0:
                record['val_top1'] = classifier_top1(byol.online, val, device, args.amp)
                log(f'epoch {epoch}: the monitor\'s validation top-1 {record["val_top1"]:.2f}%')
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
        export_encoder(byol.online.encoder, {k: config[k] for k in ENCODER_SETTINGS}, out)
        log(f'done: {out / "checkpoint.pth"}; encoder exported to {out / "encoder.pth"} (its '
            f'settings in {settings_file(out / "encoder.pth")})')


@torch.no_grad()
def classifier_top1(online, batches, device, amp):
    """Top-1 (%) of the monitor's classifier on the batches, BN in eval mode (running stats),
    over all processes."""
    online.eval()
    counts = torch.zeros(2, device=device)
    batches.set_epoch(0)
    for (x,), labels, _ in batches:
        with autocast(device, amp):
            correct = online.classifier(online.encoder(x)).argmax(1) == labels
        counts += torch.stack([correct.sum(), labels.new_tensor(len(x))])
    online.train()
    correct, total = all_reduce_sum(counts).tolist()
    return 100 * correct / total

# ------------------------------------------------------------------------------------------------
# The command line: paper defaults, presets keyed by epochs, one-line errors
# ------------------------------------------------------------------------------------------------


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage block
        raise UserError(f'{message} (see {self.prog} --help)')


def _number(cast, low, name, strict=True):
    """An argparse type: cast(text), above `low` (strict) or at least `low`."""
    def parse(text):
        try:
            value = cast(text)
        except ValueError:
            value = math.nan
        if not (value > low if strict else value >= low):  # (NaN fails both)
            raise argparse.ArgumentTypeError(f'{text!r} is not {name}')
        return value
    return parse


positive_int = _number(int, 0, 'a positive integer')
nonnegative_int = _number(int, 0, 'an integer >= 0', strict=False)
positive_float = _number(float, 0, 'a positive number')
nonnegative_float = _number(float, 0, 'a number >= 0', strict=False)
fraction = _number(lambda text: float(text) if float(text) <= 1 else math.nan, 0,
                   'in [0, 1]', strict=False)  # tau


def get_parser():
    p = ArgumentParser(prog='byol.py', description='BYOL pretraining (Grill et al., 2020).')
    a = p.add_argument
    a('--data', required=True, help='an ImageNet-style folder (DATA/train/<class>/<image> or '
      'DATA/<class>/<image>), or one of ' + ', '.join(augment.NAMED_DATASETS))
    a('--data-root', default='data', help='where named datasets live (default: ./data)')
    a('--download', action='store_true', help='download a named dataset if it is missing')
    a('--arch', default='resnet50', choices=ARCHS, help='encoder f (paper: resnet50; resnet18 '
      'and resnet34 are torchvision\'s, not the paper\'s nor the official ResNet18, whose first '
      'block has a 1x1 projection shortcut: 11,180,736 vs 11,176,512 encoder parameters)')
    a('--width', type=positive_int, help='ResNet multiplier 1, 2, 4 (Table 1b; default 1); '
      'convnet: the first layer width (default 32)')
    a('--small-images', action=argparse.BooleanOptionalAction, help='3x3 stride-1 stem and no '
      'max-pool (default: on when --image-size <= 64)')
    a('--image-size', type=positive_int, help='crop size (paper: 224; default: 224, or the native '
      'size of a dataset whose images all share one smaller size, e.g. CIFAR\'s 32)')
    a('--hidden-dim', type=positive_int, help='g, q hidden (paper: 4096; short runs: 4x dim y)')
    a('--projection-dim', type=positive_int, help='output of g, q (paper: 256; short runs: dim y)')
    a('--epochs', type=positive_int, default=1000, help='paper headline: 1000; sets the preset '
      'of --lr, --wd and --tau: ' + ', '.join(f'{e} ep: {v}' for e, v in PRESETS.items()) +
      f' (the smallest preset with at least this many epochs); short runs: {SHORT_RUN}')
    a('--batch-size', type=positive_int, default=4096, help='global batch (paper: 4096)')
    a('--lr', type=positive_float, help='base lr; peak lr = lr x batch / 256 (preset)')
    a('--wd', type=nonnegative_float, help='LARS weight decay (preset)')
    a('--tau', type=fraction, help='base EMA rate tau of the target, cosine to 1 (preset)')
    a('--warmup-epochs', type=nonnegative_float, help='lr warmup (paper: 10; short: epochs / 10)')
    a('--no-predictor', action='store_true', help='ablation (paper Table 5b): q is the identity')
    a('--constant-tau', action='store_true', help='ablation: tau stays --tau, no cosine to 1 '
      '(--tau 0: the target is the online network under stop-gradient, paper Table 5a)')
    a('--data-on-device', action=argparse.BooleanOptionalAction, help='hold the dataset on the '
      f'device, crop there (default: named datasets, folders of <= {augment.MAX_IN_MEMORY})')
    a('--on-device', choices=('views', 'crop', 'decode'), help='image folders: first stage on '
      'the GPU (default views: workers decode, crop; crop: workers decode; decode: nvJPEG)')
    a('--compile', action='store_true', help='torch.compile the networks (opt-in: DDP with '
      'synchronised BN under compile has open upstream failure reports)')
    a('--workers', type=nonnegative_int, help='data-loader processes per process (default: '
      'the cores it may use, shared among the node\'s processes, less one)')
    a('--seed', type=int, default=0, help='seeds the initialisation, data order, augmentations')
    a('--amp', choices=AMP_CHOICES, help='autocast precision (default: bf16 where native, GPUs '
      'from Ampere on and CPUs with AMX, else none; a resumed run keeps its own)')
    a('--output-dir', default='runs/byol', help='checkpoint.pth, encoder.pth, log.jsonl')
    a('--resume', help='checkpoint to resume from (default: <output-dir>/checkpoint.pth)')
    a('--stop-at-step', type=positive_int, help='save and stop after this step (the schedules '
      'stay those of the full run)')
    a('--log-every', type=positive_int, default=20, help='steps between progress lines')
    a('--eval-every', type=nonnegative_int, default=0, help='every N epochs, the monitor\'s '
      'validation top-1 (named datasets: test; folders: DATA/val); 0: never')
    return p


def resolve_config(args, images, saved=None):
    """Fill the defaults that depend on other settings or on the data: image size and stem
    (augment.default_image_size), width, the recipe by epochs (a paper preset, or the short-run
    recipe under 40), precision (that of `saved`, the resumed checkpoint's config), workers."""
    args.image_size = args.image_size or augment.default_image_size(images)  # (None: not given)
    args.small_images = args.image_size <= 64 if args.small_images is None else args.small_images
    args.width = args.width or (32 if args.arch == 'convnet' else 1)
    dim = 8 * args.width if args.arch == 'convnet' else 512 * args.width * RESNET_LAYERS[
        args.arch][0].expansion  # f's feature width (build_encoder), which sizes short runs' heads
    recipe = SHORT_RUN + (args.epochs / 10, min(4096, 4 * dim), min(256, dim)) if args.epochs < 40 \
        else PRESETS[min((e for e in PRESETS if e >= args.epochs), default=1000)] + (10, 4096, 256)
    names = ('lr', 'wd', 'tau', 'warmup_epochs', 'hidden_dim', 'projection_dim')
    vars(args).update({k: v for k, v in zip(names, recipe) if getattr(args, k) is None})
    args.amp = args.amp or (saved['amp'] if saved and saved.get('amp') in AMP_CHOICES else
                            default_amp())
    args.workers = augment.default_workers() if args.workers is None else args.workers
    return args


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
    # SIGTERM / SIGUSR1 (preemption, SLURM's --signal), from the start: recorded, not fatal; the
    # loop saves a checkpoint and stops within SYNC_EVERY steps.
    received = []
    previous = {s: signal.signal(s, lambda signum, _: received.append(signum))
                for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        run_cli('byol.py', lambda args: train(args, received), get_parser(), argv)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == '__main__':
    main()

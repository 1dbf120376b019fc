"""byol.py: BYOL pretraining ("Bootstrap Your Own Latent", Grill et al., NeurIPS 2020).

An online network (encoder f, projector g, predictor q) learns to predict, from one augmented view
of an image, the projection that a target network (f', g') makes of another view. The target's
weights are an exponential moving average of the online ones; no negative pairs are used.
Paper sections: 3.1 (method), 3.3 (implementation), appendices A, B, J. Numbers: ../shared/SPEC.md.

Read it with the paper open: the method comes first, in the paper's order (networks f, g, q; the
loss; the BYOL module and its target update; the schedules of tau and the lr; LARS; one training
step). The running of it follows under its own banner: processes and the synchronised BN,
precision, checkpoints, the loop and its bookkeeping, the command line. The data side (image
sources, T and T', the loader) is augment.py; evaluation is linear_eval.py, semi_sup.py and
transfer.py.

Commands
    python byol.py --data ../shared/data/cifar10 --arch convnet --width 16 --batch-size 128 \
        --epochs 3 --output-dir runs/cifar                                    # CPU, minutes
    python byol.py --data /imagenet                    # one GPU, the paper's defaults (1000 epochs)
    torchrun --nproc_per_node=8 byol.py --data /imagenet --output-dir runs/r50
        (several nodes, SLURM and preemption: README.md)
  The same command again resumes from <output-dir>/checkpoint.pth. The final encoder goes to
  <output-dir>/encoder.pth (for torchvision.models.<arch>()), its settings to encoder.json.

Measured (README.md has the tables): CIFAR-10 JPEG folder, --arch convnet --width 16, batch 128,
3 epochs in 6 CPU-minutes (2 cores, float32): linear probe 42.2% (random init) -> 48.2%, 3 seeds.
"""
import argparse
import copy
import inspect
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

# The official configs/byol.py's presets, keyed by epochs: (base lr, weight decay, base tau)
# (SPEC.md section 0).
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

# ================================================================================================
# The method (paper section 3)
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# Encoder f (paper section 3.3: ResNet-50; wider and deeper ResNets, Table 1b)
# ------------------------------------------------------------------------------------------------


# Every BN of f, g and q is BatchNorm (below, with the processes): the official code's, whose
# running statistics are Haiku's, and whose batch statistics are the global batch's under torchrun.


def convnet(width=32):
    """A small encoder for CPU runs: four 3x3 conv-BN-ReLU layers of width w, 2w, 4w, 8w, max-pool
    after the first three, global average pool. Not in the paper."""
    layers, channels = [], 3
    for i, out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        if i < 3:
            pool = nn.MaxPool2d(2)
        else:
            pool = nn.Identity()
        layers.append(nn.Sequential(nn.Conv2d(channels, out, 3, padding=1, bias=False),
                                    BatchNorm(out), nn.ReLU(inplace=True), pool))
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


RESNET_LAYERS = {'resnet18': (BasicBlock, [2, 2, 2, 2]), 'resnet34': (BasicBlock, [3, 4, 6, 3]),
                 'resnet50': (Bottleneck, [3, 4, 6, 3]), 'resnet101': (Bottleneck, [3, 4, 23, 3]),
                 'resnet152': (Bottleneck, [3, 8, 36, 3]),
                 'resnet200': (Bottleneck, [3, 24, 36, 3])}


def resnet(arch, width=1):
    """torchvision's ResNet, with every layer's channels multiplied by `width` for the paper's
    ResNet-50 (2x) and (4x) (stem and outputs too; torchvision's wide_resnet50_2 widens only the
    inner 3x3 convolutions). ResNet-18 and -34 are torchvision's, not the paper's networks: the
    official code's ResNet-18 also has a 1x1 projection shortcut in its first block."""
    block, layers = RESNET_LAYERS[arch]
    if width == 1:
        return ResNet(block, layers, norm_layer=BatchNorm)
    if block is not Bottleneck:
        raise UserError(f'--width {width} applies to the bottleneck ResNets (resnet50 and deeper), '
                        f'as in the paper; use --width 1 with {arch}')
    # A Bottleneck's inner width is planes * width_per_group / 64 and its output planes *
    # expansion: widening both by `width` widens every layer.
    wide_block = type(f'Bottleneck{width}x', (Bottleneck,), {'expansion': 4 * width})
    net = ResNet(wide_block, layers, width_per_group=64 * width, norm_layer=BatchNorm)
    net.inplanes = 64 * width  # the stem widens too, so rebuild it and the first stage
    net.conv1 = nn.Conv2d(3, 64 * width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = BatchNorm(64 * width)
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


def feature_dim(arch, width):
    """The width of f's representation y: 2048 for a ResNet-50, 8 w for the convnet."""
    if arch == 'convnet':
        return 8 * width
    block, _ = RESNET_LAYERS[arch]
    return 512 * width * block.expansion


def build_encoder(arch, small_images=False, width=None):
    """Encoder f without its classifier -> (module, feature_dim), initialised as the official
    code."""
    if arch == 'convnet':
        width = width or 32
        return official_init(convnet(width)), feature_dim(arch, width)
    if arch not in RESNET_LAYERS:
        raise UserError(f'unknown --arch {arch}; choose one of {", ".join(ARCHS)}')
    net = resnet(arch, width or 1)
    if small_images:  # CIFAR-size inputs: 3x3 stride-1 stem, no max-pool (SPEC.md section 0)
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return official_init(net), dim

# ------------------------------------------------------------------------------------------------
# Projector g and predictor q (paper section 3.3)
# ------------------------------------------------------------------------------------------------


def mlp(in_dim, hidden_dim, out_dim):
    """Projector g and predictor q: Linear -> BN -> ReLU -> Linear, nothing on the output,
    initialised as the official code. DEVIATION: the last Linear has no bias, as the official
    code (appendix J's pseudo-code has one)."""
    return official_init(nn.Sequential(
        nn.Linear(in_dim, hidden_dim), BatchNorm(hidden_dim), nn.ReLU(inplace=True),
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
        if not predictor:
            # ABLATION (--no-predictor, paper Table 5b): q is the identity, the online
            # projection regresses the target's directly.
            self.online['predictor'] = nn.Identity()
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
        theta, xi = self.online_target_pairs()
        torch._foreach_mul_(xi, tau)
        torch._foreach_add_(xi, theta, alpha=1 - tau)  # (one call for all the tensors)

# ------------------------------------------------------------------------------------------------
# Schedules: pure functions of the global step, set every step (paper 3.3, SPEC.md sections 1-2)
# ------------------------------------------------------------------------------------------------


def cosine_decay(step, total_steps):
    """(1 + cos(pi k / K)) / 2: 1 at k = 0, 0 at k = K (and after)."""
    return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))


def target_tau(step, total_steps, base_tau):
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, 1 at k = K."""
    return 1 - (1 - base_tau) * cosine_decay(step, total_steps)


def learning_rate(step, total_steps, warmup_steps, peak_lr):
    """Linear warmup from 0 over warmup_steps, then cosine decay to 0 at total_steps."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    return peak_lr * cosine_decay(step - warmup_steps, max(1, total_steps - warmup_steps))

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
            w = [p for p in group['params'] if p.grad is not None]
            if not w:
                continue
            u = [p.grad for p in w]
            if group['lars']:
                # (torch._foreach_*: each op called once over the group's tensors, not in a loop)
                u = torch._foreach_add(u, w, alpha=group['weight_decay'])     # u = g + wd w
                w_norm = torch.stack(torch._foreach_norm(w))
                u_norm = torch.stack(torch._foreach_norm(u))
                trust = torch.where((w_norm > 0) & (u_norm > 0), group['eta'] * w_norm / u_norm,
                                    1.0)
                torch._foreach_mul_(u, trust.unbind())              # u <- u eta ||w|| / ||u||
            m = [self.momentum_buffer(p) for p in w]
            torch._foreach_mul_(m, group['momentum'])
            torch._foreach_add_(m, u)                               # m <- momentum m + u
            torch._foreach_add_(w, m, alpha=-group['lr'])           # w <- w - lr m

    def momentum_buffer(self, w):
        """m for the tensor w, zeros at the first step."""
        state = self.state[w]
        if 'momentum_buffer' not in state:
            state['momentum_buffer'] = torch.zeros_like(w)
        return state['momentum_buffer']


def lars_param_groups(model, weight_decay):
    """Two groups: conv and linear weights get weight decay and the trust ratio; biases and the
    parameters of every normalisation layer get neither. Frozen parameters are left out."""
    adapted, excluded = [], []
    for module in model.modules():
        is_norm = isinstance(module, (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            if is_norm or name == 'bias':
                excluded.append(p)
            else:
                adapted.append(p)
    return [dict(params=adapted, weight_decay=weight_decay, lars=True),
            dict(params=excluded, weight_decay=0.0, lars=False)]

# ------------------------------------------------------------------------------------------------
# One training step (paper appendix J's update)
# ------------------------------------------------------------------------------------------------


def train_step(model, byol, optimizer, scaler, v1, v2, labels, lr, tau, amp):
    """One step of BYOL on views v1 ~ T and v2 ~ T' (B, 3, S, S): the loss of both networks on
    both views, its gradient for the online network, a LARS step on theta at learning rate lr,
    then the target's moving average with tau (after the online step, with the new theta, as
    the official code). model is byol, or byol wrapped for several processes -> the monitor."""
    for group in optimizer.param_groups:
        group['lr'] = lr
    # DEVIATION: the paper trains in float32; --amp bf16 (the default where faster) multiplies in
    # bfloat16, as TPUs do under JAX's default precision; a CIFAR run learns the same within
    # seed noise (README, "Precision").
    with autocast(v1.device, amp):
        loss, monitor = model(v1, v2, labels)       # forward: online and target, both views
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()                   # gradients reach the online network only
    scaler.step(optimizer)                          # online:  theta <- LARS(theta, grad)
    scaler.update()
    byol.update_target(tau)                         # target:  xi <- tau xi + (1 - tau) theta
    return monitor

# ================================================================================================
# Running it: processes, precision, checkpoints, the loop, the command line
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# Processes (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK); BN as the official code's, global
# ------------------------------------------------------------------------------------------------


def setup_distributed():
    """-> (rank, world_size, device). One process per GPU under torchrun; gloo on CPU, or on GPUs
    with BYOL_BACKEND=gloo (checks that run several processes on one GPU, which NCCL refuses)."""
    if 'RANK' not in os.environ:
        if torch.cuda.is_available():
            return 0, 1, torch.device('cuda')
        return 0, 1, torch.device('cpu')
    rank, world, local_rank = (int(os.environ[k]) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'))
    if torch.cuda.is_available():
        backend = os.environ.get('BYOL_BACKEND', 'nccl')
        gpus = torch.cuda.device_count()
        if backend == 'nccl' and local_rank >= gpus:
            raise UserError(f'local rank {local_rank} but {gpus} GPUs on this node: start at '
                            f'most {gpus} processes per node (torchrun --nproc_per_node={gpus})')
        device = torch.device('cuda', local_rank % gpus)
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device('cpu'), 'gloo'
    if not dist.is_initialized():
        if backend == 'nccl':
            dist.init_process_group(backend, device_id=device)
        else:
            dist.init_process_group(backend)
    return rank, world, device


def world_size():
    if dist.is_initialized():
        return dist.get_world_size()
    return 1


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def log(*message):
    if is_main():
        print(*message, flush=True)


def all_reduce_sum(t):
    """t summed over all processes, in place (unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t)
    return t


def from_rank0(compute):
    """compute() run by rank 0 alone, its result sent to every process. If it fails, every
    process fails with it (the others would otherwise wait for rank 0 for ever): a UserError
    as it is, anything else as a RuntimeError naming it."""
    result = [None, None]  # the result, the error
    if is_main():
        try:
            result[0] = compute()
        except Exception as e:
            result[1] = e
    if world_size() > 1:
        dist.broadcast_object_list(result, src=0)
    error = result[1]
    if isinstance(error, UserError) or (error is not None and is_main()):
        raise error
    if error is not None:
        raise RuntimeError(f'rank 0 failed: {type(error).__name__}: {error}')
    return result[0]


def distributed_data_parallel(module, device, sync_buffers=False):
    """The module under DDP (gradients averaged over the processes). sync_buffers=False: no
    broadcast of the buffers at every step, for BNs whose statistics are the global batch's,
    the same on every process already (the broadcast would add a collective to every step);
    True: rank 0's buffers at every step (BNs of each process's own batch). The buffers are the
    same everywhere from the start: every process builds the networks from one seed, or loads
    rank 0's checkpoint. (Newer torch deprecates broadcast_buffers for forward_sync_buffers.)"""
    device_ids = [device] if device.type == 'cuda' else None
    options = dict(broadcast_buffers=sync_buffers)
    if 'forward_sync_buffers' in inspect.signature(DistributedDataParallel).parameters:
        options = dict(forward_sync_buffers=sync_buffers)
    return DistributedDataParallel(module, device_ids=device_ids, **options)


class BatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm as the official code's (Haiku's BatchNorm, decay 0.9, eps 1e-5; SPEC.md
    section 1). In training it normalises with the batch's statistics (the global batch's once
    synchronized: synchronize_batchnorm, every multi-process run of byol.py) and keeps as
    running statistics Haiku's zero-debiased moving averages of the batch mean and of the
    biased batch variance (update_statistics); eval mode normalises with those. Parameters and
    buffers are torch's BatchNorm's, so state dicts load into torchvision's models as they are."""
    synchronized = False

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f'expected at least 2-D input, got {x.dim()}-D')

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        if self.synchronized:
            y, mean, var = GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        else:  # torch's own kernel, which also returns the mean and 1 / sqrt(var + eps)
            y, mean, invstd = torch.native_batch_norm(x, self.weight, self.bias, None, None,
                                                      True, 0.0, self.eps)
            var = (invstd.pow(-2) - self.eps).clamp_min(0)
        self.update_statistics(mean, var)
        return y

    @torch.no_grad()
    def update_statistics(self, mean, var):
        """Haiku's ExponentialMovingAverage with zero debiasing, decay d = 1 - momentum: at the
        k-th update hidden <- d hidden + (1 - d) v and average = hidden / (1 - d^k), which is
        average <- average + w_k (v - average) with w_k = (1 - d) / (1 - d^k): the first batch's
        statistics at k = 1, then an average that settles to weight 1 - d. (torch's BN starts
        its running variance at 1, averages the unbiased variance, and does not debias.)"""
        self.num_batches_tracked += 1
        decay = 1 - self.momentum
        weight = (1 - decay) / (1 - decay ** self.num_batches_tracked.double())
        weight = weight.to(self.running_mean.dtype)
        self.running_mean.lerp_(mean.to(weight.dtype), weight)
        self.running_var.lerp_(var.to(weight.dtype), weight)


def synchronize_batchnorm(module):
    """Every BatchNorm of the module computes its statistics over the global batch (SPEC.md
    section 1), when several processes train."""
    for m in module.modules():
        if isinstance(m, BatchNorm):
            m.synchronized = True
    return module


def fused_kernels(x):
    """Whether x's device has torch's fused BN kernels (batch_norm_elemt and the rest: CUDA only;
    a test stands CPU versions in for them)."""
    return x.is_cuda


def batch_statistics(x):
    """This process's per-channel batch mean and biased variance, in one pass, at least in
    float32 (the CPU kernel keeps a half-precision input's dtype)."""
    if x.dtype in (torch.float16, torch.bfloat16) and not x.is_cuda:
        x = x.float()
    return torch.batch_norm_update_stats(x, None, None, 0.0)


class GlobalBatchNorm(torch.autograd.Function):
    """y = gamma (x - mean) / sqrt(var + eps) + beta with the statistics of the global batch,
    and its gradient, with no host synchronisation (nn.SyncBatchNorm waits for the host at every
    call: 218 times a ResNet-50 step).

    Forward: one float64 all-reduce of each process's count n, n mean and n (var + mean^2), so
    that the global variance is never E[x^2] - E[x]^2 of float32 sums (which cancels when |mean|
    >> std: at mean/std = 1000 that lost 10% of it). Backward: one all-reduce of the sums of dy
    and dy (x - mean), the input gradient's only global terms:
        dx = gamma invstd (dy - sum(dy) / N - (x - mean) invstd^2 sum(dy (x - mean)) / N).
    On GPUs through torch's fused kernels (nn.SyncBatchNorm's, without its empty-batch mask, the
    source of its host synchronisation; checked at first use: check_global_batch_norm),
    elsewhere in plain ops. -> (y, mean, var), the last two for the running statistics."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        mean, var = batch_statistics(x)
        n = torch.full_like(mean, x.numel() // x.shape[1], dtype=torch.float64)
        stats = torch.stack([n, n * mean, n * (var + mean.double() ** 2)])
        n, sum_x, sum_x2 = all_reduce_sum(stats)
        global_mean = sum_x / n
        global_var = (sum_x2 / n - global_mean ** 2).clamp_min(0)
        mean, var = global_mean.to(mean.dtype), global_var.to(var.dtype)
        invstd = (var + eps).rsqrt()
        if fused_kernels(x):
            y = torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
        else:
            y = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        count = n[:1].to(torch.int32)  # the global batch's size per channel
        ctx.save_for_backward(x, weight, mean, invstd, count)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _mean, _var):
        x, weight, mean, invstd, count = ctx.saved_tensors
        if fused_kernels(x):
            sum_dy, sum_dy_xmu, d_weight, d_bias = torch.batch_norm_backward_reduce(
                dy, x, mean, invstd, weight, True, True, True)
            sum_dy, sum_dy_xmu = all_reduce_sum(torch.stack([sum_dy, sum_dy_xmu]).double())
            dx = torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight.to(mean.dtype),
                                                 sum_dy.to(mean.dtype), sum_dy_xmu.to(mean.dtype),
                                                 count)
        else:
            shape = (1, -1) + (1,) * (dy.dim() - 2)  # per channel, broadcast over the rest
            dims = [0, *range(2, dy.dim())]
            x_mu = x.to(mean.dtype) - mean.view(shape)
            dy = dy.to(mean.dtype)
            sum_dy = dy.sum(dims)
            sum_dy_xmu = (dy * x_mu).sum(dims)
            d_weight, d_bias = sum_dy_xmu * invstd, sum_dy
            sums = all_reduce_sum(torch.stack([sum_dy, sum_dy_xmu]).double())
            mean_dy, mean_dy_xmu = (sums / count).to(mean.dtype)
            scale = (weight.to(mean.dtype) * invstd).view(shape)
            dx = (dy - mean_dy.view(shape) - x_mu * (invstd ** 2 * mean_dy_xmu).view(shape)) * scale
        return dx.to(x.dtype), d_weight.to(weight.dtype), d_bias.to(weight.dtype), None


def check_global_batch_norm(device, eps=1e-5):
    """The global BN checked at first use on a GPU, where no test can run it: every process
    draws the same small batches, so that the global statistics are the local ones, and the
    output and gradients must equal F.batch_norm's, in each form training gives it (the
    kernels differ): float32 and bf16 maps (channels last, as the encoders run on GPUs) and bf16
    vectors (the BNs of g and q). If they do not, stop with one line."""
    g = torch.Generator(device).manual_seed(0)
    cases = ((torch.float32, (16, 8, 5, 5), torch.contiguous_format, 1e-4),
             (torch.bfloat16, (16, 8, 5, 5), torch.channels_last, 2e-2),
             (torch.bfloat16, (64, 8), torch.contiguous_format, 2e-2))
    for dtype, shape, memory_format, tolerance in cases:
        x = torch.randn(shape, device=device, generator=g).to(dtype)
        x = x.contiguous(memory_format=memory_format).requires_grad_()
        weight = (1 + torch.rand(8, device=device, generator=g)).requires_grad_()
        bias = torch.randn(8, device=device, generator=g).requires_grad_()
        dy = torch.randn(shape, device=device, generator=g).to(dtype)
        y, _, _ = GlobalBatchNorm.apply(x, weight, bias, eps)
        ours = [y, *torch.autograd.grad(y, (x, weight, bias), dy)]
        y = F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
        reference = [y, *torch.autograd.grad(y, (x, weight, bias), dy)]
        worst = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                    for a, b in zip(ours, reference))
        if not worst < tolerance:
            raise UserError(f'the synchronised BN differs from torch\'s batch_norm on {device} '
                            f'for {dtype} {tuple(shape)} (relative error {worst:.1e}); please '
                            'report this with your torch version')

# ------------------------------------------------------------------------------------------------
# Precision and the device
# ------------------------------------------------------------------------------------------------


def autocast(device, amp):
    dtype = AMP_DTYPES.get(amp, torch.float32)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def default_amp():
    """The autocast precision that is faster on this hardware, as measured (bench/RESULTS.md):
    bf16 on GPUs from Ampere on (is_bf16_supported() is also true before, by slow emulation),
    on CPUs with AMX (a ResNet-18 step 1.9x float32's) and on AMD's with AVX-512 BF16 (Zen 4:
    1.5x for the convnet, 2.1x for ResNet-18); float32 elsewhere (an Intel Xeon with AVX-512
    BF16 but no AMX was reported at 0.73x of float32; with neither, bf16 ran at 0.32x)."""
    if torch.cuda.is_available():
        if torch.cuda.get_device_capability()[0] >= 8:
            return 'bf16'
        return 'none'
    if getattr(torch.cpu, '_is_amx_tile_supported', lambda: False)():
        return 'bf16'
    avx512_bf16 = getattr(torch.cpu, '_is_avx512_bf16_supported', lambda: False)()
    if avx512_bf16 and cpu_vendor() == 'AuthenticAMD':
        return 'bf16'
    return 'none'


def cpu_vendor():
    """The CPU's vendor id ('GenuineIntel', 'AuthenticAMD', ...), from /proc/cpuinfo, or ''."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('vendor_id'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return ''


def configure_device(device, amp):
    """On GPUs: cuDNN picks the fastest convolutions; TF32 is allowed only under autocast (the
    few matrix products that bf16 / fp16 autocast leaves in float32), so that --amp none is
    float32 throughout."""
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = amp != 'none'
        torch.backends.cudnn.allow_tf32 = amp != 'none'


# Saved activations of a ResNet-50 step at 224 px, per image (two views, both networks, the
# saved tensors that grow with the batch; bench/memory.py): 83.5 MiB under bf16 / fp16 autocast,
# 164 MiB in float32. A GPU's peak is higher (transient buffers): a quarter is left spare.
RESNET50_BYTES_PER_IMAGE = {'bf16': 83.5 * 2 ** 20, 'fp16': 83.5 * 2 ** 20, 'none': 164 * 2 ** 20}


def out_of_memory(args, world, device):
    """The one line for a CUDA out-of-memory error: what fits, and what to do."""
    per_gpu = args.batch_size // world
    total = torch.cuda.get_device_properties(device).total_memory
    # (4 GiB for the weights, the optimizer and the workspaces; a quarter spare)
    fits = max(0, int(0.75 * (total - 4 * 2 ** 30) / RESNET50_BYTES_PER_IMAGE[args.amp]))
    return (f'the GPU ran out of memory at {per_gpu} images per GPU ({args.arch}, '
            f'{args.image_size} px, --amp {args.amp}, {total / 2 ** 30:.0f} GiB); a ResNet-50 at '
            f'224 px fits about {fits} per GPU here (an estimate: README.md, "Memory"): use more '
            f'GPUs, or a smaller --batch-size (the peak lr follows, lr x batch / 256)')

# ------------------------------------------------------------------------------------------------
# Checkpoints: atomic writes, unwrapped state dicts, resuming
# ------------------------------------------------------------------------------------------------


def save_atomic(obj, path):
    """torch.save (or, for bytes, a plain write) to a temporary file, flushed to disk, then
    renamed: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp')
    with open(tmp, 'wb') as f:
        if isinstance(obj, bytes):
            f.write(obj)
        else:
            torch.save(obj, f)
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
        cuda_rng = []
        if torch.cuda.is_available():
            cuda_rng = torch.cuda.get_rng_state_all()
        save_atomic(dict(online=byol.online.state_dict(), target=byol.target.state_dict(),
                         optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                         config=config, rng=dict(torch=torch.get_rng_state(), cuda=cuda_rng)), path)
    if world_size() > 1:
        dist.barrier()


def find_checkpoint(resume, out):
    """-> (path, checkpoint) to resume from (--resume, else the output folder's checkpoint.pth),
    or (None, None). Rank 0 calls it and sends the result to every process (from_rank0): where
    the output folders are local to each node, the other nodes would start afresh."""
    path = resume
    if path is None and (out / 'checkpoint.pth').exists():
        path = out / 'checkpoint.pth'
    if path is None:
        return None, None
    return path, load_file(path)


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


def load_checkpoint(checkpoint, byol, optimizer, scaler):
    """A resumed run's state, as save_checkpoint wrote it -> the step to continue from."""
    byol.online.load_state_dict(checkpoint['online'])
    byol.target.load_state_dict(checkpoint['target'])
    optimizer.load_state_dict(checkpoint['optimizer'])
    if checkpoint['scaler'] and scaler.is_enabled():  # fp16 then and now: its loss scale
        scaler.load_state_dict(checkpoint['scaler'])
    torch.set_rng_state(checkpoint['rng']['torch'])
    return checkpoint['step']


def settings_file(path):
    """encoder.pth -> encoder.json: the encoder's settings (ENCODER_SETTINGS) beside its plain
    state dict, which torchvision's loader then reads as it is."""
    return Path(path).with_suffix('.json')


def export_encoder(encoder, settings, out):
    """out/encoder.pth (a plain torchvision state dict, fc removed), encoder.json beside it."""
    save_atomic((json.dumps(settings) + '\n').encode(), settings_file(out / 'encoder.pth'))
    save_atomic(encoder.state_dict(), out / 'encoder.pth')


def set_up(output_dir):
    """What every script does first: the processes (torchrun or not), and a check that the
    output folder can be written -> (world size, device)."""
    _, world, device = setup_distributed()
    check_output_dir(output_dir)
    return world, device


def check_output_dir(path):
    """Fail at once, before any data is read or model built, if the folder cannot be created
    or written (a file in the way, no permission); nothing is created here."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        problem = 'is a file, not a folder'
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = 'is not writable'
    else:
        return
    raise UserError(f'--output-dir {path}: {existing} {problem}; choose another --output-dir')

# ------------------------------------------------------------------------------------------------
# The loop's bookkeeping: progress lines, the NaN stop, preemption, the JSON log
# ------------------------------------------------------------------------------------------------
SYNC_EVERY = 5  # steps between the loop's host synchronisations (loss check, preemption flag)


class Progress:
    """What the loop keeps track of besides BYOL itself. The monitor's sums stay on the device
    and are read every SYNC_EVERY steps, one host synchronisation: their global means, a stop on
    a non-finite loss, the progress line (images/s, ETA), and whether any process received a
    preemption signal (all must stop together). After each epoch, one JSON line."""

    def __init__(self, args, step, total_steps, steps_per_epoch, received, device, labelled):
        self.args, self.total_steps, self.steps_per_epoch = args, total_steps, steps_per_epoch
        self.received, self.device, self.labelled = received, device, labelled
        self.start_time, self.start_step = time.time(), step
        self.window_time = self.start_time
        self.window = torch.zeros(4, device=device)  # monitor sums and steps, since the line

    def start_epoch(self):
        self.epoch_sums = torch.zeros(4, device=self.device)  # and since the epoch began

    def after_step(self, step, epoch, monitor, lr, tau):
        """Counts the step's monitor (BYOL loss, projection std, classifier top-1); on the steps
        that synchronise, checks and logs -> why the run stops now ('a signal', '--stop-at-step'),
        or None."""
        counted = torch.cat([monitor, monitor.new_ones(1)])
        self.window += counted
        self.epoch_sums += counted
        args = self.args
        log_now = step % args.log_every == 0 or step % self.steps_per_epoch == 0
        at_stop_step = step == args.stop_at_step
        if not (log_now or at_stop_step or step % SYNC_EVERY == 0):
            return None
        signalled = torch.full((1,), float(bool(self.received)), device=self.device)  # (no copy)
        stats = all_reduce_sum(torch.cat([self.window[:3] / self.window[3], signalled]))
        loss, z_std, top1, signalled = (stats / world_size()).tolist()
        if not math.isfinite(loss):
            kept = Path(args.output_dir) / 'checkpoint.pth'
            if kept.exists():
                saved = f'{kept} keeps the last good state'
            else:
                saved = 'nothing was saved'
            raise UserError(f'the loss is {loss} at step {step}; lower --lr or use --amp none; '
                            f'{saved}')
        stop = None
        if signalled:
            stop = 'a signal'
        elif at_stop_step:
            stop = '--stop-at-step'
        if log_now or stop:
            now = time.time()
            eta = (now - self.start_time) / (step - self.start_step) * (self.total_steps - step)
            images_per_s = args.batch_size * self.window[3] / (now - self.window_time)
            classifier = f'top-1 {100 * top1:.1f}% | ' if self.labelled else ''
            log(f'step {step}/{self.total_steps} | ep {epoch} | loss {loss:.4f} | lr {lr:.4g} | '
                f'tau {tau:.5f} | z_std {z_std:.4f} | {classifier}{images_per_s:.0f} img/s | '
                f'eta {format_time(eta)}')
            self.window_time, self.window = now, torch.zeros(4, device=self.device)
        return stop

    def epoch_record(self, epoch, step, lr, tau):
        """The epoch's means over every process, for log.jsonl."""
        sums = all_reduce_sum(self.epoch_sums[:3]) / world_size() / self.epoch_sums[3]
        loss, z_std, top1 = sums.tolist()
        record = dict(epoch=epoch, step=step, loss=loss, lr=lr, tau=tau, z_std=z_std,
                      time=time.time() - self.start_time)
        if self.labelled:
            record['train_top1'] = 100 * top1
        return record

    def write(self, record):
        if is_main():
            with open(Path(self.args.output_dir) / 'log.jsonl', 'a') as f:
                f.write(json.dumps(record) + '\n')


def format_time(seconds):
    m, s = divmod(int(seconds), 60)
    if m >= 60:
        return f'{m // 60}h{m % 60:02d}m'
    return f'{m}m{s:02d}s'

# ------------------------------------------------------------------------------------------------
# The training loop
# ------------------------------------------------------------------------------------------------


def train(args, received):
    """A BYOL run: set up the processes, data, networks and optimizer (or resume them), then
    train_step over the epochs, with a checkpoint after each epoch and when stopped (a signal in
    `received`, --stop-at-step); at the end the online encoder is exported."""
    world, device = set_up(args.output_dir)
    out = Path(args.output_dir)
    resume, checkpoint = from_rank0(lambda: find_checkpoint(args.resume, out))  # before heavy work
    saved = None  # the resumed run's settings
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get('config'), dict):
        saved = checkpoint['config']
    images = augment.load_images(args.data, args.data_root, args.download, 'train')
    args = resolve_config(args, images, saved)
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
    configure_device(device, args.amp)

    # Data (augment.py): batches of two views on the device, labels only for the monitor.
    batches, where = augment.batches(images, args.image_size, args.batch_size // world, 'byol',
                                     args.seed, device, args.workers, args.data_on_device,
                                     args.on_device, dtype=AMP_DTYPES[args.amp])
    n_classes = 0
    if len(images.classes) > 1:
        n_classes = len(images.classes)
    val = None  # the monitor's labelled split
    if args.eval_every and n_classes:
        val_images = augment.load_images(args.data, args.data_root, args.download, 'val')
        val, _ = augment.batches(val_images, args.image_size, 256, 'eval', device=device,
                                 workers=args.workers)
    # DEVIATION: the official code counts K = epochs * N // B steps over a repeated stream; we run
    # whole epochs of N // B steps (312,000 instead of 312,784 for 1000 ImageNet epochs).
    total_steps = args.epochs * steps_per_epoch
    warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    peak_lr = args.lr * args.batch_size / 256

    # Networks, optimizer, mixed precision.
    encoder, dim = build_encoder(args.arch, args.small_images, args.width)
    byol = BYOL(encoder, dim, args.hidden_dim, args.projection_dim, n_classes,
                predictor=not args.no_predictor)
    if world > 1:
        synchronize_batchnorm(byol)
        if device.type == 'cuda':
            check_global_batch_norm(device)
    memory_format = fastest_memory_format(device, args.arch)
    byol.to(device, memory_format=memory_format)
    optimizer = LARS(lars_param_groups(byol, args.wd), lr=0.0)
    scaler = torch.amp.GradScaler(device.type, enabled=args.amp == 'fp16')
    step = 0
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, byol, optimizer, scaler)
        if saved.get('amp') != args.amp:
            log(f'note: steps 1-{step} ran with --amp {saved.get("amp")}, the rest '
                f'--amp {args.amp}')
        del checkpoint
    model = byol
    if world > 1:
        model = distributed_data_parallel(byol, device)
    if args.compile:  # the forward and backward of both networks; the EMA and LARS stay eager
        model = torch.compile(model)
    if args.epochs < 40:
        log(f'recipe: short run (--epochs {args.epochs} < 40, the paper\'s shortest preset; '
            'README.md, "Short runs"); flags win')
    else:
        log('recipe: the paper\'s preset; flags win')
    log('config: ' + json.dumps(config, sort_keys=True))
    resumed = f'; resumed from {resume} at step {step}' if resume else ''
    log(f'{where}; {world} process(es), {steps_per_epoch} steps of {args.batch_size} per epoch, '
        f'{total_steps} steps, peak lr {peak_lr:g}, '
        f'{sum(p.numel() for p in encoder.parameters()) / 1e6:.1f}M encoder parameters{resumed}')

    model.train()  # the target too: its BN uses batch statistics (SPEC.md section 0)
    progress = Progress(args, step, total_steps, steps_per_epoch, received, device, n_classes > 0)
    for epoch in range(step // steps_per_epoch, args.epochs):
        batches.set_epoch(epoch, skip_batches=step % steps_per_epoch)
        progress.start_epoch()
        stop = None
        for (v1, v2), labels, _ in batches:  # v1 ~ T, v2 ~ T' (B, 3, S, S), normalised
            v1, v2 = (v.contiguous(memory_format=memory_format) for v in (v1, v2))
            lr = learning_rate(step, total_steps, warmup_steps, peak_lr)
            if args.constant_tau:  # ABLATION (paper Table 5a): no cosine to 1
                tau = args.tau
            else:
                tau = target_tau(step, total_steps, args.tau)
            if not n_classes:
                labels = None
            try:
                monitor = train_step(model, byol, optimizer, scaler, v1, v2, labels, lr, tau,
                                     args.amp)
            except torch.cuda.OutOfMemoryError:
                raise UserError(out_of_memory(args, world, device)) from None
            step += 1
            stop = progress.after_step(step, epoch, monitor, lr, tau)
            if stop:
                break

        if step % steps_per_epoch == 0:  # the epoch is complete
            record = progress.epoch_record(epoch, step, lr, tau)
            if val and (epoch + 1) % args.eval_every == 0:
                record['val_top1'] = classifier_top1(byol.online, val, device, args.amp)
                log(f'epoch {epoch}: the monitor\'s validation top-1 {record["val_top1"]:.2f}%')
            save_checkpoint(out / 'checkpoint.pth', byol, optimizer, scaler, step, config)
            progress.write(record)
        elif stop:
            save_checkpoint(out / 'checkpoint.pth', byol, optimizer, scaler, step, config)
        if stop:
            log(f'stopped by {stop} at step {step}; checkpoint saved in {out}; run the same '
                'command again to resume')
            return
    if is_main():
        export_encoder(byol.online.encoder, {k: config[k] for k in ENCODER_SETTINGS}, out)
        log(f'done: {out / "checkpoint.pth"}; encoder exported to {out / "encoder.pth"} (its '
            f'settings in {settings_file(out / "encoder.pth")})')


def fastest_memory_format(device, arch):
    """channels_last on GPUs, and on CPUs for the convnet (1.47x its step); ResNets stay NCHW on
    CPUs (ResNet-18: 0.75x with channels_last; bench/RESULTS.md)."""
    if device.type == 'cuda' or arch == 'convnet':
        return torch.channels_last
    return torch.contiguous_format


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
        if strict:
            ok = value > low
        else:
            ok = value >= low
        if not ok:  # (NaN fails both)
            raise argparse.ArgumentTypeError(f'{text!r} is not {name}')
        return value
    return parse


def _at_most_one(text):
    value = float(text)
    if value > 1:
        return math.nan
    return value


positive_int = _number(int, 0, 'a positive integer')
nonnegative_int = _number(int, 0, 'an integer >= 0', strict=False)
positive_float = _number(float, 0, 'a positive number')
nonnegative_float = _number(float, 0, 'a number >= 0', strict=False)
fraction = _number(_at_most_one, 0, 'in [0, 1]', strict=False)  # tau


def add_data_arguments(p, required=True):
    """--data, --data-root, --download: the same in every script."""
    p.add_argument('--data', required=required, help='an ImageNet-style folder '
                   '(DATA/train/<class>/<image>, DATA/val/<class>/<image>; for pretraining also '
                   'DATA/<class>/<image>), or one of ' + ', '.join(augment.NAMED_DATASETS)
                   + ' (torchvision\'s datasets)')
    add_data_root_arguments(p)


def add_data_root_arguments(p):
    """--data-root, --download: where torchvision's datasets live, and leave to fetch them."""
    p.add_argument('--data-root', default='data', help='where torchvision\'s datasets live '
                   '(default: ./data)')
    p.add_argument('--download', action='store_true', help='download a dataset if it is '
                   'missing (nothing is downloaded without it)')


def add_amp_argument(p):
    """--amp: the same in every script."""
    p.add_argument('--amp', choices=AMP_CHOICES, help='autocast precision: bf16, fp16 (with a '
                   'loss scaler) or none (float32 throughout, no TF32). Default: bf16 where it '
                   'is measured faster (GPUs from Ampere on, CPUs with AMX, AMD CPUs with '
                   'AVX-512 BF16: bench/RESULTS.md), else none. Under bf16 / fp16 the products '
                   'autocast leaves in float32 may use TF32 on GPUs. byol.py: a resumed run keeps '
                   'its own')


def add_workers_argument(p):
    """--workers: the same in every script."""
    p.add_argument('--workers', type=nonnegative_int, help='data-loader processes per training '
                   'process (default: its share of the cores: those of its affinity mask, '
                   'shared with the node\'s processes whose masks overlap it, within a '
                   'container\'s CPU quota, less one for the training loop)')


def get_parser():
    p = ArgumentParser(prog='byol.py', description='BYOL pretraining (Grill et al., 2020). The '
                       'defaults are the paper\'s (ResNet-50, 224 px, batch 4096, 1000 epochs); '
                       '--epochs selects the official preset of --lr, --wd and --tau.')
    a = p.add_argument
    add_data_arguments(p)
    a('--arch', default='resnet50', choices=ARCHS, help='encoder f (default: resnet50, the '
      'paper\'s; resnet200 --width 2 is its largest. resnet18/34 are torchvision\'s, not the '
      'paper\'s networks: the official ResNet-18 has a 1x1 projection shortcut in its first '
      'block, 11,180,736 encoder parameters against 11,176,512. convnet: a small CPU encoder)')
    a('--width', type=positive_int, help='ResNet width multiplier 1, 2 or 4 (paper Table 1b; '
      'default 1); for the convnet, its first layer\'s width (default 32)')
    a('--small-images', action=argparse.BooleanOptionalAction, help='a 3x3 stride-1 stem and no '
      'max-pool, for CIFAR-size images (default: on when --image-size <= 64)')
    a('--image-size', type=positive_int, help='crop size (default: the paper\'s 224, or the '
      'native size of a dataset whose images all share one smaller size, e.g. CIFAR\'s 32)')
    a('--hidden-dim', type=positive_int, help='hidden width of g and q (default: the paper\'s '
      '4096; short runs: 4x the width of y, at most 4096)')
    a('--projection-dim', type=positive_int, help='output width of g and q (default: the '
      'paper\'s 256; short runs: the width of y, at most 256)')
    presets = ', '.join(f'{e} ep: lr {v[0]}, wd {v[1]}, tau {v[2]}' for e, v in PRESETS.items())
    a('--epochs', type=positive_int, default=1000, help='default: 1000, the paper\'s headline '
      'run. It selects the official preset of --lr, --wd and --tau, the smallest with at least '
      f'this many epochs ({presets}); under 40 epochs, the short-run recipe (lr {SHORT_RUN[0]}, '
      f'wd {SHORT_RUN[1]}, tau {SHORT_RUN[2]}; README.md, "Short runs")')
    a('--batch-size', type=positive_int, default=4096, help='the global batch, split over the '
      'processes (default: the paper\'s 4096)')
    a('--lr', type=positive_float, help='base learning rate; the peak is lr x batch / 256, '
      'reached after the warmup (default: the preset\'s)')
    a('--wd', type=nonnegative_float, help='LARS weight decay (default: the preset\'s)')
    a('--tau', type=fraction, help='base EMA rate tau of the target, cosine to 1 over the run '
      '(default: the preset\'s)')
    a('--warmup-epochs', type=nonnegative_float, help='linear lr warmup (default: the paper\'s '
      '10; short runs: a tenth of the run)')
    a('--no-predictor', action='store_true', help='ablation (paper Table 5b): q is the identity')
    a('--constant-tau', action='store_true', help='ablation: tau stays --tau, no cosine to 1 '
      '(--tau 0: the target is the online network under stop-gradient, paper Table 5a)')
    a('--data-on-device', action=argparse.BooleanOptionalAction, help='hold the dataset on the '
      'training device, cropped and augmented there (default: on for the named datasets and '
      f'for folders of at most {augment.MAX_IN_MEMORY} images of one size)')
    a('--on-device', choices=('views', 'crop'), help='image folders on GPUs: the first stage '
      'run on the GPU (default views: the loader workers decode and crop, the GPU augments; '
      'crop: the workers only decode, the GPU crops and augments)')
    a('--compile', action='store_true', help='torch.compile the networks (opt-in: DDP with '
      'synchronised BN under compile has open upstream failure reports)')
    add_workers_argument(p)
    a('--seed', type=int, default=0, help='seeds the initialisation, the data order and the '
      'augmentations (default: 0)')
    add_amp_argument(p)
    a('--output-dir', default='runs/byol', help='checkpoint.pth, encoder.pth and its '
      'encoder.json, log.jsonl (default: runs/byol)')
    a('--resume', help='checkpoint to resume from (default: <output-dir>/checkpoint.pth, if it '
      'exists)')
    a('--stop-at-step', type=positive_int, help='save and stop after this step (the schedules '
      'stay those of the full run)')
    a('--log-every', type=positive_int, default=20, help='steps between progress lines '
      '(default: 20)')
    a('--eval-every', type=nonnegative_int, default=0, help='every N epochs, the monitor\'s '
      'validation top-1 (named datasets: their test split; folders: DATA/val; default 0: never)')
    return p


def recipe(epochs, feature_width):
    """The defaults that the number of epochs selects: (lr, wd, tau, warmup_epochs, hidden_dim,
    projection_dim). 40 epochs or more: the official preset with the fewest epochs at least
    these (1000 beyond), 10 warmup epochs and the paper's 4096 / 256 heads; fewer: the short-run
    recipe, warmup a tenth of the run, g and q sized to f's feature width."""
    if epochs < 40:
        return SHORT_RUN + (epochs / 10, min(4096, 4 * feature_width), min(256, feature_width))
    preset = min((e for e in PRESETS if e >= epochs), default=1000)
    return PRESETS[preset] + (10, 4096, 256)


def resolve_config(args, images, saved=None):
    """Fill the defaults that depend on other settings or on the data: image size and stem
    (augment.default_image_size), width, the recipe by epochs, precision (that of `saved`, the
    resumed checkpoint's config), workers."""
    if args.image_size is None:
        args.image_size = augment.default_image_size(images)
    if args.small_images is None:
        args.small_images = args.image_size <= 64
    if args.width is None:
        args.width = 32 if args.arch == 'convnet' else 1
    names = ('lr', 'wd', 'tau', 'warmup_epochs', 'hidden_dim', 'projection_dim')
    defaults = recipe(args.epochs, feature_dim(args.arch, args.width))
    for name, value in zip(names, defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.amp, args.workers = precision_and_workers(args, saved)
    return args


def precision_and_workers(args, saved=None):
    """--amp and --workers, the defaults filled in (every script): the precision of `saved`
    (a resumed run's config), else the fastest here (default_amp); the loader workers of this
    process's share of the cores (augment.default_workers)."""
    amp, workers = args.amp, args.workers
    if amp is None:
        if saved and saved.get('amp') in AMP_CHOICES:
            amp = saved['amp']
        else:
            amp = default_amp()
    if workers is None:
        workers = augment.default_workers()
    return amp, workers


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

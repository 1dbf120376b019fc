"""Tests for byol.py, augment.py, linear_eval.py, semi_sup.py and transfer.py. CPU only, minutes.

    pytest test_byol.py                  # everything; the CIFAR-10 tests skip if it is absent
    pytest test_byol.py -m "not slow"    # the fast part (2-3 minutes on 2 cores)
    pytest test_byol.py -k loss          # one group

Helpers and fixtures first; then one section per file, byol.py's in the paper's order; last, the
slow tests that pretrain on real data (marked slow).

Numbers are checked against values computed by hand in the test, never against recorded outputs.
"""
import ast
import collections
import colorsys
import contextlib
import copy
import functools
import importlib.util
import io
import itertools
import json
import lzma
import math
import os
import pickle
import pickletools
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import augment
import byol
import linear_eval
import semi_sup
import transfer

# torchvision 0.29 deprecates its image decoders in favour of torchcodec; byol.py uses them while
# they exist (they decode JPEGs faster than PIL, bit-identically) and falls back to PIL.
pytestmark = pytest.mark.filterwarnings('ignore:The image decoding:DeprecationWarning')

HERE = Path(__file__).resolve().parent
CIFAR10 = Path(os.environ.get('BYOL_CIFAR10', HERE.parent / 'shared' / 'data' / 'cifar10'))
needs_cifar10 = pytest.mark.skipif(
    not (CIFAR10 / 'train').is_dir(),
    reason=f'CIFAR-10 image folder not found at {CIFAR10} (set BYOL_CIFAR10 to its path)')
SUBSETS = Path(os.environ.get('BYOL_IMAGENET_SUBSETS',
                              HERE.parent / 'shared' / 'data' / 'imagenet_subsets'))
needs_subsets = pytest.mark.skipif(
    not (SUBSETS / '1percent.txt').is_file() or not (SUBSETS / '10percent.txt').is_file(),
    reason=f'ImageNet subset lists not found in {SUBSETS} (set BYOL_IMAGENET_SUBSETS)')
# A tiny BYOL for the loop tests: convnet of width 4, small projector and predictor.
TINY = ['--arch', 'convnet', '--width', '4', '--hidden-dim', '32', '--projection-dim', '16',
        '--batch-size', '16', '--workers', '0', '--log-every', '2', '--warmup-epochs', '1',
        '--lr', '0.4', '--amp', 'none']
TINY_FT = ['--arch', 'convnet', '--width', '4', '--workers', '0', '--batch-size', '8']
TINY_T = ['--arch', 'convnet', '--width', '4', '--workers', '0', '--image-size', '16']
# The slow tests' BYOL run on CIFAR-10: convnet of width 16, five epochs of batch 128 (1,950
# steps; 4.5 CPU-minutes in bf16 with AMX, 7-8 in float32 without). One epoch already beats
# random init in a linear probe, but fine-tuning from it does not beat fine-tuning from random
# init; five do, by 3.6 points (four by 2.3: too close to the test's 1.5 for a test). Short CPU
# runs need a larger base lr than the 1000-epoch preset (the official imagenette example uses 2.0).
CIFAR_BYOL = ['--arch', 'convnet', '--width', '16', '--batch-size', '128', '--epochs', '5',
              '--lr', '4.0', '--tau', '0.99', '--warmup-epochs', '0.1', '--hidden-dim', '512',
              '--projection-dim', '128', '--workers', '0', '--log-every', '30', '--seed', '0']


@pytest.fixture(scope='session')
def image_folder(tmp_path_factory):
    """An ImageNet-style folder: train/ and val/ of 4 classes of 24x20 JPEGs whose colour depends
    on the class (so a linear probe can tell them apart)."""
    root = tmp_path_factory.mktemp('images')
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', 64), ('val', 16)):
        for i in range(n):
            label = i % 4
            image = torch.rand(3, 24, 20, generator=g) * 0.5
            image[label % 3] += 0.4 if label < 3 else 0.0
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True, exist_ok=True)
            torchvision.io.write_jpeg((image * 255).to(torch.uint8), str(folder / f'{i:03d}.jpg'))
    return root


@pytest.fixture(scope='session')
def tiny_checkpoint(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp('tiny')
    assert run_main(byol, ['--data', image_folder, *TINY, '--epochs', '2', '--output-dir',
                           out])[0] == 0
    return out / 'checkpoint.pth'


@pytest.fixture(scope='session')
def cifar_byol(tmp_path_factory):
    """One short BYOL run on the CIFAR-10 folder, shared by the tests that need a trained
    encoder -> (output folder, printed progress lines)."""
    if not (CIFAR10 / 'train').is_dir():
        pytest.skip(f'CIFAR-10 image folder not found at {CIFAR10}')
    out = tmp_path_factory.mktemp('cifar_byol')
    result = subprocess.run([sys.executable, str(HERE / 'byol.py'), '--data', str(CIFAR10),
                             *CIFAR_BYOL, '--output-dir', str(out)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def run_main(module, argv, capsys=None):
    """module.main(argv) in this process -> (exit code, stdout, stderr)."""
    try:
        module.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr() if capsys else None
    return code, out.out if out else '', out.err if out else ''


def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def tiny_byol(seed=0):
    torch.manual_seed(seed)
    encoder, dim = byol.build_encoder('convnet', width=4)
    return byol.BYOL(encoder, dim, hidden_dim=32, projection_dim=16)


def perturbed(model):
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(torch.randn_like(p))
    return model


def assert_same_state(a, b, exact=True):
    for part in ('online', 'target'):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            x, y = a[part][key].float(), b[part][key].float()
            assert torch.equal(x, y) if exact else torch.allclose(x, y, rtol=1e-3, atol=1e-4), \
                (part, key, (x - y).abs().max())


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def photo_folder(root, sizes):
    """An image folder of random JPEGs of these (H, W) sizes, in two classes."""
    for i, (h, w) in enumerate(sizes):
        folder = root / f'class{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        torchvision.io.write_jpeg(torch.randint(0, 256, (3, h, w), dtype=torch.uint8),
                                  str(folder / f'{i:03d}.jpg'))
    return root


def resolved(data, *argv):
    args = byol.get_parser().parse_args(['--data', str(data), *map(str, argv)])
    return byol.resolve_config(args, augment.load_images(str(data)))


def progress(stdout):
    """(loss, z_std) of each progress line."""
    return [(float(line.split('loss ')[1].split()[0]), float(line.split('z_std ')[1].split()[0]))
            for line in stdout.splitlines() if line.startswith('step ')]

# ------------------------------------------------------------------------------------------------
# byol.py: encoder f (paper section 3.3, Table 1b)
# ------------------------------------------------------------------------------------------------


def parameter_count(arch, width=1, small=False):
    with torch.device('meta'):
        encoder, dim = byol.build_encoder(arch, small, width)
    return sum(p.numel() for p in encoder.parameters()), dim


def test_resnet_sizes_match_torchvision_and_the_paper():
    assert parameter_count('resnet50') == (23_508_032, 2048)  # torchvision's, without fc
    assert parameter_count('resnet18')[1] == 512
    # paper Table 1b: ResNet-50 (2x) 94M, (4x) 375M parameters
    count2, dim2 = parameter_count('resnet50', 2)
    count4, dim4 = parameter_count('resnet50', 4)
    assert dim2 == 4096 and round(count2 / 1e6) == 94
    assert dim4 == 8192 and round(count4 / 1e6) == 375
    with torch.device('meta'):
        r200, _ = byol.build_encoder('resnet200')
    assert [len(layer) for layer in (r200.layer1, r200.layer2, r200.layer3, r200.layer4)] == \
        [3, 24, 36, 3]


def test_small_image_stem_and_convnet_shapes():
    net, dim = byol.build_encoder('resnet18', small_images=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    conv, dim = byol.build_encoder('convnet', width=8)
    assert dim == 64 and conv(torch.randn(2, 3, 32, 32)).shape == (2, 64)
    widths = [m.out_channels for m in conv.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [8, 16, 32, 64]


def test_weights_are_initialised_as_the_official_code():
    torch.manual_seed(0)
    encoder, dim = byol.build_encoder('resnet18', small_images=True)
    model = byol.BYOL(encoder, dim, hidden_dim=256, projection_dim=64)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 2 * 20 + 3 * 2  # 20 in each ResNet-18 (online, target), 2 in g, q, g'
    for m in layers:
        fan_in = m.weight[0].numel()
        w = m.weight * math.sqrt(fan_in)   # a standard normal truncated to [-2, 2]: std 0.8796
        assert w.abs().max() <= 2.0
        if w.numel() >= 4096:
            assert abs(w.std().item() - 0.8796) < 0.03, (m, w.std())
        assert m.bias is None or not m.bias.any()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)

# ------------------------------------------------------------------------------------------------
# byol.py: the loss (paper Eq. 2)
# ------------------------------------------------------------------------------------------------


def test_regression_loss_is_two_minus_two_cos():
    p = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [3.0, 4.0]])
    z = torch.tensor([[0.0, 1.0], [2.0, 2.0], [-1.0, 0.0], [4.0, 3.0]])
    # orthogonal: 2; parallel (any scale): 0; opposite: 4; cos = 24/25: 2 - 48/25
    expected = torch.tensor([2.0, 0.0, 4.0, 2 - 48 / 25])
    assert torch.allclose(byol.regression_loss(p, z), expected, atol=1e-6)
    # and it is the squared distance of the l2-normalised vectors
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    distance = ((a / a.norm(dim=1, keepdim=True) - b / b.norm(dim=1, keepdim=True)) ** 2).sum(1)
    assert torch.allclose(byol.regression_loss(a, b), distance, atol=1e-5)


def test_byol_loss_is_the_sum_of_both_view_orders():
    model = tiny_byol()
    v1, v2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, (byol_loss, std, top1) = model(v1, v2)
    on, tg = model.online, model.target
    z1, z2 = on.projector(on.encoder(v1)), on.projector(on.encoder(v2))
    t1, t2 = tg.projector(tg.encoder(v1)), tg.projector(tg.encoder(v2))
    q1, q2 = on.predictor(z1), on.predictor(z2)
    expected = (byol.regression_loss(q1, t2) + byol.regression_loss(q2, t1)).mean()
    assert torch.allclose(loss, expected, atol=1e-6) and torch.equal(byol_loss, loss.detach())
    # summed, not averaged: at initialisation (target = online) each term is about 2
    assert 2.5 < loss.item() < 5.5
    z = torch.nn.functional.normalize(z1, dim=1)
    assert torch.allclose(std, z.std(dim=0).mean(), atol=1e-6) and top1 == 0  # no classifier


def test_projection_std_separates_collapse_from_spread():
    collapsed = torch.ones(512, 256) + 1e-4 * torch.randn(512, 256)
    spread = torch.randn(4096, 256)
    assert byol.projection_std(collapsed) < 1e-3
    assert abs(byol.projection_std(spread).item() * math.sqrt(256) - 1) < 0.02

# ------------------------------------------------------------------------------------------------
# byol.py: online and target networks, the EMA, the monitor (paper section 3.1)
# ------------------------------------------------------------------------------------------------


def test_tau_one_keeps_target_and_tau_zero_copies_online():
    model = perturbed(tiny_byol())
    online, target = model.online_target_pairs()
    before = [t.clone() for t in target]
    model.update_target(1.0)
    assert all(torch.equal(t, b) for t, b in zip(target, before))
    model.update_target(0.0)
    assert all(torch.equal(t, o) for t, o in zip(target, online))
    assert len(target) == len(online) > 10


def test_no_predictor_ablation_regresses_the_target_projection_directly(image_folder, tmp_path):
    torch.manual_seed(0)
    encoder, dim = byol.build_encoder('convnet', width=4)
    model = byol.BYOL(encoder, dim, hidden_dim=32, projection_dim=16, predictor=False)
    v1, v2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    loss, _ = model(v1, v2)
    z1, z2 = (model.online.projector(model.online.encoder(v)) for v in (v1, v2))
    t1, t2 = (model.target.projector(model.target.encoder(v)) for v in (v1, v2))
    assert loss.item() == pytest.approx(byol.symmetric_loss(z1, z2, t1, t2).item(), rel=1e-6)
    assert not any(k.startswith('predictor') for k in model.online.state_dict())
    assert run_main(byol, ['--data', image_folder, *TINY, '--epochs', '1', '--no-predictor',
                           '--output-dir', tmp_path])[0] == 0
    saved = load(tmp_path / 'checkpoint.pth')
    assert saved['config']['no_predictor'] and not any('predictor' in k for k in saved['online'])


def test_constant_tau_zero_makes_the_target_the_online_network(image_folder, tmp_path):
    # the ablation 'stop-gradient of online' (paper Table 5a): tau = 0 at every step, not the
    # cosine from 0 to 1 that --tau 0 alone gives
    assert run_main(byol, ['--data', image_folder, *TINY, '--epochs', '1', '--tau', '0',
                           '--constant-tau', '--output-dir', tmp_path])[0] == 0
    saved = load(tmp_path / 'checkpoint.pth')
    params = [k for k in saved['target'] if not k.endswith(('running_mean', 'running_var',
                                                             'num_batches_tracked'))]
    assert len(params) > 10 and all(torch.equal(saved['target'][k], saved['online'][k])
                                    for k in params)
    assert json.loads(open(tmp_path / 'log.jsonl').read())['tau'] == 0.0


def test_ema_update_is_tau_xi_plus_one_minus_tau_theta_and_skips_bn_statistics():
    model = perturbed(tiny_byol())
    model.train()
    model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))  # moves running statistics
    online, target = model.online_target_pairs()
    expected = [0.9 * t + 0.1 * o for t, o in zip(target, online)]
    buffers = {k: v.clone() for k, v in model.target.named_buffers()}
    model.update_target(0.9)
    assert all(torch.allclose(t, e, atol=1e-6) for t, e in zip(target, expected))
    # running statistics are the target's own: the EMA does not touch them
    assert all(torch.equal(v, buffers[k]) for k, v in model.target.named_buffers())
    assert not torch.equal(model.target.encoder[0][1].running_mean,
                           model.online.encoder[0][1].running_mean)


def test_no_gradient_reaches_the_target():
    model = tiny_byol()
    loss, _ = model(torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.target.parameters())
    assert all(p.grad is not None for p in model.online.parameters())
    groups = byol.lars_param_groups(model, 1e-6)
    in_groups = {id(p) for g in groups for p in g['params']}
    assert not in_groups & {id(p) for p in model.target.parameters()}
    assert in_groups == {id(p) for p in model.online.parameters()}


def test_the_monitor_learns_on_the_frozen_representation_only():
    # The official code's monitor: a linear classifier on sg(y1), its cross-entropy added to the
    # loss; it must not change what the networks learn.
    torch.manual_seed(0)
    encoder, dim = byol.build_encoder('convnet', width=4)
    model = byol.BYOL(encoder, dim, hidden_dim=32, projection_dim=16, n_classes=3)
    v1, v2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, -1, -1])  # -1: unlabelled, left out

    def step(labels):
        model.zero_grad()
        loss, monitor = model(v1, v2, labels)
        loss.backward()
        return loss, monitor, {k: p.grad for k, p in model.online.named_parameters()}
    loss, (byol_loss, _, top1), grads = step(labels)
    plain_loss, _, plain_grads = step(None)
    logits = model.online.classifier(model.online.encoder(v1))
    assert loss.item() == pytest.approx(plain_loss.item() + F.cross_entropy(
        logits[:6], labels[:6]).item(), rel=1e-5)
    assert byol_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    unlabelled, (_, _, none_right) = model(v1, v2, torch.full((8,), -1))  # as STL-10's
    assert unlabelled.item() == pytest.approx(plain_loss.item(), rel=1e-6) and none_right == 0
    assert top1.item() == pytest.approx((logits[:6].argmax(1) == labels[:6]).float().mean())
    for name, grad in grads.items():  # the classifier learns; nothing else feels it
        if name.startswith('classifier'):
            assert grad.abs().sum() > 0 and plain_grads[name] is None
        else:
            assert torch.equal(grad, plain_grads[name]), name
    lars = byol.lars_param_groups(model, 1e-6)  # in the LARS tree, its bias excluded
    assert any(p is model.online.classifier.weight for p in lars[0]['params'])
    assert any(p is model.online.classifier.bias for p in lars[1]['params'])

# ------------------------------------------------------------------------------------------------
# byol.py: schedules (tau, learning rate)
# ------------------------------------------------------------------------------------------------


def test_tau_schedule_end_points_and_midpoint():
    assert byol.target_tau(0, 1000, 0.996) == pytest.approx(0.996)
    assert byol.target_tau(500, 1000, 0.996) == pytest.approx((1 + 0.996) / 2)
    assert byol.target_tau(1000, 1000, 0.996) == pytest.approx(1.0)
    assert byol.target_tau(5000, 1000, 0.996) == pytest.approx(1.0)  # clipped at K
    # base tau 1 (the fixed random target of the ablation): exactly 1 at every step, so the
    # update xi <- 1 xi + 0 theta leaves the target bit for bit at its initialisation
    assert all(byol.target_tau(k, 390, 1.0) == 1.0 for k in range(391))
    # 1 - (1 - 0.99) (cos(pi / 4) + 1) / 2 at k = K/4
    assert byol.target_tau(250, 1000, 0.99) == pytest.approx(
        1 - 0.01 * (math.sqrt(0.5) + 1) / 2)


def test_learning_rate_warmup_and_cosine_end_points():
    peak, warmup, total = 3.2, 100, 1100
    assert byol.learning_rate(0, total, warmup, peak) == 0.0
    assert byol.learning_rate(50, total, warmup, peak) == pytest.approx(1.6)
    assert byol.learning_rate(100, total, warmup, peak) == pytest.approx(peak)
    assert byol.learning_rate(600, total, warmup, peak) == pytest.approx(peak / 2)
    assert byol.learning_rate(1100, total, warmup, peak) == pytest.approx(0.0, abs=1e-12)

# ------------------------------------------------------------------------------------------------
# byol.py: LARS
# ------------------------------------------------------------------------------------------------


def test_lars_groups_exclude_biases_and_norm_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(),
                          nn.LazyLinear(2), nn.LayerNorm(2))
    model(torch.randn(2, 3, 5, 5))
    adapted, excluded = byol.lars_param_groups(model, 1e-6)
    assert [id(p) for p in adapted['params']] == [id(model[0].weight), id(model[3].weight)]
    assert {id(p) for p in excluded['params']} == {id(model[1].weight), id(model[1].bias),
                                                  id(model[3].bias), id(model[4].weight),
                                                  id(model[4].bias)}
    assert adapted['weight_decay'] == 1e-6 and adapted['lars']
    assert excluded['weight_decay'] == 0.0 and not excluded['lars']


def test_lars_matches_a_hand_computed_update():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))   # ||w|| = 5
    b = nn.Parameter(torch.tensor([1.0, -1.0]))  # a bias: no weight decay, no trust ratio
    optimizer = byol.LARS([dict(params=[w], weight_decay=0.1, lars=True),
                           dict(params=[b], weight_decay=0.0, lars=False)], lr=0.5)
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([0.2, 0.4])
    optimizer.step()
    # u = g + 0.1 w = (1.3, 0.4); trust = 1e-3 * 5 / ||u||; m = trust u; w -= 0.5 m
    u = [1.3, 0.4]
    trust = 1e-3 * 5 / math.sqrt(1.3 ** 2 + 0.4 ** 2)
    m1 = [trust * x for x in u]
    w1 = [3 - 0.5 * m1[0], 4 - 0.5 * m1[1]]
    assert torch.allclose(w.data, torch.tensor(w1), atol=1e-7)
    assert torch.allclose(b.data, torch.tensor([1 - 0.5 * 0.2, -1 - 0.5 * 0.4]), atol=1e-7)
    # second step: m = 0.9 m + u(new w, same gradient)
    optimizer.step()
    u2 = [1.0 + 0.1 * w1[0], 0.1 * w1[1]]
    trust2 = 1e-3 * math.hypot(*w1) / math.hypot(*u2)
    m2 = [0.9 * m + trust2 * x for m, x in zip(m1, u2)]
    assert torch.allclose(w.data, torch.tensor([w1[0] - 0.5 * m2[0], w1[1] - 0.5 * m2[1]]),
                          atol=1e-7)
    bm2 = [0.9 * 0.2 + 0.2, 0.9 * 0.4 + 0.4]
    assert torch.allclose(b.data, torch.tensor([0.9 - 0.5 * bm2[0], -1.2 - 0.5 * bm2[1]]),
                          atol=1e-7)


def test_lars_skips_the_trust_ratio_for_zero_weights():
    w = nn.Parameter(torch.zeros(3))
    optimizer = byol.LARS([dict(params=[w], weight_decay=0.1, lars=True)], lr=1.0)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    optimizer.step()
    assert torch.equal(w.data, -torch.tensor([1.0, 2.0, 3.0]))

# ------------------------------------------------------------------------------------------------
# byol.py: distributed: BN over the global batch, 1 == N processes
# ------------------------------------------------------------------------------------------------


def haiku_moving_average(values, decay=0.9):
    """Haiku's ExponentialMovingAverage(decay, zero_debias=True) over a sequence of values, in
    float64, as the official code keeps BN statistics: hidden starts at 0; at update k,
    hidden <- decay hidden + (1 - decay) v and average = hidden / (1 - decay^k)."""
    hidden = 0
    for k, v in enumerate(values, start=1):
        hidden = decay * hidden + (1 - decay) * v
    return hidden / (1 - decay ** k)


def test_batchnorm_keeps_the_official_running_statistics():
    bn = byol.BatchNorm(3)
    batches = [torch.randn(8, 3, 5, 5, dtype=torch.float64) * (k + 1) + k for k in range(4)]
    for k, x in enumerate(batches, start=1):
        y = bn.float()(x.float())
        # training mode normalises with the batch's own statistics (biased variance)
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        expected = (x - mean.view(1, 3, 1, 1)) / (var.view(1, 3, 1, 1) + 1e-5).sqrt()
        assert torch.allclose(y.double(), expected, atol=1e-5)
        if k == 1:  # debiased: the first batch's own statistics, not 0.1 of them (torch: 1)
            assert torch.allclose(bn.running_mean.double(), mean, atol=1e-6)
            assert torch.allclose(bn.running_var.double(), var, atol=1e-5)
    means = [x.mean((0, 2, 3)) for x in batches]
    variances = [x.var((0, 2, 3), unbiased=False) for x in batches]
    assert torch.allclose(bn.running_mean.double(), haiku_moving_average(means), atol=1e-5)
    assert torch.allclose(bn.running_var.double(), haiku_moving_average(variances), rtol=1e-5)
    assert bn.num_batches_tracked.item() == 4
    # eval mode normalises with them; the state dict is torch's BatchNorm's
    bn.eval()
    x = batches[0].float()
    reference = nn.BatchNorm2d(3)
    reference.load_state_dict(bn.state_dict())
    assert torch.equal(bn(x), reference.eval()(x))
    # a float64 network keeps float64 statistics
    double = byol.BatchNorm(3).double()
    double(batches[0])
    assert double.running_var.dtype == torch.float64
    assert torch.allclose(double.running_var, variances[0], rtol=1e-12)


def test_every_bn_of_the_networks_is_the_official_one():
    model = tiny_byol()
    for arch, width in (('resnet18', 1), ('resnet50', 2)):
        model.online[arch] = byol.build_encoder(arch, width=width)[0]
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) > 40 and all(type(m) is byol.BatchNorm for m in norms)


def test_global_batchnorm_equals_batchnorm_in_one_process():
    x = torch.randn(8, 3, 5, 5, requires_grad=True)
    bn = byol.BatchNorm(3)
    synced = byol.synchronize_batchnorm(nn.Sequential(copy.deepcopy(bn)))[0]
    assert synced.synchronized and not bn.synchronized
    y_ref = bn(x)
    y = synced(x)  # (one process: its all-reduces are skipped)
    assert torch.allclose(y, y_ref, atol=1e-5)
    g_ref, = torch.autograd.grad((y_ref ** 3).sum(), x)
    g, = torch.autograd.grad((y ** 3).sum(), x)
    assert torch.allclose(g, g_ref, atol=1e-4)
    assert torch.allclose(synced.running_var, bn.running_var, atol=1e-6)
    assert torch.allclose(synced.running_mean, bn.running_mean, atol=1e-6)


def test_global_batchnorm_keeps_the_activations_dtype():
    # bf16 in, bf16 out (as torch's BN); float64 in, float64 out (issue: it failed there)
    x = torch.randn(8, 3, 5, 5)
    y_ref = byol.BatchNorm(3).double()(x.double())
    for dtype, tolerance in ((torch.bfloat16, 0.02), (torch.float64, 1e-12)):
        synced = byol.synchronize_batchnorm(byol.BatchNorm(3)).to(
            torch.float64 if dtype == torch.float64 else torch.float32)
        x_in = x.to(dtype).requires_grad_()
        y = synced(x_in)
        assert y.dtype == dtype
        assert (y.double() - y_ref).abs().max() < tolerance  # one bf16 rounding of values ~2
        g, = torch.autograd.grad((y.double() ** 3).sum(), x_in)
        assert g.dtype == dtype


def fused_stand_ins(monkeypatch):
    """CPU versions of torch's fused BN kernels (CUDA only), as documented in their sources
    (aten/src/ATen/native/cuda/Normalization.cu), so that GlobalBatchNorm's GPU path runs here:
    the glue (argument order, the count's dtype and meaning) is what this tests; the kernels
    themselves are checked on the GPU at first use (byol.check_global_batch_norm)."""
    def shape(x):
        return (1, -1) + (1,) * (x.dim() - 2)

    def dims(x):
        return [0, *range(2, x.dim())]

    def elemt(x, weight, bias, mean, invstd, eps):
        out = (x.to(mean.dtype) - mean.view(shape(x))) * (invstd * weight).view(shape(x))
        return (out + bias.view(shape(x))).to(x.dtype)

    def backward_reduce(dy, x, mean, invstd, weight, input_g, weight_g, bias_g):
        dy, x_mu = dy.to(mean.dtype), x.to(mean.dtype) - mean.view(shape(x))
        sum_dy, sum_dy_xmu = dy.sum(dims(x)), (dy * x_mu).sum(dims(x))
        return sum_dy, sum_dy_xmu, (sum_dy_xmu * invstd).to(weight.dtype), sum_dy.to(weight.dtype)

    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        assert count.dtype == torch.int32  # (the kernel reads int32 counts and sums them)
        n = count.sum().to(mean.dtype)
        x_mu = x.to(mean.dtype) - mean.view(shape(x))
        dx = (dy.to(mean.dtype) - (sum_dy / n).view(shape(x))
              - x_mu * (invstd ** 2 * sum_dy_xmu / n).view(shape(x))) * \
            (weight * invstd).view(shape(x))
        return dx.to(x.dtype)

    monkeypatch.setattr(byol, 'fused_kernels', lambda x: True)
    monkeypatch.setattr(torch, 'batch_norm_elemt', elemt)
    monkeypatch.setattr(torch, 'batch_norm_backward_reduce', backward_reduce)
    monkeypatch.setattr(torch, 'batch_norm_backward_elemt', backward_elemt)


def test_the_fused_path_is_for_cuda_tensors_and_checks_itself(monkeypatch):
    assert not byol.fused_kernels(torch.zeros(1))
    cuda_like = torch.zeros(1)
    monkeypatch.setattr(torch.Tensor, 'is_cuda', property(lambda self: True))
    assert byol.fused_kernels(cuda_like)
    monkeypatch.undo()
    fused_stand_ins(monkeypatch)
    byol.check_global_batch_norm(torch.device('cpu'))  # passes
    # a kernel that computes something else is caught, with one line
    monkeypatch.setattr(torch, 'batch_norm_backward_elemt',
                        lambda dy, x, mean, invstd, weight, *rest: dy * invstd.view(1, -1, 1, 1))
    with pytest.raises(byol.UserError, match='synchronised BN differs'):
        byol.check_global_batch_norm(torch.device('cpu'))


def test_bf16_is_the_default_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)  # emulated too
    for capability, amp in (((7, 0), 'none'), ((7, 5), 'none'), ((8, 0), 'bf16'),
                            ((9, 0), 'bf16')):
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda *a: capability)
        assert byol.default_amp() == amp, capability
    # CPUs: bf16 with AMX, and with AVX-512 BF16 on AMD's (measured faster there), else float32
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    for amx, avx512_bf16, vendor, amp in ((True, True, 'GenuineIntel', 'bf16'),
                                          (False, True, 'AuthenticAMD', 'bf16'),
                                          (False, True, 'GenuineIntel', 'none'),
                                          (False, False, 'AuthenticAMD', 'none')):
        monkeypatch.setattr(torch.cpu, '_is_amx_tile_supported', lambda: amx)
        monkeypatch.setattr(torch.cpu, '_is_avx512_bf16_supported', lambda: avx512_bf16)
        monkeypatch.setattr(byol, 'cpu_vendor', lambda: vendor)
        assert byol.default_amp() == amp, (amx, avx512_bf16, vendor)
    assert byol.cpu_vendor() in ('GenuineIntel', 'AuthenticAMD', '')  # this machine's


def test_amp_none_is_float32_without_tf32_and_autocast_may_use_it(monkeypatch):
    for flag in ('benchmark', 'allow_tf32'):  # (restored after the test)
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32',
                        torch.backends.cuda.matmul.allow_tf32)
    for amp, tf32 in (('bf16', True), ('none', False), ('fp16', True), ('none', False)):
        byol.configure_device(torch.device('cuda'), amp)
        assert torch.backends.cuda.matmul.allow_tf32 is tf32, amp
        assert torch.backends.cudnn.allow_tf32 is tf32, amp
        assert torch.backends.cudnn.benchmark


def from_rank0_worker(rank, folder):
    """One of two gloo processes: rank 0's folder holds the checkpoint, rank 1's is empty (as
    node-local output folders); or rank 0's file is corrupt."""
    byol.dist.init_process_group('gloo', init_method=f'file://{folder}/store', rank=rank,
                                 world_size=2)
    results = []
    for run in ('good', 'corrupt'):
        try:
            out = folder / run / f'rank{rank}'
            path, checkpoint = byol.from_rank0(lambda: byol.find_checkpoint(None, out))
            results.append((str(path), checkpoint))
        except byol.UserError as e:
            results.append(str(e))
    torch.save(results, folder / f'out{rank}.pt')
    byol.dist.destroy_process_group()


def test_rank0_decides_the_resume_and_sends_every_process_its_checkpoint(tmp_path):
    for run in ('good', 'corrupt'):
        for rank in (0, 1):
            (tmp_path / run / f'rank{rank}').mkdir(parents=True)
    state = dict(step=7, online={'w': torch.arange(5.0)}, config={'seed': 0})
    byol.save_atomic(state, tmp_path / 'good' / 'rank0' / 'checkpoint.pth')
    (tmp_path / 'corrupt' / 'rank0' / 'checkpoint.pth').write_bytes(b'truncated')
    torch.multiprocessing.spawn(from_rank0_worker, (tmp_path,), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f'out{r}.pt', weights_only=False) for r in (0, 1))
    for path, checkpoint in (rank0[0], rank1[0]):  # rank 1 found nothing itself
        assert path == str(tmp_path / 'good' / 'rank0' / 'checkpoint.pth')
        assert checkpoint['step'] == 7 and torch.equal(checkpoint['online']['w'],
                                                       torch.arange(5.0))
    assert rank0[1] == rank1[1] and 'cannot read checkpoint' in rank1[1]  # the same error


def smooth_resnet18():
    """ResNet-18 (small-image stem) with SiLU for ReLU. With ReLU, one or two of a batch's 4.5M
    pre-activations lie within float32 rounding of 0 and flip sign between any two float32
    computations (1 vs 2 processes, float32 vs float64 in one process alike), which moves some
    gradients by ~1e-3; a smooth activation leaves only the arithmetic of the BN to compare."""
    torch.manual_seed(0)
    net, _ = byol.build_encoder('resnet18', small_images=True)
    for module in list(net.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
    return net


def sync_bn_worker(rank, folder, fused):
    """One of two gloo processes of the test below: half of each batch, statistics synced;
    fused: through the GPU path's kernels (their CPU stand-ins)."""
    torch.set_num_threads(1)
    byol.dist.init_process_group('gloo', init_method=f'file://{folder}/store', rank=rank,
                                 world_size=2)
    with pytest.MonkeyPatch.context() as monkeypatch:
        if fused:
            fused_stand_ins(monkeypatch)
        half = slice(4 * rank, 4 * rank + 4)
        encoder = byol.synchronize_batchnorm(smooth_resnet18())
        grads = []
        for x, upstream in torch.load(folder / 'batches.pt'):
            encoder.zero_grad()
            encoder(x[half]).backward(upstream[half])
            grads.append([byol.all_reduce_sum(p.grad) for p in encoder.parameters()])
        bn = byol.synchronize_batchnorm(byol.BatchNorm(16))
        y = bn(torch.load(folder / 'offset.pt')[half])
    ys = [torch.empty_like(y) for _ in range(2)]
    byol.dist.all_gather(ys, y.detach())
    if rank == 0:
        torch.save((grads, torch.cat(ys), bn.running_var), folder / 'out.pt')
    byol.dist.destroy_process_group()


@pytest.mark.parametrize('fused', [False, True], ids=['cpu', 'gpu-kernels-stand-ins'])
def test_two_processes_compute_the_gradients_of_one_on_a_resnet(fused, tmp_path):
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 512, generator=g))
               for _ in range(3)]
    offset = 1000 + torch.randn(8, 16, generator=g, dtype=torch.float64)  # |mean| / std ~ 1000
    torch.save(batches, tmp_path / 'batches.pt')
    torch.save(offset.float(), tmp_path / 'offset.pt')
    torch.multiprocessing.spawn(sync_bn_worker, (tmp_path, fused), nprocs=2)
    grads, y, running_var = torch.load(tmp_path / 'out.pt')
    encoder = smooth_resnet18()
    for (x, upstream), two in zip(batches, grads):  # 1 process, the whole batch of 8
        encoder.zero_grad()
        encoder(x).backward(upstream)
        errors = [((a - p.grad).norm() / p.grad.norm()).item()
                  for a, p in zip(two, encoder.parameters())]
        assert max(errors) < 2e-5, max(errors)  # float32 rounding: measured <= 4e-6
    # The statistics of inputs far from 0 (float32 sums of squares cancel there): as float64's
    reference = byol.BatchNorm(16).double()
    expected = reference(offset)
    assert ((y.double() - expected).norm() / expected.norm()).item() < 1e-3  # measured 4e-5
    # after one update, the running variance is the global batch's (biased) variance
    assert torch.allclose(running_var.double(), offset.var(0, unbiased=False), rtol=1e-2)


@pytest.mark.parametrize('where', ['--data-on-device', '--no-data-on-device'])
def test_two_gloo_processes_match_one(where, image_folder, tmp_path):
    args = ['--data', str(image_folder), *TINY, where, '--epochs', '2']
    assert run_main(byol, args + ['--output-dir', tmp_path / 'one'])[0] == 0
    env = dict(os.environ, OMP_NUM_THREADS='1')
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node=2', str(HERE / 'byol.py')]
    result = subprocess.run(torchrun + args + ['--output-dir', str(tmp_path / 'two')],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert '2 process(es)' in result.stdout
    one, two = load(tmp_path / 'one' / 'checkpoint.pth'), load(tmp_path / 'two' /
                                                                 'checkpoint.pth')
    assert one['step'] == two['step'] == 8
    assert_same_state(one, two, exact=False)  # equal up to float reduction order
    # the global batch must divide over the processes
    result = subprocess.run(torchrun + args[:-2] + ['--epochs', '1', '--batch-size', '15',
                                                    '--output-dir', str(tmp_path / 'odd')],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode != 0
    assert 'byol.py: error: --batch-size 15 does not divide over 2 processes' in result.stderr

# ------------------------------------------------------------------------------------------------
# byol.py: checkpoints, export, resume
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('where', ['--data-on-device', '--no-data-on-device'])
def test_resume_mid_epoch_is_bit_exact(where, image_folder, tmp_path, capsys):
    args = ['--data', image_folder, *TINY, where, '--epochs', '3']  # 4 steps an epoch, 12 in all
    assert run_main(byol, args + ['--output-dir', tmp_path / 'full'])[0] == 0
    assert run_main(byol, args + ['--output-dir', tmp_path / 'part', '--stop-at-step', '6'])[0] == 0
    stopped = load(tmp_path / 'part' / 'checkpoint.pth')
    assert stopped['step'] == 6 and not (tmp_path / 'part' / 'encoder.pth').exists()
    code, out, _ = run_main(byol, args + ['--output-dir', tmp_path / 'part'], capsys)
    assert code == 0 and 'resumed from' in out and 'at step 6' in out
    full, resumed = load(tmp_path / 'full' / 'checkpoint.pth'), load(tmp_path / 'part' /
                                                                      'checkpoint.pth')
    assert full['step'] == resumed['step'] == 12
    assert_same_state(full, resumed)
    for state_a, state_b in zip(full['optimizer']['state'].values(),
                                resumed['optimizer']['state'].values()):
        assert torch.equal(state_a['momentum_buffer'], state_b['momentum_buffer'])
    # the schedules were those of the full run: the last epoch's logged loss is the same
    last = [json.loads(line) for line in open(tmp_path / 'full' / 'log.jsonl')][-1]
    last_resumed = [json.loads(line) for line in open(tmp_path / 'part' / 'log.jsonl')][-1]
    assert last['epoch'] == last_resumed['epoch'] == 2
    assert last['loss'] == last_resumed['loss'] and last['lr'] == last_resumed['lr']
    assert last['tau'] == pytest.approx(byol.target_tau(11, 12, byol.SHORT_RUN[2]))


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(image_folder, tmp_path):
    out = tmp_path / 'run'
    command = [sys.executable, str(HERE / 'byol.py'), '--data', str(image_folder), *TINY,
               '--epochs', '400', '--output-dir', str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=tmp_path)
    for line in process.stdout:
        if line.startswith('step '):
            process.terminate()  # SIGTERM, as a scheduler's preemption
            break
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert 'stopped by a signal' in stdout
    step = load(out / 'checkpoint.pth')['step']
    assert 2 <= step < 1600
    result = subprocess.run(command[:-4] + ['--epochs', '400', '--output-dir', str(out),
                                            '--stop-at-step', str(step + 2)],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0 and f'at step {step}' in result.stdout
    assert load(out / 'checkpoint.pth')['step'] == step + 2


def readme_slurm_script():
    """The README's SLURM batch script, as it is printed there."""
    readme = (HERE / 'README.md').read_text()
    return readme.split('#!/bin/bash\n', 1)[1].split('```', 1)[0]


@pytest.mark.slow
def test_the_readme_slurm_recipe_saves_then_requeues_under_torchrun(image_folder, tmp_path):
    # The README's script, run as SLURM would (srun and scontrol stood in for), with torchrun's
    # 2 CPU processes on the tiny folder: SIGUSR1 to the script (SLURM's --signal=B:USR1) must
    # reach byol.py through torchrun, which saves a checkpoint and exits; then the job requeues.
    script = readme_slurm_script()
    command = 'byol.py --data /imagenet --output-dir runs/r50'
    assert command in script and '--nproc_per_node=8' in script and ':29500' in script
    out = tmp_path / 'run'
    tiny = ' '.join(['--data', str(image_folder), *TINY, '--epochs', '400', '--log-every', '1',
                     '--output-dir', str(out)])
    with contextlib.closing(__import__('socket').socket()) as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    script = script.replace(command, f'{HERE / "byol.py"} {tiny}').replace(
        '--nproc_per_node=8', '--nproc_per_node=2').replace(':29500', f':{port}')
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    (bin_dir / 'srun').write_text('#!/bin/bash\nexec "$@"\n')  # srun passes USR1 on, too
    (bin_dir / 'scontrol').write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then echo localhost; exit; fi\n'
        f'echo "$@ $(python3 -c \'import torch; print(torch.load("{out}/checkpoint.pth")'
        f'["step"])\')" >> {tmp_path}/scontrol.log\n')
    for tool in ('srun', 'scontrol'):
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f'{bin_dir}:{Path(sys.executable).parent}:{os.environ["PATH"]}',
               SLURM_JOB_ID='4242', SLURM_NNODES='1', SLURM_JOB_NODELIST='node1',
               OMP_NUM_THREADS='1')
    process = subprocess.Popen(['bash', '-c', script], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith('step '):
            process.send_signal(signal.SIGUSR1)  # what SLURM sends the batch script
            break
    rest, _ = process.communicate(timeout=240)
    output = ''.join(seen) + rest
    assert 'stopped by a signal' in output, output[-3000:]
    step = load(out / 'checkpoint.pth')['step']
    assert 1 <= step < 400 * 2
    # the requeue came after the checkpoint was saved, and found it
    assert (tmp_path / 'scontrol.log').read_text().split() == ['requeue', '4242', str(step)]


def test_a_checkpoint_from_before_the_ablation_flags_still_resumes(image_folder, tmp_path):
    out = tmp_path / 'run'
    args = ['--data', image_folder, *TINY, '--epochs', '1', '--output-dir', out]
    assert run_main(byol, args + ['--stop-at-step', '2'])[0] == 0
    checkpoint = load(out / 'checkpoint.pth')
    for key in ('no_predictor', 'constant_tau'):  # settings its version did not have
        del checkpoint['config'][key]
    torch.save(checkpoint, out / 'checkpoint.pth')
    assert run_main(byol, args)[0] == 0 and load(out / 'checkpoint.pth')['step'] == 4


def test_a_run_resumes_in_another_precision(image_folder, tmp_path, capsys):
    out = tmp_path / 'run'
    args = ['--data', image_folder, *TINY[:-2], '--epochs', '2', '--output-dir', out]  # no --amp
    assert TINY[-2:] == ['--amp', 'none']
    assert run_main(byol, args + ['--amp', 'none', '--stop-at-step', '2'])[0] == 0
    code, stdout, err = run_main(byol, args + ['--amp', 'fp16', '--stop-at-step', '4'], capsys)
    assert code == 0, err  # a float32 checkpoint has no loss scale to load
    assert 'steps 1-2 ran with --amp none, the rest --amp fp16' in stdout
    fp16 = load(out / 'checkpoint.pth')
    assert fp16['config']['amp'] == 'fp16' and fp16['scaler']['scale'] > 0
    # without --amp, a resumed run keeps its own precision (not this machine's default)
    assert run_main(byol, args + ['--stop-at-step', '6'])[0] == 0
    again = load(out / 'checkpoint.pth')
    assert again['config']['amp'] == 'fp16' and again['step'] == 6
    assert run_main(byol, args + ['--amp', 'none'])[0] == 0
    assert load(out / 'checkpoint.pth')['step'] == 8


def test_bad_checkpoints_give_one_line_errors_and_keep_the_saved_one(image_folder, tmp_path,
                                                                     capsys):
    out = tmp_path / 'out'
    args = ['--data', image_folder, *TINY, '--epochs', '1', '--output-dir', out]
    assert run_main(byol, args)[0] == 0
    saved = (out / 'checkpoint.pth').read_bytes()
    code, _, err = run_main(byol, args + ['--arch', 'resnet18', '--width', '1'], capsys)
    assert_one_line_error(code, err, 'was made with --arch convnet (now resnet18)')
    code, _, err = run_main(byol, args + ['--batch-size', '32'], capsys)
    assert_one_line_error(code, err, '--batch-size 16 (now 32)')
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    code, _, err = run_main(byol, args + ['--resume', tmp_path / 'junk.pth'], capsys)
    assert_one_line_error(code, err, 'cannot read checkpoint', 'junk.pth')
    code, _, err = run_main(byol, args + ['--resume', out / 'encoder.pth'], capsys)
    assert_one_line_error(code, err, 'not a byol.py training checkpoint')
    code, _, err = run_main(byol, args + ['--resume', tmp_path / 'missing.pth'], capsys)
    assert_one_line_error(code, err, 'does not exist')
    assert (out / 'checkpoint.pth').read_bytes() == saved


def test_exported_encoder_loads_into_torchvision(image_folder, tmp_path):
    out = tmp_path / 'r18'
    args = ['--data', image_folder, *TINY, '--arch', 'resnet18', '--width', '1',
            '--no-small-images', '--epochs', '1', '--output-dir', out]
    assert run_main(byol, args)[0] == 0
    state = load(out / 'encoder.pth')
    resnet = torchvision.models.resnet18()
    result = resnet.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ['fc.bias', 'fc.weight']
    assert result.unexpected_keys == []
    checkpoint = load(out / 'checkpoint.pth')
    assert torch.equal(resnet.conv1.weight, checkpoint['online']['encoder.conv1.weight'])
    x = torch.randn(2, 3, 32, 32)
    from_export, dim, settings = linear_eval.load_encoder(out / 'encoder.pth')
    from_checkpoint, _, checkpoint_settings = linear_eval.load_encoder(out / 'checkpoint.pth')
    assert settings == checkpoint_settings == dict(arch='resnet18', width=1, small_images=False,
                                                   image_size=20,  # the folder's 24x20 images
                                                   padding='torch')
    resnet.fc = nn.Identity()
    outputs = [m.eval()(x) for m in (from_export, from_checkpoint, resnet)]
    assert dim == 512 and torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0],
                                                                              outputs[2])

# ------------------------------------------------------------------------------------------------
# byol.py: the training loop and its speed features
# ------------------------------------------------------------------------------------------------


def test_eval_every_logs_the_monitors_accuracy(image_folder, tmp_path, capsys):
    code, stdout, _ = run_main(byol, ['--data', image_folder, *TINY, '--epochs', '2',
                                      '--eval-every', '1', '--output-dir', tmp_path], capsys)
    assert code == 0
    assert stdout.startswith('recipe: short run (--epochs 2 < 40,')  # which recipe, and why, first
    records = [json.loads(line) for line in open(tmp_path / 'log.jsonl')]
    assert [r['epoch'] for r in records] == [0, 1]
    steps = [line for line in stdout.splitlines() if line.startswith('step ')]
    assert steps and all('| top-1 ' in line for line in steps)  # the train batches' top-1
    # the logged validation top-1 is the saved classifier's, on the val/ centre crops
    checkpoint = load(tmp_path / 'checkpoint.pth')
    encoder, dim = byol.build_encoder('convnet', True, 4)
    encoder.load_state_dict({k[8:]: v for k, v in checkpoint['online'].items()
                             if k.startswith('encoder.')})
    classifier = nn.Linear(dim, 4)
    classifier.load_state_dict({k[11:]: v for k, v in checkpoint['online'].items()
                                if k.startswith('classifier.')})
    val = augment.load_images(str(image_folder), split='val')
    y, labels = linear_eval.features(nn.Sequential(encoder, classifier), val, 20, 16, 0,
                                     torch.device('cpu'))
    expected = 100 * (y.argmax(1) == labels).float().mean().item()
    assert records[-1]['val_top1'] == pytest.approx(expected)
    assert 0 <= records[-1]['train_top1'] <= 100


@pytest.mark.parametrize('where', [['--data-on-device'], ['--no-data-on-device'],
                                   ['--no-data-on-device', '--on-device', 'views'],
                                   ['--no-data-on-device', '--on-device', 'crop']])
def test_a_corrupt_image_mid_run_is_skipped_with_a_warning(where, image_folder, tmp_path, capsys):
    data = tmp_path / 'data'
    import shutil
    shutil.copytree(image_folder / 'train', data)
    (data / 'class3' / 'zzz_broken.jpg').write_bytes(b'\xff\xd8 truncated')
    code, out, err = run_main(byol, ['--data', data, *TINY, *where, '--epochs', '1',
                                     '--output-dir', tmp_path / 'out'], capsys)
    assert code == 0 and 'done' in out
    assert 'warning: skipping unreadable image' in err and 'zzz_broken.jpg' in err


@pytest.mark.parametrize('on_device', ['views', 'crop'])
def test_every_placement_trains_with_loader_workers(on_device, image_folder, tmp_path):
    # Each --on-device choice, with a loader worker as users run it, ends where the default
    # placement without workers ends, bit for bit.
    args = ['--data', image_folder, *TINY, '--no-data-on-device', '--epochs', '1']
    assert run_main(byol, args + ['--output-dir', tmp_path / 'default'])[0] == 0
    assert run_main(byol, args + ['--on-device', on_device, '--workers', '1',
                                  '--output-dir', tmp_path / on_device])[0] == 0
    assert_same_state(load(tmp_path / 'default' / 'checkpoint.pth'),
                      load(tmp_path / on_device / 'checkpoint.pth'))


def test_running_out_of_gpu_memory_says_what_fits_in_one_line(image_folder, tmp_path, capsys,
                                                              monkeypatch):
    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(byol, 'train_step', out_of_memory)
    monkeypatch.setattr(torch.cuda, 'get_device_properties',
                        lambda device: type('Properties', (), dict(total_memory=40 * 2 ** 30)))
    code, _, err = run_main(byol, ['--data', image_folder, *TINY, '--epochs', '1',
                                   '--output-dir', tmp_path], capsys)
    # a 40 GiB GPU in float32: 3/4 of (40 - 4) GiB over 164 MiB an image of a ResNet-50
    fits = int(0.75 * 36 * 2 ** 30 / (164 * 2 ** 20))
    assert fits == 168
    assert_one_line_error(code, err, 'ran out of memory at 16 images per GPU', '40 GiB',
                          f'fits about {fits} per GPU', 'more GPUs', 'smaller --batch-size')


def test_a_diverging_loss_stops_with_a_clear_message(image_folder, tmp_path, capsys):
    code, _, err = run_main(byol, ['--data', image_folder, *TINY, '--epochs', '2', '--lr', '1e30',
                                   '--output-dir', tmp_path], capsys)
    assert_one_line_error(code, err, 'the loss is nan', 'lower --lr')


def step_outputs(model, v1, v2, amp='none', memory_format=torch.contiguous_format):
    model = copy.deepcopy(model).to(memory_format=memory_format)
    v1, v2 = (v.contiguous(memory_format=memory_format) for v in (v1, v2))
    with byol.autocast(torch.device('cpu'), amp):
        loss, _ = model(v1, v2)
    loss.backward()
    return loss.item(), torch.cat([p.grad.flatten() for p in model.online.parameters()])


def test_bf16_autocast_and_channels_last_compute_the_same_step():
    torch.manual_seed(0)
    encoder, dim = byol.build_encoder('resnet18', small_images=True)
    model = byol.BYOL(encoder, dim, hidden_dim=64, projection_dim=32)
    crops = torch.randint(0, 256, (8, 2, 3, 16, 16), dtype=torch.uint8)
    u = augment.uniforms(0, 0, torch.arange(8))
    v1, v2 = augment.Pipeline(None, 16, 'byol').views(crops, u, None, None)
    loss, grad = step_outputs(model, v1, v2)
    loss_cl, grad_cl = step_outputs(model, v1, v2, memory_format=torch.channels_last)
    assert loss_cl == pytest.approx(loss, rel=1e-5)
    assert (grad_cl - grad).norm() / grad.norm() < 5e-3  # the same up to summation order
    loss_bf16, grad_bf16 = step_outputs(model, v1, v2, amp='bf16')
    assert loss_bf16 == pytest.approx(loss, rel=3e-2)
    cosine = torch.nn.functional.cosine_similarity(grad_bf16, grad, dim=0)
    assert cosine > 0.8, cosine  # bf16's 8-bit mantissa: measured 0.90 here, not noise (~0)


def test_compiled_model_computes_the_eager_loss_and_gradients():
    model = tiny_byol()
    v1, v2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    eager = copy.deepcopy(model)
    loss, _ = eager(v1, v2)
    loss.backward()
    compiled_loss, _ = torch.compile(model)(v1, v2)
    compiled_loss.backward()
    assert compiled_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    grad = torch.cat([p.grad.flatten() for p in eager.online.parameters()])
    compiled_grad = torch.cat([p.grad.flatten() for p in model.online.parameters()])
    assert (compiled_grad - grad).norm() < 1e-4 * grad.norm()  # fused kernels' rounding only

# ------------------------------------------------------------------------------------------------
# byol.py: the command line (defaults, bad input)
# ------------------------------------------------------------------------------------------------


def test_image_size_and_stem_do_not_depend_on_the_first_image(tmp_path):
    # ImageNet-like: photos of varied sizes, the first one small -> the paper's 224, ImageNet stem
    photos = photo_folder(tmp_path / 'photos', [(60, 80), (375, 500), (333, 500), (500, 400)] * 8)
    args = resolved(photos)
    assert (args.image_size, args.small_images) == (224, False)
    assert augment.images_in_memory(augment.load_images(str(photos))) is None
    # every image of one small size (checked, all of them): the native size, small-image stem
    tiny = photo_folder(tmp_path / 'tiny', [(32, 32)] * 7 + [(32, 30)])
    assert (resolved(tiny).image_size, resolved(tiny).small_images) == (224, False)
    (tmp_path / 'tiny' / 'class1' / '007.jpg').unlink()
    assert (resolved(tiny).image_size, resolved(tiny).small_images) == (32, True)
    assert augment.images_in_memory(augment.load_images(str(tiny))).shape == (7, 3, 32, 32)
    # the flags decide over both
    assert (resolved(photos, '--image-size', 64).image_size, resolved(photos).small_images) == \
        (64, False)
    assert resolved(photos, '--image-size', 64).small_images
    assert not resolved(tiny, '--no-small-images').small_images
    # a training run with the defaults on the photos: 224 px crops, the ImageNet stem
    out = tmp_path / 'run'
    assert run_main(byol, ['--data', photos, *TINY, '--epochs', '1', '--output-dir', out])[0] == 0
    config = load(out / 'checkpoint.pth')['config']
    assert (config['image_size'], config['small_images']) == (224, False)


RECIPE = ('lr', 'wd', 'tau', 'warmup_epochs', 'hidden_dim', 'projection_dim')


def test_short_runs_take_the_short_run_recipe_and_the_paper_presets_stay(image_folder):
    images = augment.load_images(str(image_folder))  # (read once: its size check is cached)

    def recipe(*argv):
        args = byol.get_parser().parse_args(['--data', str(image_folder), *map(str, argv)])
        return tuple(getattr(byol.resolve_config(args, images), k) for k in RECIPE)
    # the paper's presets (official configs/byol.py) at their epoch counts, untouched
    for epochs, preset in ((40, (0.45, 1e-6, 0.97)), (100, (0.45, 1e-6, 0.99)),
                           (300, (0.3, 1e-6, 0.99)), (1000, (0.2, 1.5e-6, 0.996))):
        assert recipe('--epochs', epochs) == (*preset, 10, 4096, 256)
        assert recipe('--epochs', epochs, '--arch', 'convnet') == (*preset, 10, 4096, 256)
    assert recipe('--epochs', 41) == recipe('--epochs', 100)  # the next longer preset
    assert recipe('--epochs', 2000) == recipe('--epochs', 1000)
    # under 40 epochs: the short-run recipe, warmup a tenth of the run, heads sized to f
    assert recipe('--epochs', 5, '--arch', 'convnet', '--width', 16) == (4.0, 1e-6, 0.99, 0.5,
                                                                         512, 128)
    assert recipe('--epochs', 1, '--arch', 'resnet18')[3:] == (0.1, 2048, 256)
    assert recipe('--epochs', 39, '--arch', 'resnet50')[3:] == (3.9, 4096, 256)  # the paper's
    # every flag given explicitly wins, in either recipe
    flags = ('--lr', 0.3, '--wd', 0, '--tau', 0.9, '--warmup-epochs', 2, '--hidden-dim', 64,
             '--projection-dim', 32)
    assert recipe('--epochs', 5, '--arch', 'convnet', *flags) == (0.3, 0, 0.9, 2, 64, 32)
    assert recipe('--epochs', 1000, *flags) == (0.3, 0, 0.9, 2, 64, 32)
    # (that a short run says so in its first line: test_eval_every_logs_the_monitors_accuracy)


def test_bad_data_gives_one_line_errors(tmp_path, capsys):
    common = [*TINY, '--epochs', '1', '--output-dir', tmp_path / 'out']
    assert_one_line_error(*run_main(byol, ['--data', tmp_path / 'nope', *common], capsys)[::2],
                          'no such folder')
    (tmp_path / 'empty').mkdir()
    assert_one_line_error(*run_main(byol, ['--data', tmp_path / 'empty', *common], capsys)[::2],
                          'holds no images')
    (tmp_path / 'bad' / 'cls').mkdir(parents=True)
    (tmp_path / 'bad' / 'cls' / 'a.jpg').write_bytes(b'not a jpeg at all')
    assert_one_line_error(*run_main(byol, ['--data', tmp_path / 'bad', *common], capsys)[::2],
                          'cannot read image', 'a.jpg')
    assert_one_line_error(*run_main(byol, ['--data', 'cifar10', '--data-root', tmp_path,
                                           *common], capsys)[::2], 'pass --download')
    assert_one_line_error(*run_main(byol, ['--data', tmp_path, '--arch', 'vit'], capsys)[::2],
                          "invalid choice: 'vit'")
    for flag, value, message in (('--batch-size', 'x', "'x' is not a positive integer"),
                                 ('--batch-size', '0', "'0' is not a positive integer"),
                                 ('--epochs', '-1', "'-1' is not a positive integer"),
                                 ('--width', '0', "'0' is not a positive integer"),
                                 ('--image-size', '0', "'0' is not a positive integer"),
                                 ('--workers', '-1', "'-1' is not an integer >= 0"),
                                 ('--lr', 'nan', "'nan' is not a positive number"),
                                 ('--tau', '1.5', "'1.5' is not in [0, 1]")):
        assert_one_line_error(*run_main(byol, ['--data', tmp_path, flag, value], capsys)[::2],
                              f'argument {flag}: {message}')
    assert not (tmp_path / 'out').exists()


def test_an_unusable_output_dir_fails_before_any_work(image_folder, tmp_path, capsys,
                                                      monkeypatch):
    (tmp_path / 'file').write_text('not a folder')
    out = tmp_path / 'file' / 'out'

    def read_nothing(*args, **kwargs):
        raise AssertionError('data read before the output folder was checked')
    monkeypatch.setattr(augment, 'load_images', read_nothing)
    for module, argv in ((byol, ['--data', image_folder, *TINY]),
                         (linear_eval, ['--data', image_folder]),
                         (semi_sup, ['--data', image_folder, '--subset', '0.5']),
                         (transfer, ['--dataset', 'folder', '--data-root', image_folder])):
        code, _, err = run_main(module, argv + ['--output-dir', out], capsys)
        assert_one_line_error(code, err, f'{tmp_path / "file"} is a file, not a folder')


def test_errors_print_no_traceback_from_the_command_line(tmp_path):
    result = subprocess.run([sys.executable, str(HERE / 'byol.py'), '--data',
                             str(tmp_path / 'nope')], capture_output=True, text=True)
    assert_one_line_error(result.returncode, result.stderr, 'no such folder')

# ------------------------------------------------------------------------------------------------
# augment.py: T and T', the crop, the photometric ops
# ------------------------------------------------------------------------------------------------


def test_the_two_distributions_match_the_paper_table():
    assert (augment.T['blur_p'], augment.T_PRIME['blur_p']) == (1.0, 0.1)
    assert (augment.T['solarize_p'], augment.T_PRIME['solarize_p']) == (0.0, 0.2)
    for view in (augment.T, augment.T_PRIME):
        assert (view['flip_p'], view['jitter_p'], view['gray_p']) == (0.5, 0.8, 0.2)
        assert (view['brightness'], view['contrast'], view['saturation'], view['hue']) == \
            (0.4, 0.4, 0.2, 0.1)
        assert view['crop_area'] == (0.08, 1.0) and view['blur_sigma'] == (0.1, 2.0)


def splitmix64(x):
    """Reference splitmix64 finaliser on Python integers."""
    mask = (1 << 64) - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def test_uniforms_are_a_pure_function_of_seed_epoch_and_index():
    def reference(seed, epoch, index, slot):
        key = splitmix64(splitmix64(splitmix64(seed) ^ epoch) ^ index)
        return (splitmix64(key ^ splitmix64(slot)) >> 40) / 2 ** 24
    u = augment.uniforms(7, 3, [11, 12], n_views=2)
    assert u.shape == (2, 2, augment.N_SLOTS)
    for b, index in enumerate((11, 12)):
        for slot in (0, 5, 2 * augment.N_SLOTS - 1):
            assert u[b].flatten()[slot].item() == reference(7, 3, index, slot)
    # independent of the batch it is drawn in; different for another epoch or seed
    assert torch.equal(augment.uniforms(7, 3, [12])[0], u[1])
    assert not torch.equal(augment.uniforms(7, 4, [12])[0], u[1])
    assert not torch.equal(augment.uniforms(8, 3, [12])[0], u[1])
    many = augment.uniforms(0, 0, torch.arange(20000))
    assert 0 <= many.min() and many.max() < 1
    assert abs(many.mean().item() - 0.5) < 0.002
    assert abs(torch.corrcoef(many[:, 0, :4].T)[0, 1].item()) < 0.03


def test_crop_box_hand_computed():
    u = torch.zeros(augment.N_SLOTS)
    u[augment.SLOT['crop_ratio']] = 0.5  # log-uniform midpoint: ratio 1
    # smallest area: A = 0.08 * 100 * 100 = 800, square side round(28.28) = 28, offset 0
    assert augment.crop_box(u, 100, 100) == (0, 0, 28, 28)
    u[augment.SLOT['crop_x']] = u[augment.SLOT['crop_y']] = 0.999999
    assert augment.crop_box(u, 100, 100) == (72, 72, 28, 28)
    u[augment.SLOT['crop_area']] = 0.999999  # whole image
    assert augment.crop_box(u, 100, 100) == (0, 0, 100, 100)
    u[augment.SLOT['crop_ratio']] = 0.0  # ratio 3/4 of a full-area crop: clamped to the image
    top, left, h, w = augment.crop_box(u, 60, 80)
    assert (h, w) == (60, round(math.sqrt(4800 * 0.75))) and top == 0
    assert augment.center_crop_boxes(256, 320, 1).tolist() == [[16, 48, 224, 224]]


def test_crops_respect_area_and_ratio_bounds_over_many_draws():
    u = augment.uniforms(0, 0, torch.arange(5000))[:, 0]
    boxes = torch.tensor([augment.crop_box(x, 200, 200) for x in u], dtype=torch.float)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 200).all() and (left + w <= 200).all()
    area, ratio = h * w / 200 ** 2, w / h
    assert area.min() > 0.07 and area.max() <= 1.0
    assert ratio.min() > 0.7 and ratio.max() < 1.4
    assert abs(area.mean().item() - 0.54) < 0.02  # U[0.08, 1] has mean 0.54


def test_resized_crop_of_the_whole_image_at_its_own_size_is_the_image():
    square = (torch.rand(3, 10, 10) * 255).to(torch.uint8)
    assert torch.equal(augment.resized_crop(square, (0, 0, 10, 10), 10), square)
    assert torch.equal(augment.resized_crop(square, (2, 3, 4, 4), 4), square[:, 2:6, 3:7])


def test_crop_resize_is_tensorflows_bicubic():
    # Columns 100, 200 resized to 4: half-pixel positions x = -0.25, 0.25, 0.75, 1.25. Keys'
    # cubic (a = -0.5): W(d) = 1.5 d^3 - 2.5 d^2 + 1 (d <= 1), -0.5 d^3 + 2.5 d^2 - 4 d + 2
    # (1 < d < 2). Taps outside the image weigh 0 and the rest are renormalised (TF):
    #   x = -0.25: taps 0, 1 at d = 0.25, 1.25: weights 0.8671875, -0.0703125 (sum 0.796875)
    #   x = 0.25:  taps 0, 1 at d = 0.25, 0.75: weights 0.8671875, 0.2265625 (sum 1.09375)
    w = [(0.8671875, -0.0703125), (0.8671875, 0.2265625)]
    first = (100 * w[0][0] + 200 * w[0][1]) / sum(w[0])   # 91.18
    second = (100 * w[1][0] + 200 * w[1][1]) / sum(w[1])  # 120.71
    expected = torch.tensor([first, second, 300 - second, 300 - first]).round()
    image = torch.tensor([100, 200], dtype=torch.uint8).view(1, 1, 2).expand(3, 2, 2)
    out = augment.resized_crop(image, (0, 0, 2, 2), 4)
    assert torch.equal(out.float(), expected.expand(3, 4, 4)), out[0, 0]  # torch: 123 for 121


def test_the_loaders_four_tap_crops_equal_the_resampling_matrices():
    # crops_of (the loader: a fused four-tap gather per pass) and resized_crops (the
    # device: dense matrices, batched) must make the same pixels, up- and downscaled alike.
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 61, 83), dtype=torch.uint8, generator=g)
    u = augment.uniforms(5, 0, torch.arange(40))[:, 0]
    boxes = augment.crop_boxes(u, 61, 83)                 # (40, 4): sides from 14 to 83
    assert boxes[:, 2].min() < 32 < boxes[:, 2].max()
    loader = augment.crops_of([image] * 40, boxes[:, None], 32)[:, 0]
    device = augment.resized_crops(image.expand(40, -1, -1, -1), boxes, 32)
    difference = (loader.int() - device.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3  # float rounding


def test_every_crop_at_once_equals_the_loaders_crop_by_crop():
    # _crops_at_once (GPUs: the batch's crops in a few gathers over one tensor of photos)
    # makes crops_of's pixels bit for bit, on photos of different sizes (one pixel, one row,
    # one column wide), in one run of crops, in runs of a few, and one crop a run.
    g = torch.Generator().manual_seed(0)
    sizes = [(61, 83), (7, 90), (120, 5), (1, 1), (40, 40)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in sizes]
    u = augment.uniforms(1, 0, torch.arange(len(sizes)))
    heights, widths = torch.tensor(sizes).T
    boxes = torch.stack([augment.crop_boxes(u[:, v], heights, widths) for v in range(2)], 1)
    photos = augment.Photos.of(images)
    assert photos.pixels.shape == (sum(h * w for h, w in sizes), 3)
    assert photos.shapes.tolist() == [list(size) for size in sizes]
    assert all(torch.equal(a, b) for a, b in zip(photos.images(), images))
    by_crop = augment.crops_of(images, boxes, 32)
    assert by_crop.shape == (5, 2, 3, 32, 32)
    for chunk in (2 ** 24, 5000, 1):
        at_once = augment._crops_at_once(photos, boxes, 32, chunk=chunk)
        assert torch.equal(at_once, by_crop) and at_once.is_contiguous(), chunk
    # evaluation crops stay in float, in [0, 255]: the same sums, before the rounding
    exact = augment.crops_of(images, boxes, 32, torch.float32)
    assert exact.dtype == torch.float32 and 0 <= exact.min() and exact.max() <= 255
    assert torch.equal(exact.round().to(torch.uint8), by_crop)
    assert (exact != exact.round()).float().mean() > 0.5  # (not whole numbers: not rounded)
    assert torch.equal(augment._crops_at_once(photos, boxes, 32, torch.float32), exact)


def test_solarize_grayscale_brightness_contrast_on_known_inputs():
    x = torch.tensor([0.2, 0.5, 0.7, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert torch.allclose(augment.solarize(x)[0, 0].flatten(), torch.tensor([0.2, 0.5, 0.3, 0.0]))
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert torch.allclose(augment.grayscale(red), torch.full((1, 3, 1, 1), 0.2989))
    rgb = torch.tensor([0.5, 0.25, 1.0]).view(1, 3, 1, 1)
    assert torch.allclose(augment.grayscale(rgb),
                          torch.full((1, 3, 1, 1), 0.2989 * 0.5 + 0.5870 * 0.25 + 0.1140))
    half = torch.full((2, 3, 1, 1), 0.5)
    assert torch.allclose(augment.adjust_brightness(half, torch.tensor([0.3, 0.7])),
                          torch.tensor([0.8, 1.0]).view(2, 1, 1, 1).expand(2, 3, 1, 1))
    # contrast around each channel's own mean: channel 0 is (0.2, 0.6), mean 0.4, factor 2
    two = torch.tensor([[0.2, 0.6], [0.5, 0.5], [0.0, 0.2]]).view(1, 3, 1, 2)
    expected = torch.tensor([[0.0, 0.8], [0.5, 0.5], [0.0, 0.3]]).view(1, 3, 1, 2)
    assert torch.allclose(augment.adjust_contrast(two, torch.tensor([2.0])), expected, atol=1e-6)


def test_saturation_and_hue_match_colorsys():
    pixels = torch.rand(3, 50)
    x = pixels.view(1, 3, 1, 50)
    saturated = augment.adjust_saturation(x, torch.tensor([0.7]))[0, :, 0]
    shifted = augment.adjust_hue(x, torch.tensor([-0.15]))[0, :, 0]
    both = augment.adjust_hue(augment.adjust_saturation(x, torch.tensor([1.3])),
                              torch.tensor([0.15]))[0, :, 0]
    for i in range(50):
        h, s, v = colorsys.rgb_to_hsv(*pixels[:, i].tolist())
        for out, expected in ((saturated, (h, s * 0.7, v)), (shifted, ((h - 0.15) % 1, s, v)),
                              (both, ((h + 0.15) % 1, min(1.0, s * 1.3), v))):
            assert torch.allclose(out[:, i], torch.tensor(colorsys.hsv_to_rgb(*expected)),
                                  atol=1e-5)
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    cyan = augment.adjust_hue(red, torch.tensor([0.5]))
    assert torch.allclose(cyan.flatten(), torch.tensor([0.0, 1.0, 1.0]), atol=1e-6)
    white = augment.adjust_saturation(red, torch.tensor([0.0]))
    assert torch.allclose(white.flatten(), torch.ones(3), atol=1e-6)


def test_jitter_runs_the_ops_in_the_drawn_order():
    x = torch.rand(1, 3, 4, 4)
    u = torch.full((1, augment.N_SLOTS), 0.5)
    u[0, augment.SLOT['jitter']] = 0.0                          # jitter on
    u[0, augment.SLOT['brightness']] = 0.75                     # delta = +0.2
    u[0, augment.SLOT['contrast']] = 1.0                        # factor 1.4
    first = augment.SLOT['order_brightness']
    brightness_first, contrast_first = u.clone(), u.clone()
    # saturation and hue are drawn at their identity (u = 0.5); the order keys sort the ops
    brightness_first[0, first:first + 4] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    contrast_first[0, first:first + 4] = torch.tensor([0.2, 0.1, 0.3, 0.4])
    b = lambda y: augment.adjust_brightness(y, torch.tensor([0.2]))  # noqa: E731
    c = lambda y: augment.adjust_contrast(y, torch.tensor([1.4]))    # noqa: E731
    assert torch.allclose(augment.color_jitter(x, brightness_first, augment.T), c(b(x)),
                          atol=1e-5)
    assert torch.allclose(augment.color_jitter(x, contrast_first, augment.T), b(c(x)),
                          atol=1e-5)
    assert not torch.allclose(c(b(x)), b(c(x)), atol=1e-3)
    off = brightness_first.clone()
    off[0, augment.SLOT['jitter']] = 0.9  # above p = 0.8: no jitter
    assert torch.allclose(augment.color_jitter(x, off, augment.T), x, atol=1e-5)


JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')


def jitter_one_image_at_a_time(x, u, view):
    """The colour jitter written out as a loop over the images: an image whose coin is on runs
    the four ops, the one of lowest order key first; the others run none."""
    out = []
    for image, v in zip(x, u):
        image = image[None]
        if v[augment.SLOT['jitter']] < view['jitter_p']:
            keys = [v[augment.SLOT[f'order_{name}']].item() for name in JITTER_OPS]
            for name in sorted(JITTER_OPS, key=lambda name: keys[JITTER_OPS.index(name)]):
                r = 2 * v[augment.SLOT[name]:augment.SLOT[name] + 1] - 1  # U[-1, 1], (1,)
                if name == 'brightness':
                    image = augment.adjust_brightness(image, r * view['brightness'])
                elif name == 'contrast':
                    image = augment.adjust_contrast(image, 1 + r * view['contrast'])
                elif name == 'saturation':
                    image = augment.adjust_saturation(image, 1 + r * view['saturation'])
                else:
                    image = augment.adjust_hue(image, r * view['hue'])
        out.append(image)
    return torch.cat(out)


def every_jitter_order(n_per_order=2):
    """Colourful 8x8 images and uniforms: n_per_order images for each of the 24 orders of the
    four ops, half of them with the jitter coin on, half off -> x (48, 3, 8, 8), u (48, N_SLOTS)."""
    orders = list(itertools.permutations(range(4)))
    n = len(orders) * n_per_order
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    u = augment.uniforms(0, 0, torch.arange(n))[:, 0]
    first = augment.SLOT['order_brightness']
    for i in range(n):
        keys = u[i, first:first + 4].sort().values  # the image's keys, given to the ops in order
        u[i, first:first + 4] = keys[list(orders[i % len(orders)])]
        u[i, augment.SLOT['jitter']] = 0.3 if i < n // 2 else 0.9  # on (p 0.8), off
    return x, u


@pytest.mark.parametrize('view', [augment.T, augment.T_PRIME], ids=['T', "T'"])
def test_jitter_runs_each_drawn_op_once_per_image_as_a_loop_over_images(view, monkeypatch):
    x, u = every_jitter_order()
    first = augment.SLOT['order_brightness']
    assert len({tuple(k) for k in u[:, first:first + 4].argsort(dim=1).tolist()}) == 24
    expected = jitter_one_image_at_a_time(x, u, view)
    images_seen = Counter()

    def counting(name, adjust):  # adjust, counting the images it adjusts
        def counted(y, parameter):
            images_seen[name] += len(y)
            return adjust(y, parameter)
        return counted
    for name in JITTER_OPS:
        monkeypatch.setattr(augment, f'adjust_{name}',
                            counting(name, getattr(augment, f'adjust_{name}')))
    out = augment.color_jitter(x, u, view)
    assert torch.equal(out, expected)
    assert images_seen == {name: len(x) // 2 for name in JITTER_OPS}  # the 24 whose coin is on
    assert torch.equal(out[len(x) // 2:], x[len(x) // 2:])             # the others untouched
    assert not torch.equal(out[:len(x) // 2], x[:len(x) // 2])


def test_the_pipeline_reads_no_number_back_from_the_device():
    # The jitter's group sizes come from the uniforms on the host: the views stage runs on the
    # meta device, where reading a tensor's values back (a wait for a GPU's queue) is an error.
    crops = torch.empty(6, 2, 3, 16, 16, dtype=torch.uint8, device='meta')
    u = augment.uniforms(0, 0, torch.arange(6))
    for mode in augment.MODES:
        views = augment.Pipeline(None, 16, mode).views(crops[:, :augment.MODES[mode]], u, None,
                                                       None)
        assert views.device.type == 'meta'
        assert views.shape == (augment.MODES[mode], 6, 3, 16, 16)
    with pytest.raises(NotImplementedError):  # (what reading from the device does there)
        augment.color_jitter(crops[:, 0].float(), u[:, 0].to('meta'), augment.T)


def test_blur_kernel_is_normalised_gaussian_with_zero_padding():
    assert augment.blur_radius(224) == 11 and augment.blur_radius(32) == 1
    kernels = augment.gaussian_kernels(torch.tensor([0.1, 1.0, 2.0]), 11)
    assert kernels.shape == (3, 23)
    assert torch.allclose(kernels.sum(1), torch.ones(3))
    assert kernels[0, 11] > 0.999  # sigma 0.1: (almost) the identity
    e = math.exp(-0.5)
    k = augment.gaussian_kernels(torch.tensor([1.0]), 1)[0]
    assert torch.allclose(k, torch.tensor([e, 1, e]) / (1 + 2 * e))
    impulse = torch.zeros(1, 3, 5, 5)
    impulse[:, :, 2, 2] = 1
    blurred = augment.gaussian_blur(impulse, torch.tensor([1.0]), 1)
    assert torch.allclose(blurred[0, 0, 1:4, 1:4], torch.outer(k, k), atol=1e-6)
    ones = torch.ones(1, 3, 5, 5)
    corner = augment.gaussian_blur(ones, torch.tensor([1.0]), 1)[0, 0]
    assert torch.allclose(corner[2, 2], torch.tensor(1.0))           # interior: unchanged
    assert torch.allclose(corner[0, 0], (k[1] + k[2]) ** 2)          # zero padding at corners


def gate_rates(view, n=4000):
    """Measured rates of grayscale, blur and solarize in augment_batch for one distribution: one
    op at a time, the others switched off, on colourful 32x32 crops (3-tap blur)."""
    g = torch.Generator().manual_seed(1)
    crops = (torch.rand(n, 3, 32, 32, generator=g) * 255).to(torch.uint8)
    u = augment.uniforms(0, 0, torch.arange(n))[:, 0]
    # (sigma >= 1 so that every blur is visible: sigma 0.1 leaves an image as it is)
    off = dict(view, flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0,
               blur_sigma=(1.0, 2.0))
    plain = augment.augment_batch(crops, u, off)
    rates = {}
    for op in ('gray_p', 'blur_p', 'solarize_p', 'flip_p', 'jitter_p'):
        out = augment.augment_batch(crops, u, dict(off, **{op: view[op]}))
        rates[op] = ((out - plain).abs().amax(dim=(1, 2, 3)) > 1e-4).float().mean().item()
    return rates


@pytest.mark.parametrize('view', [augment.T, augment.T_PRIME], ids=['T', "T'"])
def test_augmentation_probabilities_over_many_draws(view):
    rates = gate_rates(view)
    for op, rate in rates.items():
        assert abs(rate - view[op]) < 0.025, (op, rate, view[op])


def test_augment_batch_is_per_image():
    crops = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    u = augment.uniforms(0, 0, torch.arange(6))[:, 1]
    whole = augment.augment_batch(crops, u, augment.T_PRIME)
    alone = torch.cat([augment.augment_batch(crops[i:i + 1], u[i:i + 1], augment.T_PRIME)
                       for i in range(6)])
    assert torch.allclose(whole, alone, atol=1e-5)
    assert whole.shape == (6, 3, 16, 16)


def test_the_views_picture_shows_the_image_then_t_and_t_prime(tmp_path, capsys):
    image = (torch.rand(3, 40, 48) * 255).to(torch.uint8)
    n, seed = 6, 18  # seed 18: two of the six views are neither solarised nor blurred in T'
    grid = augment.views_grid(image, n, seed=seed)
    assert grid.shape == (3, 2 * 42 + 2, (n + 1) * 42 + 2)  # tiles of 40 (the shorter side) + 2
    tiles = [[grid[:, 2 + 42 * r:42 * (r + 1), 2 + 42 * c:42 * (c + 1)] for c in range(n + 1)]
             for r in range(2)]
    centre = image[:, :, 4:44].float() / 255  # the centred 40 x 40 square, at its own size
    assert torch.equal(tiles[0][0], centre) and torch.equal(tiles[1][0], centre)
    # the same uniforms in both rows: T and T' views are equal exactly where T' draws the blur
    # (10%) and no solarisation (20%); elsewhere they differ (T always blurs)
    u = augment.uniforms(seed, 0, torch.arange(n), 1)[:, 0]
    same = (u[:, augment.SLOT['blur']] < 0.1) & (u[:, augment.SLOT['solarize']] >= 0.2)
    assert same.sum() == 2
    for c in range(n):
        assert torch.equal(tiles[0][c + 1], tiles[1][c + 1]) == same[c].item(), c
        assert not torch.equal(tiles[0][c + 1], centre)
    crops = augment.crops_of([image], augment.crop_boxes(u, 40, 48)[None], 40)[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (augment.MEAN, augment.STD))
    for r, view in enumerate((augment.T, augment.T_PRIME)):  # top T, bottom T', un-normalised
        views = augment.augment_batch(crops, u, view) * std + mean
        assert all(torch.allclose(tiles[r][c + 1], views[c].clamp(0, 1)) for c in range(n))
    # the command line: a PNG of that grid; one-line errors for a missing or unreadable image
    torchvision.io.write_png(image, str(tmp_path / 'in.png'))
    augment.main([str(tmp_path / 'in.png'), '--out', str(tmp_path / 'views.png'), '--n', '6',
                  '--seed', '18'])
    written = torchvision.io.read_image(str(tmp_path / 'views.png'))
    assert torch.equal(written, (grid * 255).round().to(torch.uint8))
    (tmp_path / 'bad.png').write_text('not an image')
    for path, fragment in (('missing.png', 'no such file'), ('bad.png', 'cannot read image')):
        with pytest.raises(SystemExit) as e:
            augment.main([str(tmp_path / path), '--out', str(tmp_path / 'x.png')])
        assert_one_line_error(e.value.code, capsys.readouterr().err, fragment)

# ------------------------------------------------------------------------------------------------
# augment.py: the pipeline (where each stage runs)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('mode', ['byol', 'train', 'eval'])
def test_every_placement_of_the_stages_gives_the_same_views(mode, image_folder):
    # Where the stages run (loader or device) is a matter of speed: the views are the same.
    images = augment.load_images(str(image_folder))
    keys = [(2, i) for i in (5, 0, 63, 17, 8, 40)]

    def views(on_device, source=images):
        pipeline = augment.Pipeline(source, 16, mode, seed=3, on_device=on_device)
        return pipeline.finish(pipeline.__getitems__(keys))
    reference, labels, indices = views(None)  # every stage in the loader
    assert reference.shape == (augment.MODES[mode], 6, 3, 16, 16) and reference.dtype == \
        torch.float32
    assert indices.tolist() == [5, 0, 63, 17, 8, 40]
    assert labels.tolist() == [images.labels[i] for i in indices.tolist()]
    for on_device in augment.PLACEMENTS:
        assert torch.equal(views(on_device)[0], reference), on_device
    with pytest.raises(ValueError):  # (a worker cannot send the file bytes that read returns)
        augment.Pipeline(images, 16, mode, on_device='decode')
    with pytest.raises(ValueError):
        augment.batches(images, 16, 6, mode, on_device='decode')
    with pytest.MonkeyPatch.context() as patch:  # the crops as on a GPU: all at once, from
        patch.setattr(augment, 'crops_of', augment._crops_at_once)  # the Photos the loader sent
        assert torch.equal(views('crop')[0], reference)
    # held in memory: every crop of the batch in one product; the same up to uint8 rounding
    in_memory = augment.ArrayImages(augment.images_in_memory(images), images.labels,
                                    images.classes)
    batch = augment.Pipeline(in_memory, 16, mode, seed=3, on_device='read').__getitems__(keys)
    crops = augment.Pipeline(in_memory, 16, mode, seed=3).run(batch, augment.STAGES[:3])[0]
    loader_crops = augment.Pipeline(images, 16, mode, seed=3).run(batch, augment.STAGES[:3])[0]
    difference = (crops.int() - loader_crops.int()).abs()
    assert difference.max() <= 1 and (difference > 0).float().mean() < 1e-3


def test_decoded_photos_travel_as_one_tensor_when_the_device_crops(image_folder):
    images = augment.load_images(str(image_folder))
    pipeline = augment.Pipeline(images, 16, 'byol', on_device='crop')
    data, u, labels, indices = pipeline.__getitems__([(0, i) for i in (3, 1, 2)])
    assert isinstance(data, augment.Photos) and data.pixels.dtype == torch.uint8
    assert data.shapes.tolist() == [[24, 20]] * 3 and data.pixels.shape == (3 * 24 * 20, 3)
    assert torch.equal(data.images()[1], images.load(1))


def test_photos_come_from_a_loader_worker_made_in_shared_memory(image_folder):
    # --on-device crop: the worker decodes, the photos cross to this process as one tensor
    # made in shared memory (sending copies nothing), and the views are those of one process.
    images = augment.load_images(str(image_folder))
    loader = augment.Batches(augment.Pipeline(images, 16, 'byol', 3, on_device='crop'), 8,
                             workers=1)
    loader.set_epoch(1)
    views, labels, indices = next(iter(loader))
    here = augment.Pipeline(images, 16, 'byol', 3)
    keys = [(1, i) for i in indices.tolist()]
    assert torch.equal(views, here.finish(here.__getitems__(keys))[0])

    class Made(torch.utils.data.Dataset):  # where a worker's Photos are made
        def __len__(self):
            return 1

        def __getitem__(self, i):
            return augment.Photos.of([images.load(0), images.load(1)]).pixels.is_shared()
    assert next(iter(torch.utils.data.DataLoader(Made(), batch_size=None, num_workers=1)))
    assert not Made()[0]  # (in this process: ordinary memory)


def test_views_in_the_autocast_dtype_are_the_float32_views_cast(image_folder):
    images = augment.load_images(str(image_folder))
    keys = [(0, i) for i in range(6)]
    views = []
    for dtype in (torch.float32, torch.bfloat16):
        pipeline = augment.Pipeline(images, 16, 'byol', dtype=dtype)
        views.append(pipeline.finish(pipeline.__getitems__(keys))[0])
    assert views[1].dtype == torch.bfloat16 and torch.equal(views[1], views[0].bfloat16())


def test_the_augmentation_makes_no_new_constant_tensors_per_batch(monkeypatch):
    # (on a GPU each torch.tensor(..., device='cuda') is a blocking copy, 14 of them a step)
    crops = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    u = augment.uniforms(0, 0, torch.arange(4))[:, 0]
    first = augment.augment_batch(crops, u, augment.T_PRIME)  # the constants are made here
    made = []
    real = torch.tensor
    monkeypatch.setattr(torch, 'tensor', lambda *a, **k: made.append(a) or real(*a, **k))
    assert torch.equal(augment.augment_batch(crops, u, augment.T_PRIME), first)
    assert made == []


def test_workers_are_this_process_share_of_the_cores_it_may_use(monkeypatch):
    masks = {}  # the node's processes' affinity masks, as gathered over torch.distributed

    def node(*ranks):  # a node of processes with these masks; this process has the first
        monkeypatch.setattr(augment, 'affinity_mask', lambda: set(ranks[0]))
        monkeypatch.setattr(augment, 'node_affinity_masks', lambda mask: [set(r) for r in ranks])
        return augment.default_workers()
    monkeypatch.setattr(augment, 'cpu_quota', lambda: None)
    assert node(range(128)) == 127                                  # alone on the node
    assert node(*[range(128)] * 8) == 15                            # 8 processes share it all
    assert node(*[range(64)] * 4, *[range(64, 128)] * 4) == 15      # --numa-binding=node
    assert node(*[range(16 * r, 16 * r + 16) for r in range(8)]) == 15  # exclusive binding
    assert node(*[range(64)] * 8) == 7     # SLURM: one task of 64 cores, torchrun's 8 in it
    monkeypatch.setattr(augment, 'cpu_quota', lambda: 32)               # a container's quota
    assert node(*[range(128)] * 8) == 3                             # 32 // 8 - 1
    # the quota itself, from cgroup v2's cpu.max: none ('max'), or 4 cores' worth of time
    monkeypatch.undo()

    class CpuMax:
        text = 'max 100000'

        def __init__(self, path):
            assert str(path) == '/sys/fs/cgroup/cpu.max'

        def read_text(self):
            return CpuMax.text
    monkeypatch.setattr(augment, 'Path', CpuMax)
    assert augment.cpu_quota() is None
    CpuMax.text = '400000 100000'
    assert augment.cpu_quota() == 4


def node_masks_worker(rank, folder):
    byol.dist.init_process_group('gloo', init_method=f'file://{folder}/store', rank=rank,
                                 world_size=2)
    masks = augment.node_affinity_masks({rank, 2 + rank})
    torch.save(masks, folder / f'masks{rank}.pt')
    byol.dist.destroy_process_group()


def test_the_node_processes_gather_their_affinity_masks(tmp_path):
    torch.multiprocessing.spawn(node_masks_worker, (tmp_path,), nprocs=2)
    for rank in (0, 1):
        assert torch.load(tmp_path / f'masks{rank}.pt') == [{0, 2}, {1, 3}]


def test_a_small_dev_shm_lowers_the_batches_in_flight(image_folder, monkeypatch, capsys):
    images = augment.load_images(str(image_folder))
    pipeline = augment.Pipeline(images, 224, 'byol', on_device='views')  # uint8 crops travel
    batch = 64 * 2 * 3 * 224 * 224                                         # 19.3 MB a batch
    loader = augment.Batches(pipeline, 64, workers=0)
    free = {'bytes': 2 ** 40}
    monkeypatch.setattr(os, 'statvfs', lambda path: type('S', (), dict(
        f_bavail=free['bytes'] // 4096, f_frsize=4096))())
    assert loader.shared_memory_budget(8) == (8, 2)
    free['bytes'] = 2 * 3 * batch  # room for 3 batches in half of it
    assert loader.shared_memory_budget(8) == (3, 1)
    assert 'room for 3 batches in flight of 18 MB' in capsys.readouterr().err
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '3')  # three training processes share /dev/shm
    assert loader.shared_memory_budget(8) == (1, 1)
    free['bytes'] = 2 * 3 * batch - 4096  # not even one batch in each one's share
    with pytest.raises(augment.UserError, match=r'one batch of 64 in flight takes 18 MB.*'
                       r'--shm-size 16g.*--workers 0'):
        loader.shared_memory_budget(8)
    assert loader.shared_memory_budget(0) == (0, None)  # (no workers: nothing in /dev/shm)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '1')
    pipeline.split = len(augment.STAGES)  # float32 views from the loader: 4x the bytes
    free['bytes'] = 2 * 4 * batch
    assert loader.shared_memory_budget(8) == (1, 1)
    free['bytes'] = 2 * 3 * batch
    with pytest.raises(augment.UserError, match='one batch of 64 in flight takes 74 MB'):
        loader.shared_memory_budget(8)
    pipeline.split = augment.STAGES.index('crop')  # whole photos: 470 x 390 on average
    free['bytes'] = 2 * 3 * 64 * 3 * 470 * 390 + 8192  # (in whole 4 kB blocks)
    assert loader.shared_memory_budget(8) == (3, 1)


def test_batches_are_drawn_by_image_index_whatever_the_placement(image_folder):
    images = augment.load_images(str(image_folder))
    runs = []
    for in_memory in (False, True):
        loader, where = augment.batches(images, 16, 8, 'byol', seed=1, in_memory=in_memory)
        assert ('held in memory' in where) == in_memory and len(loader) == 8
        loader.set_epoch(1, skip_batches=5)
        runs.append([(views, labels, indices) for views, labels, indices in loader])
    assert len(runs[0]) == len(runs[1]) == 3  # 8 batches, 5 skipped (a resumed epoch)
    for (views, labels, indices), (views_m, labels_m, indices_m) in zip(*runs):
        assert torch.equal(indices, indices_m) and torch.equal(labels, labels_m)
        assert views.shape == views_m.shape == (2, 8, 3, 16, 16)
        assert (views - views_m).abs().max() < 0.1  # uint8 rounding of the crops

# ------------------------------------------------------------------------------------------------
# linear_eval.py: the evaluation hub (encoder settings, features, kNN, top-k) and the protocol
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('arch,width,small', [('resnet18', 1, True), ('resnet50', 2, False),
                                              ('resnet101', 1, False), ('convnet', 8, False)])
def test_encoder_layout_is_read_back_from_a_state_dict(arch, width, small):
    with torch.device('meta'):
        encoder, _ = byol.build_encoder(arch, small, width)
    assert linear_eval.describe_encoder(encoder.state_dict()) == (arch, width, small)


def test_every_evaluation_script_uses_the_encoders_own_settings(image_folder, tmp_path):
    out = tmp_path / 'run'  # trained at 16 px; the folder's own size would be 20
    assert run_main(byol, ['--data', image_folder, *TINY, '--image-size', '16', '--epochs', '1',
                           '--output-dir', out])[0] == 0
    assert json.loads((out / 'encoder.json').read_text()) == dict(
        arch='convnet', width=4, small_images=True, image_size=16)
    common = ['--workers', '0', '--batch-size', '8', '--output-dir', tmp_path / 'eval']

    def sizes(pretrained, *extra):
        argv = [*common, '--pretrained', pretrained, *extra]
        linear = linear_eval.main(list(map(str, ['--data', image_folder, '--epochs', '1', *argv])))
        semi = semi_sup.main(list(map(str, ['--data', image_folder, '--subset', '0.5', '--lr',
                                            '0.1', '--epochs', '1', *argv])))
        moved, = transfer.main(list(map(str, ['--dataset', 'folder', '--data-root',
                                              image_folder, '--l2', '1.0', *argv])))
        return linear['image_size'], semi['image_size'], moved['image_size']
    assert sizes(out / 'checkpoint.pth') == sizes(out / 'encoder.pth') == (16, 16, 16)
    assert sizes(out / 'encoder.pth', '--image-size', '12') == (12, 12, 12)
    # an encoder.pth without its encoder.json: layout read from the weights, the data's size
    (out / 'encoder.json').unlink()
    assert sizes(out / 'encoder.pth') == (20, 20, 20)


def test_topk_accuracy_hand_computed():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]])
    labels = torch.tensor([2, 0, 0])
    # top-1: only row 1 is right; top-2: rows 0 and 1
    top1, top2 = linear_eval.topk_accuracy(scores, labels, ks=(1, 2))
    assert top1 == pytest.approx(100 / 3) and top2 == pytest.approx(200 / 3)


def test_knn_votes_are_temperature_weighted_cosine_similarities():
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.5]])
    cos = [2 / math.sqrt(4.25), 0.5 / math.sqrt(4.25), 2.5 / math.sqrt(4.25 * 2)]
    scores = linear_eval.knn_predict(train, labels, query, 3, k=2, temperature=0.07)
    expected = torch.tensor([[math.exp(cos[0] / 0.07), math.exp(cos[2] / 0.07), 0.0]])
    assert torch.allclose(scores, expected, rtol=1e-4)
    # with k = 3 and temperature 1, two weaker votes for class 1 outweigh one for class 0
    scores = linear_eval.knn_predict(train, labels, query, 3, k=3, temperature=1.0)
    assert torch.allclose(scores, torch.tensor([[math.exp(cos[0]),
                                                 math.exp(cos[1]) + math.exp(cos[2]), 0.0]]),
                          rtol=1e-5)
    assert scores.argmax().item() == 1


@pytest.mark.parametrize('cached', ['--cached', '--no-cached'])
def test_linear_eval_protocols_leave_the_encoder_unchanged(cached, image_folder, tiny_checkpoint,
                                                          tmp_path, monkeypatch):
    args = ['--data', image_folder, '--pretrained', tiny_checkpoint, cached, '--epochs', '3',
            '--batch-size', '16', '--workers', '0', '--holdout', '8', '--output-dir', tmp_path]
    results = linear_eval.main([str(a) for a in args])
    assert results['lr'] in linear_eval.LR_GRID and len(results['holdout_top1']) == 5
    assert 0 <= results['top1'] <= results['top5'] <= 100
    assert ('knn_top1' in results) == (cached == '--cached')
    extract = linear_eval.features

    def extract_and_tamper(encoder, *rest):  # a bug that would move the BN statistics
        features = extract(encoder, *rest)
        encoder[0][1].running_mean += 1
        return features
    monkeypatch.setattr(linear_eval, 'features', extract_and_tamper)
    with pytest.raises(RuntimeError, match='frozen encoder changed'):
        linear_eval.main([str(a) for a in args])


def test_fp16_training_in_the_evaluation_scripts_scales_the_loss():
    # Inputs of 2^-23: the weight gradients (about 2^-23 x 0.1) underflow in float16 (smallest
    # step 2^-24) unless the loss is scaled; scaled (and unscaled before the step, which leaves
    # them in .grad), they match float32's.
    x, y = torch.full((8, 4), 2.0 ** -23), torch.arange(8) % 3
    grads = {}
    for amp in ('none', 'fp16'):
        torch.manual_seed(0)
        heads = linear_eval.Heads(4, 3, 1)
        optimizer = linear_eval.nesterov_sgd([dict(params=heads.parameters(), base_lr=0.1)])
        linear_eval.fit(heads, optimizer, lambda epoch: [(x, y)], 1, 1, torch.device('cpu'), amp)
        grads[amp] = heads.heads[0].weight.grad
    assert 0 < grads['none'].abs().min() and grads['none'].abs().max() < 2.0 ** -24
    assert torch.allclose(grads['fp16'], grads['none'], rtol=1e-2, atol=0)


def test_linear_eval_bad_inputs_give_one_line_errors(image_folder, tiny_checkpoint, tmp_path,
                                                     capsys):
    common = ['--data', image_folder, '--output-dir', tmp_path, '--workers', '0']
    code, _, err = run_main(linear_eval, common + ['--pretrained', tmp_path / 'none.pth'], capsys)
    assert_one_line_error(code, err, 'does not exist')
    code, _, err = run_main(linear_eval, common + ['--pretrained', tiny_checkpoint, '--arch',
                                                   'resnet18'], capsys)
    assert_one_line_error(code, err, 'holds a convnet encoder, not --arch resnet18')
    code, _, err = run_main(linear_eval, ['--data', tmp_path / 'nowhere', '--pretrained',
                                          tiny_checkpoint], capsys)
    assert_one_line_error(code, err, 'no such folder')

# ------------------------------------------------------------------------------------------------
# linear_eval.py: the released checkpoints (DeepMind's .pkl files): files written by dill as the
# official code writes them (bench/released_fixtures.py), and the same arrays pickled here
# ------------------------------------------------------------------------------------------------
FIXTURES = HERE / 'bench' / 'released_fixtures'
DILL_VERSIONS = ('0.3.3', '0.4.1')  # the dill of 2020, and a current one
ABLATION_STEP = 300 * 1281167 // 4096  # the 300-epoch ablation checkpoints' last step (batch 4096)


@functools.cache
def fixture_script():
    """bench/released_fixtures.py as a module: the arrays of the committed files (no dill)."""
    spec = importlib.util.spec_from_file_location('released_fixtures',
                                                  HERE / 'bench' / 'released_fixtures.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def fixture_arrays():
    """The online parameters and BN averages of the committed files (a ResNet-50 of the real
    shapes, periodic values, 4 classes) -> (params, state)."""
    return fixture_script().fixture_arrays(n_classes=4)


class frozendict:  # noqa: N801 (the official class's name)
    """As Haiku's frozendict of 2020, which the released files hold: a mapping in __slots__,
    pickled as the class called with its storage (Haiku's own __reduce__)."""
    __slots__ = ('_storage', '_hash')

    def __init__(self, storage):
        self._storage, self._hash = dict(storage), None

    def __reduce__(self):
        return frozendict, (self._storage,)


def _reconstruct_array(fun, args, arr_state, aval_state):  # (jax._src.array's; never called)
    raise AssertionError('the reader called a function named in the file')


class JaxArray:
    """Pickles as a jax.Array does: jax._src.array._reconstruct_array around numpy's reduction."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return _reconstruct_array, (*self.value.__reduce__(), {'weak_type': False})


@contextlib.contextmanager
def official_classes():
    """The official code's classes (and JAX's array rebuild) under their module paths while the
    file is written, so that pickle names them as the released files do; each is a stand-in of
    the same layout."""
    from collections import namedtuple
    from types import ModuleType
    state = namedtuple('_ByolExperimentState', linear_eval.FIELDS)
    lars = namedtuple('LarsState', ['momentum'])
    saved = {}
    for cls, module in ((state, 'byol.byol_experiment'), (lars, 'byol.utils.optimizers'),
                        (frozendict, 'haiku._src.data_structures'),
                        (_reconstruct_array, 'jax._src.array')):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        for i in range(2 if module.startswith('byol.') else 1, module.count('.') + 2):
            name = '.'.join(module.split('.')[:i])
            saved.setdefault(name, sys.modules.get(name))
            sys.modules[name] = sys.modules.get(name) or ModuleType(name)
        setattr(sys.modules[module], cls.__name__, cls)
    try:
        yield state, lars
    finally:
        for name, module in saved.items():
            if module is None:
                del sys.modules[name]
            else:
                sys.modules[name] = module


def write_released(path, params, state, step=linear_eval.RELEASED_STEP):
    """A file in the release's layout (SPEC.md section 10), pickled with protocol 2 by the
    standard pickle: Haiku frozendicts, the experiment's NamedTuple of online and target
    parameters and states and the optimizer state (which the reader must skip), step, rng."""
    def nest(tree):
        return frozendict({k: frozendict(v) for k, v in tree.items()})
    small = nest({'res_net50/~/initial_conv': {'w': np.ones((1, 1, 1, 1), np.float32)}})
    with official_classes() as (state_type, lars):
        experiment = state_type(nest(params), small, nest(state), small, lars(momentum=small))
        with open(path, 'wb') as f:
            pickle.dump(dict(experiment_state=experiment, step=step,
                             rng=np.array([0, 42], np.uint32)), f, protocol=2)
    return path


@pytest.fixture(scope='session')
def released(tmp_path_factory):
    """The committed files' arrays pickled by the standard pickle (their second case), saved at
    the step of a 300-epoch ablation (so not a released file) -> (path, params, state)."""
    params, state = fixture_arrays()
    path = tmp_path_factory.mktemp('released') / 'res50x1_baseline.pkl'
    return write_released(path, params, state, step=ABLATION_STEP), params, state


@pytest.fixture(scope='session')
def dill_files(tmp_path_factory):
    """The committed files written by dill 0.3.3 and 0.4.1 as the official Checkpointer writes
    (bench/released_fixtures.py), decompressed -> {dill version: path}."""
    paths = {v: FIXTURES / f'dill-{v}.pkl.xz' for v in DILL_VERSIONS}
    missing = [str(p.relative_to(HERE)) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f'{", ".join(missing)} missing: see bench/released_fixtures.py')
    out = tmp_path_factory.mktemp('dill')
    for version, path in paths.items():
        (out / f'pretrain_res50x1_dill{version}.pkl').write_bytes(lzma.decompress(
            path.read_bytes()))
    return {v: out / f'pretrain_res50x1_dill{v}.pkl' for v in DILL_VERSIONS}


def official_forward(params, state, x):
    """The official ResNet-50 (Haiku's BlockV1, bottlenecks) computed directly from the arrays,
    with TF's SAME padding worked out here: NCHW images -> (N, 2048) representations."""
    def pads(size, k, stride):
        total = max((math.ceil(size / stride) - 1) * stride + k - size, 0)
        return total // 2, total - total // 2

    def conv(x, name, stride):
        w = torch.from_numpy(params['res_net50/~/' + name]['w']).permute(3, 2, 0, 1)
        (top, bottom), (left, right) = (pads(s, w.shape[-1], stride) for s in x.shape[2:])
        return F.conv2d(F.pad(x, (left, right, top, bottom)), w, stride=stride)

    def bn(x, name):
        p, path = params['res_net50/~/' + name], 'res_net50/~/' + name
        mean, var, scale, offset = (torch.from_numpy(a).reshape(1, -1, 1, 1) for a in (
            state[path + '/~/mean_ema']['average'], state[path + '/~/var_ema']['average'],
            p['scale'], p['offset']))
        return (x - mean) / torch.sqrt(var + 1e-5) * scale + offset

    x = F.relu(bn(conv(x, 'initial_conv', 2), 'initial_batchnorm'))
    (top, bottom), (left, right) = (pads(s, 3, 2) for s in x.shape[2:])
    x = F.max_pool2d(F.pad(x, (left, right, top, bottom), value=-math.inf), 3, 2)
    for g, n in enumerate(fixture_script().RESNET50_BLOCKS):
        for b in range(n):
            stride, base = (2 if g > 0 and b == 0 else 1), f'block_group_{g}/~/block_{b}/~/'
            shortcut = bn(conv(x, base + 'shortcut_conv', stride), base + 'shortcut_batchnorm') \
                if b == 0 else x
            y = F.relu(bn(conv(x, base + 'conv_0', 1), base + 'batchnorm_0'))
            y = F.relu(bn(conv(y, base + 'conv_1', stride), base + 'batchnorm_1'))
            x = F.relu(bn(conv(y, base + 'conv_2', 1), base + 'batchnorm_2') + shortcut)
    return x.mean(dim=(2, 3))


def official_logits(params, state, x):
    return official_forward(params, state, x) @ torch.from_numpy(
        params['classifier']['w']) + torch.from_numpy(params['classifier']['b'])


def test_tf_same_padding_is_a_hand_computed_same_convolution():
    conv = linear_eval.tf_same_padding(nn.Sequential(nn.Conv2d(1, 1, 3, 2, 1, bias=False)))[0]
    nn.init.ones_(conv.weight)
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    # SAME, stride 2 on 4 pixels: (0, 1) padding, windows over rows/columns 0-2 and 2-4 (4 is 0):
    # 1+2+3+5+6+7+9+10+11 = 54, 3+4+7+8+11+12 = 45, 9+10+11+13+14+15 = 72, 11+12+15+16 = 54
    assert conv(x).view(-1).tolist() == [54.0, 45.0, 72.0, 54.0]
    # PyTorch's symmetric (1, 1): 1+2+5+6 = 14 in the first window
    assert F.conv2d(x, conv.weight, stride=2, padding=1).view(-1)[0].item() == 14.0
    assert linear_eval.same_padding(224, 7, 2) == (2, 3) and linear_eval.same_padding(7, 3, 1) \
        == (1, 1) and linear_eval.same_padding(112, 1, 2) == (0, 0)


def test_a_released_checkpoint_is_read_into_the_official_network(released, tmp_path):
    path, params, state = released  # (read with none of the official classes importable)
    encoder, dim, settings, classifier, step = linear_eval.read_released(path)
    assert dim == 2048 and settings == dict(arch='resnet50', width=1, small_images=False,
                                            image_size=224, padding='tf_same')
    assert step == ABLATION_STEP
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official_forward(params, state, x)
        ours = encoder.eval()(x)
        plain_torchvision = torchvision.models.resnet50()
        plain_torchvision.fc = nn.Identity()
        plain_torchvision.load_state_dict(encoder.state_dict())  # the keys are torchvision's
        symmetric = plain_torchvision.eval()(x)
    assert (ours - expected).norm() / expected.norm() < 1e-4
    assert (symmetric - expected).norm() / expected.norm() > 0.05  # the padding matters
    logits = classifier(ours)
    assert torch.allclose(logits, ours @ torch.from_numpy(params['classifier']['w']) +
                          torch.from_numpy(params['classifier']['b']), atol=1e-5)
    # saved in this project's format: torchvision loads it, load_encoder restores the padding
    out = tmp_path / 'converted'
    assert linear_eval.main(['--pretrained', str(path), '--export-encoder', str(out),
                             '--output-dir', str(tmp_path)])['padding'] == 'tf_same'
    missing = torchvision.models.resnet50().load_state_dict(
        torch.load(out / 'encoder.pth', weights_only=True), strict=False).missing_keys
    assert sorted(missing) == ['fc.bias', 'fc.weight']
    converted, _, converted_settings = linear_eval.load_encoder(out / 'encoder.pth')
    with torch.no_grad():
        assert torch.equal(converted.eval()(x), ours) and converted_settings == settings


@pytest.mark.parametrize('version', DILL_VERSIONS)
def test_files_written_by_dill_read_as_their_standard_pickle_copy(version, dill_files, released):
    path = dill_files[version]
    # written as the official Checkpointer writes (SPEC.md section 10): dill's helpers in between
    names = {arg for op, arg, _ in pickletools.genops(path.read_bytes()) if op.name == 'GLOBAL'}
    old = version < '0.4'
    assert 'dill._dill _create_namedtuple' in names
    assert ('dill._dill _get_attr' in names, 'dill._dill _import_module' in names,
            'dill._dill _create_array' in names) == (old, old, not old)
    assert ('haiku._src.data_structures FlatMapping' in names) == old  # older Haiku's dicts
    with open(path, 'rb') as f:
        checkpoint = linear_eval.plain(linear_eval.ReleasedUnpickler(f).load())
    # nothing named in the file was imported or called: the NamedTuples are inert tuples, the
    # jax array (rng, newer JAX) a stand-in that was never rebuilt
    assert not any(m.split('.')[0] in ('dill', 'haiku', 'optax', 'jax') or
                   m.startswith('byol.') for m in sys.modules)
    assert checkpoint['step'] == linear_eval.RELEASED_STEP
    if old:
        assert np.array_equal(checkpoint['rng'], [0, 42])
    else:
        assert isinstance(checkpoint['rng'], linear_eval.Inert) and \
            type(checkpoint['rng']).__module__ == 'jax._src.array'
    assert checkpoint['experiment_state'][4][0] == () and \
        len(checkpoint['experiment_state'][4]) == 3  # the optimizer state: optax's NamedTuples
    if old:  # numpy 2 wrote numpy._core; the files of 2020 (numpy 1.x) name numpy.core
        numpy2, numpy1 = b'numpy._core._multiarray_umath', b'numpy.core._multiarray_umath'
        data = path.read_bytes().replace(b'X' + len(numpy2).to_bytes(4, 'little') + numpy2,
                                         b'X' + len(numpy1).to_bytes(4, 'little') + numpy1)
        assert numpy2 not in data and numpy1 in data
        renamed = linear_eval.plain(linear_eval.ReleasedUnpickler(io.BytesIO(data)).load())
        assert np.array_equal(renamed['experiment_state'][0]['res_net50/~/initial_conv']['w'],
                              fixture_arrays()[0]['res_net50/~/initial_conv']['w'])
    # the same encoder as the standard-pickle copy of the same arrays, bit for bit
    ours, dim, settings = linear_eval.load_encoder(path)   # (every evaluation script's reader)
    theirs, _, their_settings = linear_eval.load_encoder(released[0])
    assert dim == 2048 and settings == their_settings
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    # the running statistics' update count is Haiku's: fine-tuning continues them (a count of 0
    # would make the first batch's statistics replace them)
    assert ours.bn1.num_batches_tracked.item() == 312_784
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = ours.eval()(x)
        assert torch.equal(features, theirs.eval()(x)) and features.abs().mean() > 0.1
        expected = official_forward(*fixture_arrays(), x)
    assert (features - expected).norm() / expected.norm() < 1e-4


def test_a_file_written_by_dill_loads_in_every_evaluation_script(dill_files, image_folder,
                                                                 tmp_path, capsys):
    path = dill_files['0.3.3']  # the generation of the released files
    common = ['--workers', '0', '--batch-size', '8', '--image-size', '32', '--pretrained', path,
              '--output-dir', tmp_path]
    linear = linear_eval.main(list(map(str, ['--data', image_folder, '--epochs', '1',
                                             '--train-images', '8', *common])))
    semi = semi_sup.main(list(map(str, ['--data', image_folder, '--subset', '0.125', '--lr',
                                        '0.1', '--epochs', '1', *common])))
    moved, = transfer.main(list(map(str, ['--dataset', 'folder', '--data-root', image_folder,
                                          '--l2', '1.0', '--train-images', '8', *common])))
    assert linear['image_size'] == semi['image_size'] == moved['image_size'] == 32
    out = capsys.readouterr().out
    assert out.count(f'encoder: resnet50 from {path}') == 3


def test_only_the_released_files_are_compared_with_the_official_figure(dill_files, released,
                                                                       image_folder, tmp_path,
                                                                       capsys):
    common = ['--data', image_folder, '--checkpoint-classifier', '--workers', '0',
              '--batch-size', '8', '--image-size', '32', '--output-dir', tmp_path]
    # the released ResNet-50 (its step, 1000 epochs at batch 4096, and its network)
    results = linear_eval.main(list(map(str, [*common, '--pretrained', dill_files['0.4.1']])))
    out = capsys.readouterr().out
    assert results['official_top1'] == 74.4
    assert '(the official code, the same weights: 74.4%)' in out
    # the same network at a 300-epoch ablation's step: no official figure
    results = linear_eval.main(list(map(str, [*common, '--pretrained', released[0]])))
    out = capsys.readouterr().out
    assert results['official_top1'] is None and '74.4' not in out
    assert f'not a released file, step {ABLATION_STEP}' in out

    def released_file(arch, width, step):
        return linear_eval.Network(None, 2048, dict(arch=arch, width=width), None, step)
    assert linear_eval.official_top1(released_file('resnet200', 2, 312_784)) == 79.6
    assert linear_eval.official_top1(released_file('resnet50', 2, 312_784)) is None
    assert linear_eval.official_top1(released_file('resnet50', 1, None)) is None


def test_the_released_classifier_is_evaluated_as_it_is_in_float32(released, tmp_path,
                                                                   image_folder, monkeypatch):
    path, params, state = released
    seen = []

    def features(model, *args):  # linear_eval's, recording what the pass ran under
        seen.append((args[-1], torch.backends.cudnn.allow_tf32,
                     torch.backends.cuda.matmul.allow_tf32))
        logits, labels = real_features(model, *args)
        seen.append(logits)
        return logits, labels
    real_features = linear_eval.features
    monkeypatch.setattr(linear_eval, 'features', features)
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', True)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', True)
    # --amp bf16 does not apply: it would move the logits by about 1% (bf16's 8-bit mantissa)
    results = linear_eval.main(list(map(str, [
        '--data', image_folder, '--pretrained', path, '--checkpoint-classifier', '--workers', '0',
        '--batch-size', '8', '--image-size', '32', '--amp', 'bf16', '--output-dir', tmp_path])))
    assert seen[0] == ('none', False, False) and torch.backends.cudnn.allow_tf32  # restored
    val = augment.load_images(str(image_folder), split='val')
    loader, _ = augment.batches(val, 32, 16, 'eval')
    loader.set_epoch(0)
    (x,), labels, index = next(iter(loader))  # the 16 centre crops, as the evaluation makes them
    with torch.no_grad():
        logits = official_logits(params, state, x)
    assert (seen[1][index] - logits).abs().max() < 1e-4 * logits.abs().max()
    top1, top5 = linear_eval.topk_accuracy(logits, labels)
    assert results['top1'] == pytest.approx(top1) and results['top5'] == pytest.approx(top5)


def test_a_byol_checkpoint_s_own_classifier_is_evaluated(tiny_checkpoint, image_folder, tmp_path,
                                                        capsys, monkeypatch):
    seen = []

    def features(model, *args):  # linear_eval's, keeping the logits it computed
        logits, labels = real_features(model, *args)
        seen.append(logits)
        return logits, labels
    real_features = linear_eval.features
    monkeypatch.setattr(linear_eval, 'features', features)
    common = ['--checkpoint-classifier', '--workers', '0', '--batch-size', '8', '--output-dir',
              tmp_path]
    results = linear_eval.main(list(map(str, ['--data', image_folder, '--pretrained',
                                              tiny_checkpoint, *common])))
    assert results['official_top1'] is None and 'official' not in capsys.readouterr().out
    # by hand: the encoder's features of the 16 centre crops, then the monitor's weights as
    # byol.py saved them
    encoder, _, settings = linear_eval.load_encoder(tiny_checkpoint)
    online = byol.load_file(tiny_checkpoint)['online']
    val = augment.load_images(str(image_folder), split='val')
    loader, _ = augment.batches(val, settings['image_size'], 16, 'eval')
    loader.set_epoch(0)
    (x,), labels, index = next(iter(loader))
    with torch.no_grad():
        logits = encoder.eval()(x) @ online['classifier.weight'].T + online['classifier.bias']
    assert torch.allclose(seen[0][index], logits, atol=1e-5) and logits.abs().max() > 1e-3
    top1, top5 = linear_eval.topk_accuracy(logits, labels)
    assert results['top1'] == pytest.approx(top1) and results['top5'] == pytest.approx(top5)
    # an exported encoder has no classifier; a validation split of other classes does not fit
    code, _, err = run_main(linear_eval, ['--data', image_folder, '--pretrained',
                                          tiny_checkpoint.parent / 'encoder.pth', *common], capsys)
    assert_one_line_error(code, err, 'holds no online classifier')
    three = tmp_path / 'three'
    for split in ('train', 'val'):
        for label in range(3):
            shutil.copytree(image_folder / split / f'class{label}',
                            three / split / f'class{label}')
    code, _, err = run_main(linear_eval, ['--data', three, '--pretrained', tiny_checkpoint,
                                          *common], capsys)
    assert_one_line_error(code, err, 'has 4 classes, the validation split 3')


def pickled_call(module, name, *args):
    """Protocol-2 opcodes that call module.name(*args) as a file is read (args: str, or the
    opcodes of another call); a file is these and STOP ('.')."""
    out = b'\x80\x02c' + f'{module}\n{name}\n'.encode() + b'('
    for a in args:
        if isinstance(a, str):  # BINUNICODE: its length, then its UTF-8 bytes
            a = b'X' + len(a.encode()).to_bytes(4, 'little') + a.encode()
        out += a
    return out + b'tR'


def test_unsafe_released_files_are_refused_and_nothing_runs(released, tmp_path, capsys,
                                                           image_folder):
    ran = tmp_path / 'ran'  # what any of the files would make, had it run

    class Shell:
        def __init__(self, call):
            self.call = call

        def __reduce__(self):
            return self.call, (f'touch {ran}',)

    class Reduced:  # pickled as the call f(*args), then its state set
        def __init__(self, f, args, state=None):
            self.f, self.args, self.state = f, args, state

        def __reduce__(self):
            return self.f, self.args, self.state
    # os.system by name; subprocess.getoutput, which protocol 2 writes as Python 2's
    # commands.getoutput (and pickle imports as subprocess.getoutput)
    getoutput = pickle.dumps(Shell(subprocess.getoutput), protocol=2)
    assert b'commands\ngetoutput' in getoutput
    import_numpy = pickled_call('dill._dill', '_import_module', 'numpy.core.multiarray')
    shout = f'open({str(ran)!r}, "w").close()'
    # numpy.array of an object that says its data is at some address: numpy would copy the
    # memory there (a mapping whose __array_interface__ the file sets as its state)
    secret = np.frombuffer(b'secret memory', dtype=np.uint8)
    interface = dict(secret.__array_interface__, data=(secret.ctypes.data, True))
    pointer = Reduced(collections.OrderedDict, (), {'__array_interface__': interface})
    read_memory = pickle.dumps(Reduced(np.array, (pointer,)), protocol=2)
    assert b'cnumpy\narray\n' in read_memory and b'collections\nOrderedDict' in read_memory
    # the same mapping alone: read as a dict, it cannot take the attribute
    mapping = pickle.dumps(pointer, protocol=2)
    files = {  # name: (its bytes, what the error names)
        'system': (pickle.dumps(Shell(os.system), protocol=2), 'posix.system, which could run'),
        'getoutput': (getoutput, 'subprocess.getoutput, which could run code'),
        'runstring': (pickled_call('numpy.core.multiarray', 'runstring', shout) + b'.',
                      'numpy.core.multiarray.runstring, which could run code'),
        'get_attr': (pickled_call('dill._dill', '_get_attr', import_numpy, 'runstring') + b'.',
                     'it asks for numpy.core.multiarray.runstring, which a checkpoint has no '
                     'need of'),
        'import': (pickled_call('dill._dill', '_import_module', 'os') + b'.',
                   'it imports os, which a checkpoint has no need of'),
        'eval': (pickled_call('dill._dill', '_eval_repr', shout) + b'.',
                 'dill._dill._eval_repr, which could run code'),
        'read_memory': (read_memory, 'numpy.array, which could run code or is not one a '
                        'checkpoint needs'),
        'mapping': (mapping, 'cannot read'),
    }
    common = ['--data', image_folder, '--workers', '0', '--output-dir', tmp_path]
    for name, (data, message) in files.items():
        (tmp_path / f'{name}.pkl').write_bytes(data)
        code, out, err = run_main(linear_eval, common + ['--pretrained', tmp_path / f'{name}.pkl'],
                                  capsys)
        assert_one_line_error(code, err, f'{name}.pkl', message)
        if name != 'mapping':  # (refused by name; the mapping fails as the file is read)
            assert 'not loaded' in err
        assert 'secret' not in out + err
    assert not ran.exists()
    # dill's NamedTuple type: a tuple of its fields; the module it names is never imported
    cls = linear_eval.dill_create_namedtuple('State', ('a', 'b'), 'os.path')
    assert cls(1, 2) == (1, 2) and cls._fields == ('a', 'b') and issubclass(cls, tuple)
    assert not hasattr(cls(1, 2), '__dict__')  # (a file can set no attribute on one)
    assert linear_eval.dill_create_namedtuple('State', ('a',), 'not_a_module')(3) == (3,)
    assert 'not_a_module' not in sys.modules


def test_broken_released_files_give_one_line_errors(released, tmp_path, capsys, image_folder):
    params, state = fixture_arrays()
    stem = ('res_net50/~/initial_conv', 'res_net50/~/initial_batchnorm')
    block = 'res_net50/~/block_group_0/~/block_0/~/'

    def part(tree, *modules):  # the first modules of the network are enough to fail on
        return {k: v for k, v in tree.items() if k in modules or k.rsplit('/~/', 1)[0] in modules}
    wrong_conv = part(params, *stem, block + 'conv_0')
    wrong_conv[block + 'conv_0'] = {'w': np.zeros((1, 1, 64, 32), np.float32)}
    jax_leaves = {k: {name: JaxArray(v) for name, v in entries.items()}
                  for k, entries in part(params, *stem).items()}
    files = {  # name: (params, state, what the error says)
        'no_bn': (part(params, stem[0]), state,
                  'it has no res_net50/~/initial_batchnorm scale'),
        'no_average': (part(params, *stem), part(state), 'it has no res_net50/~/initial_batch'
                       'norm/~/mean_ema average'),
        'wrong_conv': (wrong_conv, state, f'{block}conv_0 w has shape (1, 1, 64, 32); the '
                       'network needs (1, 1, 64, 64)'),
        'jax': (jax_leaves, state, 'res_net50/~/initial_conv w is jax._src.array._reconstruct_'
                'array(...), not a numpy array (a jax array?'),
        'no_resnet': ({'projector/~/linear': params['projector/~/linear']}, state,
                      'holds no ResNet-50 or ResNet-200 encoder (modules: projector)'),
    }
    common = ['--data', image_folder, '--workers', '0', '--output-dir', tmp_path]
    for name, (file_params, file_state, message) in files.items():
        path = write_released(tmp_path / f'{name}.pkl', file_params, file_state)
        for argv in (['--checkpoint-classifier'], ['--epochs', '1']):
            code, _, err = run_main(linear_eval, common + argv + ['--pretrained', path], capsys)
            assert_one_line_error(code, err, f'{path}: ', message)
    (tmp_path / 'truncated.pkl').write_bytes(released[0].read_bytes()[:100_000])
    code, _, err = run_main(linear_eval, common + ['--pretrained', tmp_path / 'truncated.pkl'],
                            capsys)
    assert_one_line_error(code, err, 'cannot read', 'truncated.pkl', 'download it again')


# ------------------------------------------------------------------------------------------------
# semi_sup.py: labelled subsets
# ------------------------------------------------------------------------------------------------


def fake_imagenet(root, names, extra_per_class=1):
    """An ImageNet-style train/ folder holding these file names (class = prefix before '_'),
    plus `extra_per_class` unlisted images per class. Files are not decoded by the subset code,
    so they all hold the same bytes."""
    classes = sorted({name.split('_')[0] for name in names})
    for wnid in classes:
        (root / 'train' / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(extra_per_class):
            (root / 'train' / wnid / f'{wnid}_9999999{k}.JPEG').write_bytes(b'x')
    for name in names:
        (root / 'train' / name.split('_')[0] / name).write_bytes(b'x')
    return augment.FolderImages(root / 'train')


def listed(path):
    return [line.strip() for line in open(path) if line.strip()]


def subset_args(*argv):
    return semi_sup.get_parser().parse_args(['--data', 'unused', *map(str, argv)])


@needs_subsets
def test_official_lists_select_exactly_the_listed_images(tmp_path):
    # 1%: every listed file of all 1000 classes, and one unlisted image per class beside them.
    names = listed(SUBSETS / '1percent.txt')
    images = fake_imagenet(tmp_path / 'one', names)
    assert len(images) == 12811 + 1000
    args = subset_args('--subset', '1percent', '--subset-dir', SUBSETS)
    indices, path = semi_sup.labelled_subset(args, images)
    assert path == SUBSETS / '1percent.txt'
    chosen = [Path(images.samples[i][0]).name for i in indices]
    assert len(chosen) == 12811 and set(chosen) == set(names)
    # each image is labelled with its folder's class, the prefix of its name
    assert all(images.classes[images.labels[i]] == name.split('_')[0]
               for i, name in zip(indices, chosen))
    # 12 or 13 images per class (SPEC.md section 5): 189 x 12 + 811 x 13 = 12,811
    per_class = Counter(Counter(images.labels[i] for i in indices).values())
    assert per_class == {12: 189, 13: 811}

    # 10%: a sample of 20 classes (the whole list would be 128,116 files), through a FILE.
    wnids = sorted({name.split('_')[0] for name in names})[::50]
    names = [n for n in listed(SUBSETS / '10percent.txt') if n.split('_')[0] in wnids]
    images = fake_imagenet(tmp_path / 'ten', names, extra_per_class=3)
    (tmp_path / 'ten.txt').write_text('\n'.join(names) + '\n')
    indices, _ = semi_sup.labelled_subset(subset_args('--subset', tmp_path / 'ten.txt'), images)
    chosen = [Path(images.samples[i][0]).name for i in indices]
    assert len(images) == len(names) + 60 and sorted(chosen) == sorted(names)
    assert set(Counter(images.labels[i] for i in indices).values()) <= {128, 129}


@needs_subsets
def test_a_missing_listed_file_is_named(tmp_path):
    names = listed(SUBSETS / '1percent.txt')
    wnids = sorted({name.split('_')[0] for name in names})[:3]
    present = [n for n in names if n.split('_')[0] in wnids]
    images = fake_imagenet(tmp_path, present[1:])  # the first listed file of these is absent
    (tmp_path / 'list.txt').write_text('\n'.join(present) + '\n')
    with pytest.raises(byol.UserError, match=f'lists {present[0]}, which is not among the '
                                             'training images'):
        semi_sup.read_subset_file(tmp_path / 'list.txt', images)
    # the real list against these three classes: the rest of its 12,811 files are missing
    with pytest.raises(byol.UserError, match=f'{12811 - len(present)} more listed files'):
        semi_sup.read_subset_file(SUBSETS / '1percent.txt', images)


def test_subset_file_errors_are_one_line(image_folder, tmp_path, capsys):
    common = ['--data', image_folder, '--arch', 'convnet', '--width', '4', '--workers', '0',
              '--output-dir', tmp_path / 'out']
    listing = tmp_path / 'list.txt'
    listing.write_text('000.jpg\nclass1/001.jpg\nclass0/nope.jpg\n')
    code, _, err = run_main(semi_sup, [*common, '--subset', listing], capsys)
    assert code == 2 and err.count('\n') == 1 and 'Traceback' not in err
    assert err.startswith('semi_sup.py: error: ') and 'lists class0/nope.jpg, which is not' in err
    listing.write_text('000.jpg\nclass0/000.jpg\n')
    code, _, err = run_main(semi_sup, [*common, '--subset', listing], capsys)
    assert code == 2 and 'lists class0/000.jpg more than once' in err
    code, _, err = run_main(semi_sup, [*common, '--subset', 'half'], capsys)
    assert code == 2 and "--subset half: not 1percent or 10percent, a fraction" in err
    code, _, err = run_main(semi_sup, [*common, '--subset', '1.5'], capsys)
    assert code == 2 and 'a fraction must be in (0, 1]' in err
    code, _, err = run_main(semi_sup, [*common, '--subset', '1percent', '--subset-dir',
                                       tmp_path], capsys)
    assert code == 2 and '1percent.txt not found' in err and 'google-research/simclr' in err
    assert not (tmp_path / 'out').exists()


def test_a_bare_name_in_several_classes_is_ambiguous(tmp_path):
    for c in ('cat', 'dog'):
        (tmp_path / 'train' / c).mkdir(parents=True)
        (tmp_path / 'train' / c / '0001.jpg').write_bytes(b'x')
    images = augment.FolderImages(tmp_path / 'train')
    (tmp_path / 'list.txt').write_text('0001.jpg\n')
    with pytest.raises(byol.UserError, match='0001.jpg names 2 images .in cat, dog'):
        semi_sup.read_subset_file(tmp_path / 'list.txt', images)
    (tmp_path / 'list.txt').write_text('dog/0001.jpg\n')
    assert semi_sup.read_subset_file(tmp_path / 'list.txt', images) == [1]


def test_fraction_subset_is_class_balanced_and_seeded():
    labels = [0] * 10 + [1] * 20 + [2] * 30
    # 0.5 of 60 = 30 images: 10 from each class, not 5, 10, 15
    half = semi_sup.balanced_subset(labels, 3, 0.5, seed=0)
    assert len(half) == 30 and Counter(labels[i] for i in half) == {0: 10, 1: 10, 2: 10}
    # 7 images: 7 = 2 x 3 + 1, the first class takes the extra one
    seven = semi_sup.balanced_subset(labels, 3, 7 / 60, seed=0)
    assert Counter(labels[i] for i in seven) == {0: 3, 1: 2, 2: 2}
    # a class smaller than its share (7 of 21) gives all it has
    small = semi_sup.balanced_subset([0] * 2 + [1] * 20 + [2] * 20, 3, 0.5, seed=0)
    assert len(small) == 2 + 7 + 7
    # a function of (labels, fraction, seed): the same on every call, another seed differs
    assert semi_sup.balanced_subset(labels, 3, 0.5, seed=0) == half == sorted(set(half))
    assert semi_sup.balanced_subset(labels, 3, 0.5, seed=1) != half
    # and the permutations are the seeded ones: class c's images in torch.randperm order
    g = torch.Generator().manual_seed(0)
    expected = [j for c, (first, n) in enumerate(((0, 10), (10, 20), (30, 30)))
                for j in (first + torch.randperm(n, generator=g)[:10]).tolist()]
    assert half == sorted(expected)


def test_the_setting_is_chosen_on_training_images_outside_the_subset():
    labelled = semi_sup.balanced_subset([i % 10 for i in range(1000)], 10, 0.1, seed=0)
    held_out = semi_sup.local_validation(labelled, 1000, 100, seed=0)
    assert len(held_out) == 100 and not set(held_out) & set(labelled)
    assert held_out == sorted(set(held_out)) == semi_sup.local_validation(labelled, 1000, 100, 0)
    assert held_out != semi_sup.local_validation(labelled, 1000, 100, seed=1)


def test_holdout_errors_are_one_line(image_folder, tmp_path, capsys):
    args = ['--data', image_folder, *TINY_FT, '--lr', '0.1', '0.2', '--epochs', '1',
            '--output-dir', tmp_path]
    code, _, err = run_main(semi_sup, args + ['--subset', '1.0'], capsys)
    assert_one_line_error(code, err, '--subset 1.0 labels every training image',
                          'use a smaller --subset')
    code, _, err = run_main(semi_sup, args + ['--subset', '0.5', '--holdout', '0'], capsys)
    assert_one_line_error(code, err, '--holdout 0: choosing among 2 settings needs 1 to 32')


def test_default_batch_is_halved_for_small_sets():
    assert semi_sup.default_batch_size(12811, 1) == 1024  # ImageNet 1%: 12 steps
    assert semi_sup.default_batch_size(12811, 8) == 1024
    assert semi_sup.default_batch_size(4500, 1) == 256    # 4500 // 512 = 8 < 10; // 256 = 17
    assert semi_sup.default_batch_size(4500, 3) == 255    # a multiple of 3 processes
    assert semi_sup.default_batch_size(29, 1) == 32       # never below MIN_BATCH

# ------------------------------------------------------------------------------------------------
# semi_sup.py: the protocol on the 4-class image folder
# ------------------------------------------------------------------------------------------------


def test_grid_selection_subset_file_and_results(image_folder, tmp_path, capsys):
    out = tmp_path / 'out'
    args = ['--data', image_folder, '--subset', '0.5', *TINY_FT, '--lr', '0.0', '0.1',
            '--epochs', '1', '3', '--output-dir', out]
    results = semi_sup.main(list(map(str, args)))
    # 0.5 of 64 images: 8 per class, all of them trained on; 64 // 10 = 6 others held out
    assert (results['labelled_images'], results['train_images'], results['holdout_images'],
            results['val_images']) == (32, 32, 6, 16)
    # the grid is lr x epochs, and the chosen setting is the first best on the held-out images
    held_out = results['holdout_top1']
    assert list(held_out) == ['0.0x1', '0.1x1', '0.0x3', '0.1x3']
    assert f'{results["lr"]}x{results["epochs"]}' == max(held_out, key=held_out.get)
    # lr 0 leaves the parameters where they started: its two runs agree
    assert held_out['0.0x1'] == held_out['0.0x3']
    assert results['top1'] * 16 / 100 == pytest.approx(round(results['top1'] * 16 / 100))
    assert json.loads((out / 'results.jsonl').read_text()) == results
    # the subset file: 8 images of each class, readable back as --subset FILE
    saved = out / 'subset_0.5_seed0.txt'
    assert results['subset_file'] == str(saved)
    lines = saved.read_text().splitlines()
    assert Counter(line.split('/')[0] for line in lines) == {f'class{c}': 8 for c in range(4)}
    images = augment.load_images(str(image_folder))
    assert semi_sup.read_subset_file(saved, images) == semi_sup.balanced_subset(
        images.labels, 4, 0.5, 0)
    # --subset FILE gives the same run
    again = semi_sup.main(list(map(str, args[:2] + ['--subset', saved] + args[4:])))
    assert again['holdout_top1'] == held_out and again['top1'] == results['top1']


def test_an_interrupted_grid_continues_with_the_next_setting(image_folder, tmp_path,
                                                            monkeypatch):
    args = ['--data', image_folder, '--subset', '0.5', *TINY_FT, '--lr', '0.0', '0.1',
            '--epochs', '1', '2']
    whole = semi_sup.main(list(map(str, args + ['--output-dir', tmp_path / 'whole'])))
    assert not list((tmp_path / 'whole').glob('grid_*.pth'))  # removed once the grid is done
    fit, settings = linear_eval.fit, []

    def fit_until_the_third_setting(*a, name, **k):
        settings.append(name)
        if len(settings) == 3:
            raise KeyboardInterrupt  # killed during the third setting
        return fit(*a, name=name, **k)

    monkeypatch.setattr(linear_eval, 'fit', fit_until_the_third_setting)
    out = tmp_path / 'resumed'
    with pytest.raises(KeyboardInterrupt):
        semi_sup.main(list(map(str, args + ['--output-dir', out])))
    saved, = out.glob('grid_*.pth')
    assert torch.load(saved)['holdout_top1'] == list(whole['holdout_top1'].values())[:2]
    # another run in the same folder neither uses nor touches it
    settings.clear()
    other = semi_sup.main(list(map(str, args[:-3] + ['--epochs', '1', '--output-dir', out])))
    assert settings == ['lr 0.0 x 1 ep', 'lr 0.1 x 1 ep'] and saved.exists()
    # the same command again: only the two settings left, and the uninterrupted run's result
    settings.clear()
    resumed = semi_sup.main(list(map(str, args + ['--output-dir', out])))
    assert settings == ['lr 0.0 x 2 ep', 'lr 0.1 x 2 ep'] and not saved.exists()
    assert resumed['holdout_top1'] == whole['holdout_top1']
    assert (resumed['lr'], resumed['epochs'], resumed['top1'], resumed['top5']) == \
        (whole['lr'], whole['epochs'], whole['top1'], whole['top5'])
    assert other['holdout_top1'] == {k: v for k, v in whole['holdout_top1'].items()
                                     if k.endswith('x1')}


def test_the_whole_network_trains(image_folder, tmp_path):
    args = ['--data', image_folder, '--subset', '0.5', *TINY_FT, '--epochs', '1',
            '--output-dir', tmp_path]
    frozen = semi_sup.main(list(map(str, args + ['--lr', '0.0'])))
    tuned = semi_sup.main(list(map(str, args + ['--lr', '0.1'])))
    assert frozen['encoder_change'] == 0.0 and tuned['encoder_change'] > 1e-3


def test_two_processes_draw_the_same_subset(image_folder, tmp_path):
    args = ['--data', str(image_folder), '--subset', '0.5', *TINY_FT, '--lr', '0.1',
            '--epochs', '1']
    one = semi_sup.main(args + ['--output-dir', str(tmp_path / 'one')])
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone',
                '--nproc_per_node=2', str(HERE / 'semi_sup.py')]
    result = subprocess.run(torchrun + args + ['--output-dir', str(tmp_path / 'two')],
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-3000:]
    assert '2 process(es)' in result.stdout
    name = 'subset_0.5_seed0.txt'
    assert (tmp_path / 'two' / name).read_text() == (tmp_path / 'one' / name).read_text()
    two = json.loads((tmp_path / 'two' / 'results.jsonl').read_text())
    assert two['val_images'] == one['val_images'] == 16  # gathered from both processes
    assert (two['labelled_images'], two['holdout_images']) == (32, 0)  # one setting: no choice

# ------------------------------------------------------------------------------------------------
# transfer.py: metrics
# ------------------------------------------------------------------------------------------------


def test_top1_and_mean_per_class_accuracy_by_hand():
    # 4 classes; class 3 has no image: it must not count in the mean per-class accuracy.
    scores = torch.tensor([[9., 0, 0, 0], [9, 0, 0, 0], [0, 9, 0, 0], [9, 0, 0, 0],
                           [0, 0, 9, 0], [0, 9, 0, 0]])
    targets = torch.tensor([0, 0, 0, 1, 2, 2])
    # predictions 0 0 1 0 2 1: hits 1 1 0 0 1 0
    assert transfer.top1(scores, targets) == pytest.approx(100 * 3 / 6)
    # class 0: 2/3, class 1: 0/1, class 2: 1/2 -> mean (2/3 + 0 + 1/2) / 3
    assert transfer.mean_per_class_accuracy(scores, targets) == pytest.approx(
        100 * (2 / 3 + 0 + 1 / 2) / 3)
    assert transfer.METRICS['mean_per_class'] is transfer.mean_per_class_accuracy


def test_11_point_average_precision_by_hand():
    # ranked hits 1 0 1 0: precision 1, 1/2, 2/3, 1/2 at recall 1/2, 1/2, 1, 1.
    # t = 0 .. 0.5 (6 levels): max precision 1; t = 0.6 .. 1 (5 levels): 2/3.
    ap = transfer.average_precision_11point(torch.tensor([0.9, 0.8, 0.7, 0.6]),
                                            torch.tensor([True, False, True, False]))
    assert ap == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    # the order comes from the scores, not from the input order
    ap2 = transfer.average_precision_11point(torch.tensor([0.6, 0.7, 0.8, 0.9]),
                                             torch.tensor([False, True, False, True]))
    assert ap2 == pytest.approx(ap)
    # ranked hits 0 1: precision 1/2 at recall 1 for every level
    assert transfer.average_precision_11point(torch.tensor([2.0, 1.0]),
                                              torch.tensor([False, True])) == pytest.approx(0.5)


def test_11_point_map_ignores_difficult_images_and_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.9], [0.8, 0.2, 0.4, 0.1], [0.7, 0.3, 0.3, 0.8],
                           [0.6, 0.4, 0.2, 0.2]])
    targets = torch.tensor([[1, 0, 0, -1], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0]])
    # class 0: hits 1 0 1 0 -> (6 + 5 * 2/3) / 11. class 1: scores .4 .3 (.2 .1) rank both
    # positives first -> 1. class 2: no positive -> left out. class 3: the 'difficult' image
    # (score .9) is ignored, so the ranking is .8 (0), .2 (0), .1 (1) -> precision 1/3 at every
    # recall level -> 1/3.
    expected = 100 * ((6 + 5 * 2 / 3) / 11 + 1 + 1 / 3) / 3
    assert transfer.mean_average_precision_11point(scores, targets) == pytest.approx(expected)
    # were the difficult image counted as a negative, class 3's AP would not change here; as a
    # positive it would be 1 at first rank:
    counted = targets.clone()
    counted[0, 3] = 1
    assert transfer.mean_average_precision_11point(scores, counted) > expected + 5


def test_multi_label_training_targets_are_uniform_over_present_classes():
    targets = torch.tensor([[1, 0, 1, -1], [0, 0, 0, -1], [0, 1, 0, 0]])
    expected = torch.tensor([[0.5, 0, 0.5, 0], [0, 0, 0, 0], [0, 1.0, 0, 0]])
    assert torch.equal(transfer.training_targets(targets), expected)
    labels = torch.tensor([2, 0])
    assert transfer.training_targets(labels) is labels

# ------------------------------------------------------------------------------------------------
# transfer.py: logistic regression and the regularisation sweep
# ------------------------------------------------------------------------------------------------


def blobs(n, seed, shift=1.5, d=8, c=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    centres = torch.randn(c, d, generator=torch.Generator().manual_seed(99)) * shift
    return centres[y] + torch.randn(n, d, generator=g), y


def test_logistic_regression_reaches_the_optimum_of_the_stated_objective():
    x, y = blobs(300, 0)
    for l2 in (1e-2, 10.0, 1e3):
        w = transfer.logistic_regression(x, y, l2, 3)
        # stationarity of (1/N) sum CE + l2 / (2N) ||W||^2 (bias not penalised)
        p = F.softmax(transfer.logits(x, w), dim=1)
        residual = p - F.one_hot(y, 3).float()
        grad_w = x.T @ residual / len(x) + l2 / len(x) * w[:-1]
        grad_b = residual.mean(0)
        assert grad_w.abs().max() < 2e-4 and grad_b.abs().max() < 2e-4, l2
    # a huge penalty leaves only the bias: the class frequencies
    w = transfer.logistic_regression(x, y, 1e7, 3)
    assert w[:-1].abs().max() < 1e-3
    frequencies = torch.bincount(y, minlength=3).float() / len(y)
    assert torch.allclose(F.softmax(w[-1], dim=0), frequencies, atol=1e-3)


def test_warm_starts_reach_the_same_solution_as_cold_starts():
    x, y = blobs(300, 0)

    def objective(w, l2):
        return F.cross_entropy(transfer.logits(x, w), y).item() + \
            l2 / (2 * len(x)) * w[:-1].square().sum().item()
    w = None
    for l2 in (1e3, 10.0, 0.1):
        w = transfer.logistic_regression(x, y, l2, 3, init=w)
        cold = transfer.logistic_regression(x, y, l2, 3)
        # the same optimum (the weights only up to the gradient tolerance along flat directions)
        assert objective(w, l2) == pytest.approx(objective(cold, l2), abs=5e-5), l2
        p, p_cold = (F.softmax(transfer.logits(x, v), dim=1) for v in (w, cold))
        assert (p - p_cold).abs().max() < 0.01, l2


def test_the_sweep_picks_the_penalty_that_validation_prefers():
    grid = (1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)
    train, val = blobs(400, 0), blobs(400, 1)
    best, scores, w = transfer.regularisation_path(train, val, grid, transfer.top1, 3)
    assert best == max(range(len(grid)), key=lambda i: (scores[i], grid[i]))
    assert scores[best] > 80 and scores[grid.index(1e6)] < 50  # the blobs are separable
    assert transfer.top1(transfer.logits(val[0], w), val[1]) == scores[best]
    # Training data where class 0 is the majority, and a validation split of class-1 points all
    # labelled 0: the strongest penalty (which predicts the majority class everywhere) is now
    # the best, and the accurate fits (which predict 1 there) the worst.
    x, y = train
    keep = (y == 0) | (torch.arange(len(y)) % 4 == 0)
    val_x = val[0][val[1] == 1]
    majority = torch.zeros(len(val_x), dtype=torch.long)
    best, scores, _ = transfer.regularisation_path((x[keep], y[keep]), (val_x, majority), grid,
                                                   transfer.top1, 3)
    assert grid[best] == 1e6 and scores[best] == 100.0
    assert scores[0] < 20

# ------------------------------------------------------------------------------------------------
# transfer.py: every dataset's loader, on fake directories in torchvision's layouts
# ------------------------------------------------------------------------------------------------


def grey(k):
    """The grey level that encodes class k in the fake images."""
    return 20 + 11 * k  # up to 20 classes in 20 .. 229, far apart for JPEG's rounding


def jpeg(path, k, size=(10, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    torchvision.io.write_jpeg(torch.full((3, *size), grey(k), dtype=torch.uint8), str(path))


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_food101(root):
    classes, meta = ('apple_pie', 'bibimbap'), {}
    for split, n in (('train', 10), ('test', 3)):
        meta[split] = {c: [f'{c}/{split}{i}' for i in range(n)] for c in classes}
        for k, c in enumerate(classes):
            for i in range(n):
                jpeg(root / 'food-101' / 'images' / c / f'{split}{i}.jpg', k)
        write(root / 'food-101' / 'meta' / f'{split}.json', json.dumps(meta[split]))
    return classes, (18, 2, 6)  # val: 10% of the 20 training images, as 7575 of 75750


def fake_cifar(name, n_classes):
    def make(root):
        folder, key, meta_key = {'cifar10': ('cifar-10-batches-py', 'labels', 'label_names'),
                                 'cifar100': ('cifar-100-python', 'fine_labels',
                                              'fine_label_names')}[name]
        files = ['data_batch_1', 'data_batch_2', 'data_batch_3', 'data_batch_4', 'data_batch_5',
                 'test_batch'] if name == 'cifar10' else ['train', 'test']
        (root / folder).mkdir(parents=True)
        per_file = 20 // (len(files) - 1)
        for file in files:
            n = 10 if 'test' in file else per_file
            labels = [i % n_classes for i in range(n)]
            data = np.stack([np.full(3072, grey(k), dtype=np.uint8) for k in labels])
            with open(root / folder / file, 'wb') as f:
                pickle.dump({'data': data, key: labels}, f)
        classes = [f'class{k}' for k in range(n_classes)]
        with open(root / folder / ('batches.meta' if name == 'cifar10' else 'meta'), 'wb') as f:
            pickle.dump({meta_key: classes}, f)
        return classes, (18, 2, 10)
    return make


def fake_birdsnap(root):
    classes = ('Acadian_Flycatcher', 'Bald_Eagle')
    for k, c in enumerate(classes):
        for i in range(10):
            jpeg(root / 'birdsnap' / 'train' / c / f'{i}.jpg', k)
        for i in range(2):
            jpeg(root / 'birdsnap' / 'test' / c / f'{i}.jpg', k)
    return classes, (18, 2, 4)  # val: 4981 / 47386 of 20 = 2


def fake_sun397(root):
    classes = ('abbey', 'bakery/shop')
    folders = ('a/abbey', 'b/bakery/shop')
    write(root / 'SUN397' / 'ClassName.txt', ''.join(f'/{f}\n' for f in folders))
    lists = {'Training_01.txt': [], 'Testing_01.txt': []}
    for k, folder in enumerate(folders):
        for i in range(53):  # 50 training (40 + 10 validation) and 3 test images per class
            name = f'sun_{k}{i:03d}.jpg'
            jpeg(root / 'SUN397' / folder / name, k)
            lists['Training_01.txt' if i < 50 else 'Testing_01.txt'].append(f'/{folder}/{name}')
    jpeg(root / 'SUN397' / 'a' / 'abbey' / 'sun_unused.jpg', 0)  # in no partition
    for part, names in lists.items():
        write(root / 'SUN397' / 'Partitions' / part, '\n'.join(names) + '\n')
    return classes, (80, 20, 6)


def savemat(*args, **kwargs):
    """scipy's savemat: torchvision reads Stanford Cars' and Flowers-102's .mat files with scipy,
    which the project does not require (README, Transfer)."""
    scipy_io = pytest.importorskip('scipy.io', reason='scipy is not installed (needed by '
                                   "torchvision's Stanford Cars and Flowers-102 loaders)")
    scipy_io.savemat(*args, **kwargs)


def fake_cars(root):
    base = root / 'stanford_cars'
    classes = ['AM General Hummer SUV 2000', 'Acura RL Sedan 2012']
    (base / 'devkit').mkdir(parents=True)
    savemat(base / 'devkit' / 'cars_meta.mat', {'class_names': np.array(classes, dtype=object)})
    for split, n, mat in (('train', 10, base / 'devkit' / 'cars_train_annos.mat'),
                          ('test', 4, base / 'cars_test_annos_withlabels.mat')):
        annotations = np.zeros(n, dtype=[('fname', object), ('class', np.int64)])
        for i in range(n):
            annotations[i] = (f'{i:05d}.jpg', i % 2 + 1)  # classes are 1-based in the .mat
            jpeg(base / f'cars_{split}' / f'{i:05d}.jpg', i % 2)
        savemat(mat, {'annotations': annotations})
    return classes, (8, 2, 4)  # val: 1650 / 8144 of 10 = 2


def fake_aircraft(root):
    data = root / 'fgvc-aircraft-2013b' / 'data'
    classes = ('707-320', 'Boeing 717')
    write(data / 'variants.txt', '\n'.join(classes) + '\n')
    for split, n in (('train', 4), ('val', 3), ('test', 2)):
        lines = []
        for i in range(n):
            k = i % 2
            name = f'{split}{i:04d}'
            jpeg(data / 'images' / f'{name}.jpg', k)
            lines.append(f'{name} {classes[k]}')
        write(data / f'images_variant_{split}.txt', '\n'.join(lines) + '\n')
    return classes, (4, 3, 2)


def voc_xml(objects):
    body = ''.join(f'<object><name>{name}</name><difficult>{int(difficult)}</difficult>'
                   '</object>' for name, difficult in objects)
    return f'<annotation><filename>x.jpg</filename>{body}</annotation>'


VOC_IMAGES = {  # image id: objects (class, difficult)
    'train': {'000001': [('dog', 0), ('person', 0)], '000002': [('cat', 0), ('dog', 1)]},
    'val': {'000003': [('aeroplane', 0)]},
    'test': {'000004': [('person', 1), ('person', 0)], '000005': [('cat', 1)],
             '000006': [('bird', 0)]},
}


def fake_voc2007(root):
    voc = root / 'VOCdevkit' / 'VOC2007'
    for split, images in VOC_IMAGES.items():
        write(voc / 'ImageSets' / 'Main' / f'{split}.txt', '\n'.join(images) + '\n')
        for image_id, objects in images.items():
            first = min(transfer.VOC_CLASSES.index(c) for c, d in objects)
            jpeg(voc / 'JPEGImages' / f'{image_id}.jpg', first)
            write(voc / 'Annotations' / f'{image_id}.xml', voc_xml(objects))
    return transfer.VOC_CLASSES, (2, 1, 3)


def fake_dtd(root):
    data = root / 'dtd' / 'dtd'
    classes = ('banded', 'blotchy')
    for split, n in (('train', 4), ('val', 2), ('test', 2)):
        lines = []
        for i in range(n):
            c = classes[i % 2]
            jpeg(data / 'images' / c / f'{c}_{split}{i}.jpg', i % 2)
            lines.append(f'{c}/{c}_{split}{i}.jpg')
        write(data / 'labels' / f'{split}1.txt', '\n'.join(lines) + '\n')
        write(data / 'labels' / f'{split}2.txt', '')  # another partition, unused
    return classes, (4, 2, 2)


def fake_pets(root):
    base = root / 'oxford-iiit-pet'
    breeds = ('Abyssinian', 'american_bulldog')  # class ids 1 and 2 in the annotation files
    for split, n in (('trainval', 22), ('test', 2)):
        lines = []
        for k, breed in enumerate(breeds):
            for i in range(n):
                name = f'{breed}_{split}{i}'
                jpeg(base / 'images' / f'{name}.jpg', k)
                lines.append(f'{name} {k + 1} {k + 1} 1')
        write(base / 'annotations' / f'{split}.txt', '\n'.join(lines) + '\n')
    return ('Abyssinian', 'American Bulldog'), (4, 40, 4)  # 20 validation images per class


def fake_caltech101(root):
    base = root / 'caltech101' / '101_ObjectCategories'
    classes = ('BACKGROUND_Google', 'Faces', 'ant')  # the paper keeps the background class
    for k, c in enumerate(classes):
        for i in range(32 + k):
            jpeg(base / c / f'image_{i + 1:04d}.jpg', k)
    return classes, (75, 15, 2 + 3 + 4)  # 25 + 5 per class, the rest for test


def fake_flowers(root, monkeypatch):
    base = root / 'flowers-102'
    labels = [1, 2] * 6  # 12 images, 1-based labels
    for i, label in enumerate(labels):
        jpeg(base / 'jpg' / f'image_{i + 1:05d}.jpg', label - 1)
    savemat(base / 'imagelabels.mat', {'labels': np.array(labels)})
    savemat(base / 'setid.mat', {'trnid': np.arange(1, 5), 'valid': np.arange(5, 9),
                                 'tstid': np.arange(9, 13)})
    # torchvision checks the two .mat files' MD5 sums: fakes cannot pass, so skip the check.
    monkeypatch.setattr(torchvision.datasets.flowers102, 'check_integrity', lambda *a: True)
    return None, (4, 4, 4)


FAKES = dict(food101=fake_food101, cifar10=fake_cifar('cifar10', 10),
             cifar100=fake_cifar('cifar100', 5), birdsnap=fake_birdsnap, sun397=fake_sun397,
             cars=fake_cars, aircraft=fake_aircraft, voc2007=fake_voc2007, dtd=fake_dtd,
             pets=fake_pets, caltech101=fake_caltech101, flowers=fake_flowers)


def build_fake(name, root, monkeypatch):
    if name == 'flowers':
        return fake_flowers(root, monkeypatch)
    if name in ('cifar10', 'cifar100'):  # torchvision checks the MD5 of every batch file
        monkeypatch.setattr(torchvision.datasets.cifar, 'check_integrity', lambda *a: True)
    return FAKES[name](root)


def first_class(targets):
    """The class an image's grey level encodes: its label, or its first class with an object."""
    return targets if targets.dim() == 1 else (targets != 0).long().argmax(dim=1)


@pytest.mark.parametrize('name', list(transfer.DATASETS))
def test_every_dataset_loader_is_wired(name, tmp_path, monkeypatch):
    assert set(FAKES) == set(transfer.DATASETS) == set(transfer.LOADERS)
    assert not transfer.present(name, tmp_path)
    classes, sizes = build_fake(name, tmp_path, monkeypatch)
    assert transfer.present(name, tmp_path)
    splits = transfer.load_dataset(name, tmp_path, download=False, seed=0)
    assert tuple(len(splits[s].images) for s in ('train', 'val', 'test')) == sizes
    assert tuple(len(splits[s].targets) for s in ('train', 'val', 'test')) == sizes
    if classes is not None:
        assert list(splits['train'].images.classes) == list(classes)
    for split in splits.values():
        for i in range(len(split.images)):  # each image's grey level encodes its class
            image = split.images.load(i)
            assert image.dtype == torch.uint8 and image.shape[0] == 3 and image.dim() == 3
            k = first_class(split.targets)[i].item()
            assert abs(image.float().mean().item() - grey(k)) < 4, (split.images.name(i), k)
    # the splits are disjoint (in-memory CIFAR images are named by index: train and val then)
    names = [{s.images.name(i) for i in range(len(s.images))} for s in splits.values()]
    if name.startswith('cifar'):
        names[2] = set()
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_voc2007_targets_mark_difficult_only_classes(tmp_path, monkeypatch):
    fake_voc2007(tmp_path)
    splits = transfer.load_dataset('voc2007', tmp_path)
    c = transfer.VOC_CLASSES.index
    train, test = splits['train'].targets, splits['test'].targets
    assert train.shape == (2, 20) and train.sum() == 3 - 1  # dog, person; cat, dog (difficult)
    assert train[0, c('dog')] == 1 and train[0, c('person')] == 1
    assert train[1, c('cat')] == 1 and train[1, c('dog')] == -1
    assert test[0, c('person')] == 1  # a difficult and a plain person: present
    assert test[1, c('cat')] == -1 and test[2, c('bird')] == 1


def test_missing_datasets_give_one_line_errors(tmp_path, capsys):
    code, _, err = run_main(transfer, ['--dataset', 'dtd', '--data-root', tmp_path], capsys)
    assert code == 2 and err.count('\n') == 1 and 'pass --download' in err
    assert 'transfer.py: error: DTD not found' in err
    code, _, err = run_main(transfer, ['--dataset', 'cars', '--data-root', tmp_path,
                                       '--download'], capsys)
    assert code == 2 and 'torchvision cannot download it' in err
    code, _, err = run_main(transfer, ['--all', '--data-root', tmp_path], capsys)
    assert code == 2 and 'none of the 12 datasets' in err
    code, _, err = run_main(transfer, ['--data-root', tmp_path], capsys)
    assert code == 2 and '--dataset NAME or --all' in err
    assert not (tmp_path / 'caltech101').exists()  # nothing was created under --data-root

# ------------------------------------------------------------------------------------------------
# transfer.py: the protocols end to end
# ------------------------------------------------------------------------------------------------


def test_all_runs_the_present_datasets_and_writes_the_table(tmp_path, monkeypatch, capsys):
    fake_dtd(tmp_path)
    fake_voc2007(tmp_path)
    out = tmp_path / 'out'
    code, stdout, err = run_main(transfer, ['--all', '--data-root', tmp_path, *TINY_T, '--l2', '1',
                                            '1e3', '--output-dir', out], capsys)
    assert code == 0, err
    assert stdout.count('skipped, not found') == 10 and 'Food-101: skipped' in stdout
    rows = json.load(open(out / 'table_linear.json'))
    assert [r['dataset'] for r in rows[:2]] == ['VOC2007', 'DTD']  # the paper's order
    assert rows[0]['metric'] == '11-point mAP' and rows[0]['paper'] == 82.5
    assert len(rows) == 12 and all(r['ours'] is None for r in rows[2:])
    markdown = (out / 'table_linear.md').read_text()
    assert '| VOC2007 | 11-point mAP |' in markdown and '| 75.5 |' in markdown
    voc = json.load(open(out / 'voc2007_linear.json'))
    assert voc['train_val_test'] == [2, 1, 3] and voc['l2'] in (1.0, 1000.0)
    assert 0 <= voc['test'] <= 100


def test_finetune_protocol_runs_the_grid_and_refits(image_folder, tmp_path, capsys):
    assert transfer.bn_momentum(50) == pytest.approx(0.1)      # decay max(1 - 10/50, 0.9) = 0.9
    assert transfer.bn_momentum(1000) == pytest.approx(0.01)   # decay 0.99
    lrs, wds = transfer.FINETUNE_GRIDS['full']
    assert len(lrs) == 7 and len(wds) == 8 and wds[0] == 0
    assert lrs[0] == pytest.approx(1e-4) and lrs[-1] == pytest.approx(0.1)
    assert wds[1] == pytest.approx(1e-6) and wds[-1] == pytest.approx(1e-3)
    results = transfer.main(['--dataset', 'folder', '--data-root', str(image_folder), *TINY_T,
                             '--protocol', 'finetune', '--grid', 'quick', '--steps', '6',
                             '--batch-size', '16', '--output-dir', str(tmp_path)])
    result, = results
    assert len(result['val_by_lr_wd']) == 4 and (result['lr'], result['wd']) in [
        (lr, wd) for lr in (0.01, 0.1) for wd in (0.0, 1e-5)]
    assert result['val'] == max(result['val_by_lr_wd'].values())
    assert result['train_val_test'] == [58, 6, 16] and 0 <= result['test'] <= 100

# ------------------------------------------------------------------------------------------------
# README.md: the map from the paper to the code ("The paper in the code")
# ------------------------------------------------------------------------------------------------
SCRIPTS = {'byol.py': byol, 'augment.py': augment, 'linear_eval.py': linear_eval,
           'semi_sup.py': semi_sup, 'transfer.py': transfer}
MAP_ENTRY = re.compile(r'`(\w+\.py): ([\w.]+)`')  # `file.py: name`


def paper_map():
    """The README's map -> (every `file.py: name` it gives, Counter of the (file, top-level
    name) of its DEVIATION rows, '| | DEVIATION `file.py: name`: why |')."""
    section = (HERE / 'README.md').read_text().split('\n## The paper in the code\n')[1]
    section = section.split('\n## ')[0]
    names = MAP_ENTRY.findall(section)
    deviations = Counter((file, name.split('.')[0]) for line in section.splitlines()
                         if line.startswith('| | DEVIATION')  # a row beneath its passage
                         for file, name in MAP_ENTRY.findall(line))
    return names, deviations


def code_deviations():
    """Counter of (file, the top-level function, class or assignment holding it) over every
    DEVIATION in the five scripts."""
    found = Counter()
    for file in SCRIPTS:
        source = (HERE / file).read_text()
        body = ast.parse(source).body
        for number, line in enumerate(source.splitlines(), 1):
            if 'DEVIATION' not in line:
                continue
            # the statement that holds the line, or (module level) the first one after it
            stmt = next(s for s in body if s.end_lineno >= number)
            name = getattr(stmt, 'name', None) or stmt.targets[0].id
            found[file, name] += 1
    return found


def test_the_readme_map_names_what_exists_and_every_deviation():
    names, deviations = paper_map()
    assert len(names) > 60
    for file, name in names:
        assert file in SCRIPTS, f'{file}: not one of the five scripts'
        obj = SCRIPTS[file]
        for part in name.split('.'):
            assert hasattr(obj, part), f'README names {file}: {name}, which does not exist'
            obj = getattr(obj, part)
    code = code_deviations()
    assert sum(code.values()) >= 12
    assert deviations == code, (f'DEVIATIONs in the code, not in the README map: '
                                f'{code - deviations}; in the map, not in the code: '
                                f'{deviations - code}')


# ------------------------------------------------------------------------------------------------
# Slow: learning on real data, CIFAR-10 as an image folder (pytest -m slow; 7-9 min on 2 cores)
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_cifar10
def test_byol_learns_on_cifar10(cifar_byol, tmp_path, capsys):
    out, stdout = cifar_byol
    lines = progress(stdout)
    first, last = lines[0][0], lines[-1][0]
    assert last <= 0.7 * first, f'the loss fell from {first} to {last} only'
    assert all(std * math.sqrt(128) >= 0.5 for _, std in lines), 'collapse'
    # the monitor (the official online classifier on sg(y)) learns the 10 classes as BYOL
    # learns: measured 18.7% of the training batches right in epoch 1, 32.1% in epoch 5
    monitor = [json.loads(line)['train_top1'] for line in open(out / 'log.jsonl')]
    assert len(monitor) == 5 and monitor[-1] >= 20 and monitor[-1] > monitor[0] + 5, monitor
    probe = ['--data', CIFAR10, '--train-images', '10000', '--workers', '0',
             '--output-dir', tmp_path]
    trained = linear_eval.main([str(a) for a in probe + ['--pretrained', out / 'checkpoint.pth']])
    random = linear_eval.main([str(a) for a in probe + ['--arch', 'convnet', '--width', '16',
                                                        '--seed', '0']])
    print(f'linear probe: random init {random["top1"]:.2f}%, BYOL {trained["top1"]:.2f}%')
    assert trained['top1'] >= random['top1'] + 2.0, (trained, random)
    assert trained['image_size'] == 32 and trained['train_images'] == 10000
    assert trained['knn_top1'] > random['knn_top1']
    records = [json.loads(line) for line in open(tmp_path / 'results.jsonl')]
    assert [r['top1'] for r in records] == [trained['top1'], random['top1']]


@pytest.mark.slow
@needs_cifar10
def test_byol_init_beats_random_init_with_ten_percent_of_labels(cifar_byol, tmp_path):
    out, _ = cifar_byol
    # 5,000 labelled images (500 per class), all trained on: one setting of the grid, lr 0.1 x 4
    # epochs, so none held out to choose (the paper's 30 or 50 epochs let random init catch up
    # with an encoder of minutes: see semi_sup.py's docstring); all 10,000 validation images.
    args = ['--data', CIFAR10, '--subset', '0.1', '--lr', '0.1', '--epochs', '4',
            '--workers', '0', '--output-dir', tmp_path]
    tuned = semi_sup.main(list(map(str, args + ['--pretrained', out / 'checkpoint.pth'])))
    scratch = semi_sup.main(list(map(str, args + ['--arch', 'convnet', '--width', '16'])))
    print(f'10% of CIFAR-10 labels, 4 epochs: random init {scratch["top1"]:.2f}%, '
          f'BYOL {tuned["top1"]:.2f}%')
    assert (tuned['labelled_images'], tuned['train_images'], tuned['batch_size'],
            tuned['val_images']) == (5000, 5000, 256, 10000)
    # Measured (float32): 46.06% vs 42.44%; from a 4-epoch encoder, 44.74% vs 42.44%.
    assert tuned['top1'] >= scratch['top1'] + 1.5, (tuned, scratch)


@pytest.mark.slow
@needs_cifar10
def test_linear_transfer_to_cifar10_beats_random_init(cifar_byol, tmp_path):
    """A real transfer target: a subset of the CIFAR-10 folder as --dataset cifar10."""
    root = tmp_path / 'data'
    for split, n in (('train', 1000), ('val', 200)):  # 10,000 training and 2,000 test images
        for folder in sorted((CIFAR10 / split).iterdir()):
            target = root / 'cifar10' / split / folder.name
            target.mkdir(parents=True)
            for f in sorted(folder.iterdir())[:n]:
                os.symlink(f, target / f.name)
    out, _ = cifar_byol
    common = ['--dataset', 'cifar10', '--data-root', root, '--workers', '0',
              '--output-dir', tmp_path / 'out']
    trained, = transfer.main([str(a) for a in common + ['--pretrained', out / 'checkpoint.pth']])
    random, = transfer.main([str(a) for a in common + ['--arch', 'convnet', '--width', '16']])
    print(f'linear transfer to CIFAR-10: random init {random["test"]:.2f}%, '
          f'BYOL {trained["test"]:.2f}%')
    assert trained['train_val_test'] == [9000, 1000, 2000] and trained['image_size'] == 32
    assert len(trained['val_by_l2']) == 45
    assert trained['test'] >= random['test'] + 2.0, (trained['test'], random['test'])

"""augment.py: everything between image files and the two views BYOL trains on: the image sources,
the two augmentation distributions T and T' (paper section 3.3, appendix B), and the pipeline that
turns files into batches of views on the training device.

A view is made in stages: read the file, decode it, take a random resized crop (the geometric half
of T and T', bicubic as TF's, kept as uint8 so that 4x fewer bytes travel), then the photometric
half over the whole batch at once: flip, colour jitter (random order per image), grayscale,
Gaussian blur, solarize, normalisation. Every op is a batched tensor op whose random parameters are
per image, so each stage runs in the data loader's workers or on the training device (CPU or GPU)
with the same result: where it runs is a matter of speed (`batches`).

All randomness comes from `uniforms(seed, epoch, index)`: a counter-based hash of the image's index,
so an image's augmentation is the same whatever the number of processes, workers or batch
composition, and on any device. Each op maps its uniform numbers to its range in plain view.

The ops follow the official code, not torchvision's ColorJitter (SPEC.md section 3): brightness is
additive, contrast is around each channel's own mean, saturation and hue are shifts in HSV, values
are clipped to [0, 1] after every op, grayscale has its own gate and the blur kernel is 10% of the
image side (23 taps at 224 px, 3 at 32 px).

Usage (what byol.py does):
    images = load_images('/imagenet')                          # an image source
    loader, where = batches(images, 224, 256, 'byol', seed, device, workers)
    loader.set_epoch(epoch)
    for views, labels, indices in loader:                      # views (2, B, 3, 224, 224)
        v1, v2 = views                                         # v1 ~ T, v2 ~ T', normalised

Command: python augment.py IMAGE --out views.png   (a picture of T and T': README, "T and T'")
"""
import argparse
import functools
import io
import math
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision


class UserError(Exception):
    """A problem with the user's input (data, flags, files): reported as one line, no traceback."""


# ================================================================================================
# The two views: T and T' (paper section 3.3, appendix B)
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# The two distributions side by side (paper Table 6; SPEC.md section 3)
# ------------------------------------------------------------------------------------------------
#   parameter        T             T'            meaning
VIEWS = {
    'crop_area':    ((0.08, 1.0),  (0.08, 1.0)),  # random resized crop: area fraction, uniform
    'crop_ratio':   ((3 / 4, 4 / 3), (3 / 4, 4 / 3)),  # aspect ratio w/h, log-uniform
    'flip_p':       (0.5,          0.5),          # horizontal flip
    'jitter_p':     (0.8,          0.8),          # one gate for the four jitter ops below
    'brightness':   (0.4,          0.4),          # x + delta, delta ~ U[-0.4, 0.4]
    'contrast':     (0.4,          0.4),          # (x - channel mean) * U[0.6, 1.4] + mean
    'saturation':   (0.2,          0.2),          # HSV: s * U[0.8, 1.2]
    'hue':          (0.1,          0.1),          # HSV: h + U[-0.1, 0.1] mod 1
    'gray_p':       (0.2,          0.2),          # 0.2989 R + 0.5870 G + 0.1140 B, 3 channels
    'blur_p':       (1.0,          0.1),          # Gaussian blur, kernel 10% of the side
    'blur_sigma':   ((0.1, 2.0),   (0.1, 2.0)),   # sigma ~ U[0.1, 2.0], one per image
    'solarize_p':   (0.0,          0.2),          # x >= 0.5 -> 1 - x
}
T = {name: values[0] for name, values in VIEWS.items()}
T_PRIME = {name: values[1] for name, values in VIEWS.items()}

# ImageNet channel statistics, applied after augmentation (as the official code, for every dataset).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)
SOLARIZE_THRESHOLD = 0.5

# ------------------------------------------------------------------------------------------------
# Randomness: uniform numbers that depend only on (seed, epoch, image index)
# ------------------------------------------------------------------------------------------------
# One uniform number per random choice of a view. Jitter order: the permutation that sorts four
# uniform keys is a uniformly random permutation of the four ops.
SLOTS = ('crop_area', 'crop_ratio', 'crop_x', 'crop_y', 'flip', 'jitter',
         'order_brightness', 'order_contrast', 'order_saturation', 'order_hue',
         'brightness', 'contrast', 'saturation', 'hue', 'gray', 'blur', 'blur_sigma', 'solarize')
SLOT = {name: i for i, name in enumerate(SLOTS)}
N_SLOTS = len(SLOTS)

# splitmix64 constants (Steele, Lea, Flood 2014) written as signed 64-bit integers; torch's int64
# arithmetic wraps modulo 2**64, which is what the hash needs.
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX1 = -4658895280553007687    # 0xBF58476D1CE4E5B9
_MIX2 = -7723592293110705685    # 0x94D049BB133111EB


def _shift_right(x, n):
    """Logical right shift of int64 (torch's >> is arithmetic for negative numbers)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x):
    """splitmix64's finaliser: a bijection of 64-bit integers that scrambles every bit."""
    x = (x + _GOLDEN)
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def uniforms(seed, epoch, index, n_views=2):
    """Uniform numbers in [0, 1) for images `index` (B,) -> (B, n_views, N_SLOTS) float32.

    A pure function of (seed, epoch, index, view, slot): no generator state, identical on CPU and
    GPU, in any batch and under any number of processes or data-loader workers."""
    index = torch.as_tensor(index, dtype=torch.int64)
    key = _mix(_mix(_mix(torch.tensor(seed, dtype=torch.int64)) ^ epoch) ^ index)  # (B,)
    counter = torch.arange(n_views * N_SLOTS, dtype=torch.int64, device=index.device)
    bits = _mix(key[:, None] ^ _mix(counter))                                      # (B, V*K)
    # The top 24 bits make a float32 in [0, 1) exactly.
    u = _shift_right(bits, 40).to(torch.float32) * 2.0 ** -24
    return u.view(-1, n_views, N_SLOTS)


def _between(u, low_high):
    low, high = low_high
    return low + (high - low) * u

# ------------------------------------------------------------------------------------------------
# The crop: the geometric half of T and T' (random resized crops), and evaluation crops
# ------------------------------------------------------------------------------------------------


def crop_boxes(u, heights, widths, view=T):
    """Random resized crop boxes (B, 4) int64 rows (top, left, h, w) from one view's uniforms
    u (B, N_SLOTS), for images of the given heights and widths (B,) (or one shared size).

    As the official code: a single draw, no retry (torchvision retries 10 times then falls back to
    a centre crop): area A = U[0.08, 1] * H * W, ratio r log-uniform in [3/4, 4/3],
    w = round(sqrt(A r)), h = round(sqrt(A / r)), clamped to the image, uniform offset.
    Computed in float64, so the loader (one image at a time) and the device (whole batch) agree."""
    u = u.double()
    height, width = (_sizes(s, u.device) for s in (heights, widths))
    area = _between(u[:, SLOT['crop_area']], view['crop_area']) * height * width
    ratio = torch.exp(_between(u[:, SLOT['crop_ratio']],
                               [math.log(r) for r in view['crop_ratio']]))
    w = torch.minimum(width, torch.sqrt(area * ratio).round().clamp_min(1))
    h = torch.minimum(height, torch.sqrt(area / ratio).round().clamp_min(1))
    top = torch.minimum(height - h, (u[:, SLOT['crop_y']] * (height - h + 1)).floor())
    left = torch.minimum(width - w, (u[:, SLOT['crop_x']] * (width - w + 1)).floor())
    return torch.stack([top, left, h, w], dim=1).long()


def _sizes(s, device):
    """Image sizes as float64 on the device: an int shared by all (a fill: no host copy), or
    one per image."""
    if isinstance(s, int):
        return torch.full((), s, dtype=torch.float64, device=device)
    return torch.as_tensor(s, dtype=torch.float64, device=device)


def crop_box(u, height, width, view=T):
    """crop_boxes for one image: u (N_SLOTS,) -> (top, left, h, w) ints."""
    return tuple(crop_boxes(u[None], height, width, view)[0].tolist())


def center_crop_boxes(heights, widths, n, fraction=0.875):
    """Evaluation crops: the centred square of side fraction x min(H, W) (SPEC.md section 3, 'Eval
    crop'; resized to 224 this is the usual resize 256 + centre crop 224) for n images of the
    given heights and widths (n,) (or one shared size) -> (n, 4) int64 rows (top, left, h, w).
    As the official code: the side truncated (in float32), the offsets (H - side + 1) // 2."""
    height, width = (torch.as_tensor(s).expand(n) for s in (heights, widths))
    side = (fraction * torch.minimum(height, width).float()).long().clamp_min(1)
    return torch.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side], dim=1)


def resized_crop(image, box, size):
    """Crop box (top, left, h, w) out of a uint8 image (C, H, W) and resize it to size x size as
    TF's bicubic resize in the official pipeline -> uint8."""
    return crops_of([image], torch.tensor([[box]]), size)[0, 0]


def crops_of(images, boxes, size, dtype=torch.uint8):
    """Resized crops of images of any sizes (a list of B uint8 (C, H, W), stored channels last
    as decoded, or Photos) with boxes (B, V, 4) on the host -> (B, V, C, S, S), rounded to uint8,
    or kept in float32 in [0, 255] (dtype float32: evaluation, as the official code). On the
    CPU crop by crop: each pass makes every output row a weighted sum of its four taps in one
    fused gather (embedding_bag): the crop's rows (h, w C) -> (S, w C); transposed, its columns
    (w C, S) -> (C S, S), transposed back. At 224 px on ImageNet-size photos 2x faster than four
    gathers and four products per pass, 5x faster than dense resampling matrices
    (bench/RESULTS.md). On a GPU every crop at once: _crops_at_once, the same sums."""
    if isinstance(images, Photos):
        if images.pixels.device.type != 'cpu':
            return _crops_at_once(images, boxes, size, dtype)
        images = images.images()
    elif images[0].device.type != 'cpu':
        return _crops_at_once(Photos.of(images), boxes, size, dtype)
    b, v, device = *boxes.shape[:2], images[0].device
    boxes = boxes.reshape(-1, 4)
    row_taps, row_weights = _bicubic_taps(boxes[:, 2], size)   # (BV, 4, S), taps first
    col_taps, col_weights = _bicubic_taps(boxes[:, 3], size)
    c = images[0].shape[0]
    channels = torch.arange(c, device=device)[:, None, None]    # row x C + c: column x, channel c
    out = torch.empty(b * v, c, size, size, dtype=dtype, device=device)
    for k, (t, l, h, w) in enumerate(boxes.tolist()):
        crop = images[k // v][:, t:t + h, l:l + w].permute(1, 2, 0).float().reshape(h, w * c)
        rows = _weighted_rows(crop, row_taps[k], row_weights[k])                # (S, w C)
        both = _weighted_rows(_transposed(rows), col_taps[k] * c + channels,
                              col_weights[k].expand(c, -1, -1))                 # (C S, S)
        out[k] = _transposed(_rounded(both, dtype).view(c, size, size))
    return out.view(b, v, *out.shape[1:])


def _rounded(x, dtype):
    """Resampled pixels, clipped to [0, 255], rounded to uint8 or kept in float32."""
    if dtype == torch.uint8:
        return x.round_().clamp_(0, 255).int().to(torch.uint8)  # (via int32: 3x faster)
    return x.clamp_(0, 255)


def _weighted_rows(x, taps, weights):
    """sum_j weights[..., j, :] * x[taps[..., j, :]]: one resampling pass of four taps over the
    rows of x (N, M), with taps and weights (..., 4, S) -> (... S, M), in one fused gather."""
    return F.embedding_bag(
        taps.transpose(-1, -2).reshape(-1, 4), x, mode='sum',
        per_sample_weights=weights.transpose(-1, -2).reshape(-1, 4))


def _transposed(x):
    """x with its last two dimensions swapped, contiguous: on the CPU by numpy (1.2-1.7x faster
    than torch's copy for these shapes)."""
    if x.device.type != 'cpu':
        return x.transpose(-1, -2).contiguous()
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(x.numpy(), -1, -2)))


def _bicubic_taps(length, size):
    """The four taps (B, 4, size) and their weights (B, 4, size) that resample each image's
    `length` rows to `size` rows as TF's bicubic resize (tf.image.resize, antialias off, as the
    official code): half-pixel centres x = (j + 0.5) length / size - 0.5; Keys' cubic
    convolution (a = -0.5) on the taps floor(x) - 1 .. floor(x) + 2, with x's fraction rounded
    to 1/1024 (TF's table of coefficients); taps outside the crop get weight 0 and the others
    are renormalised to sum 1. In float32, as TF computes the sample positions."""
    j = torch.arange(size, device=length.device, dtype=torch.float32)
    x = (j[None] + 0.5) * (length[:, None].float() / size) - 0.5        # (B, size)
    base = x.floor()
    t = ((x - base) * 1024).round()[:, None].double() / 1024            # (B, 1, size)
    offsets = torch.arange(-1, 3, device=length.device)[:, None]        # the four taps
    d = (t - offsets).abs()                                             # distances to them
    a = -0.5
    weight = torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                         ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)     # (B, 4, size)
    taps = base[:, None].long() + offsets
    weight = weight * ((taps >= 0) & (taps < length[:, None, None]))
    weight = weight / weight.sum(dim=1, keepdim=True)
    return torch.minimum(taps.clamp_min(0), length[:, None, None] - 1), weight.float()

# ------------------------------------------------------------------------------------------------
# Photometric ops (on the device, batched; x is (B, 3, H, W) in [0, 1], parameters are (B,))
# ------------------------------------------------------------------------------------------------


def _per_image(values):
    return values.view(-1, 1, 1, 1)


@functools.lru_cache(maxsize=None)
def constant(values, device, dtype=torch.float32):
    """A tuple of numbers as a (1, n, 1, 1) tensor on the device, made once per device and
    dtype: a fresh torch.tensor(..., device='cuda') is a blocking copy that waits for all
    queued GPU work, 14 of them a step."""
    return torch.tensor(values, dtype=dtype).view(1, -1, 1, 1).to(device)


def adjust_brightness(x, delta):
    """Additive brightness: x + delta (TF's adjust_brightness)."""
    return (x + _per_image(delta)).clamp(0, 1)


def adjust_contrast(x, factor):
    """Contrast around each channel's own spatial mean: (x - mean_c) * factor + mean_c."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return ((x - mean) * _per_image(factor) + mean).clamp(0, 1)


def rgb_to_hsv(x):
    """(B, 3, H, W) RGB in [0, 1] -> hue, saturation, value, each (B, H, W) in [0, 1]."""
    r, g, b = x.unbind(1)
    value = torch.maximum(torch.maximum(r, g), b)  # (elementwise: 15x a reduction over dim 1)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), 0.0)
    c = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, (g - b) / c,
                      torch.where(value == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    hue = torch.where(chroma > 0, _fraction(hue / 6.0), 0.0)
    return hue, saturation, value


def _fraction(x):
    """x mod 1 in [0, 1): the same bits as torch.remainder(x, 1.0), 6x faster on CPUs."""
    return x - x.floor()


def hsv_to_rgb(hue, saturation, value):
    """Inverse of rgb_to_hsv: channel_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6,
    with n = 5, 3, 1 for R, G, B (n + 6h < 12: the mod is one exact subtraction)."""
    n = constant((5.0, 3.0, 1.0), hue.device, hue.dtype)
    k = n + 6.0 * hue[:, None]
    k = torch.where(k >= 6.0, k - 6.0, k)
    weight = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return value[:, None] - (value * saturation)[:, None] * weight


def adjust_saturation(x, factor):
    """HSV saturation s <- s * factor, clipped to [0, 1] (TF's adjust_saturation)."""
    hue, saturation, value = rgb_to_hsv(x)
    saturation = (saturation * factor.view(-1, 1, 1)).clamp(0, 1)
    return hsv_to_rgb(hue, saturation, value).clamp(0, 1)


def adjust_hue(x, shift):
    """HSV hue h <- (h + shift) mod 1 (TF's adjust_hue)."""
    hue, saturation, value = rgb_to_hsv(x)
    hue = _fraction(hue + shift.view(-1, 1, 1))
    return hsv_to_rgb(hue, saturation, value).clamp(0, 1)


def color_jitter(x, u, view):
    """Brightness, contrast, saturation and hue, each once, in a random order per image, all
    gated by one coin (p = jitter_p): an image whose coin is off runs none of them (paper
    Table 6; SPEC.md section 3, 'Jitter'). Each op clips to [0, 1], as the official code.

    Batched without masks: at each of the four positions, the images are grouped by the op they
    drew for it, and each op runs on its own group only (gathered, adjusted, written back), so an
    image runs exactly its four ops (running every op on every image, with identity parameters
    for the others, moved 2.9x the bytes, bench/RESULTS.md, and changed bits: (x - m) * 1 + m
    is not always x).
    The groups' sizes are read from u on the host, so u on the host (the pipeline's way) makes
    nothing wait for the device; u on a GPU is copied to the host once, a wait for its queue."""
    host = u.cpu()
    on = host[:, SLOT['jitter']] < view['jitter_p']
    # order[b, k]: the op image b runs k-th, 0 brightness, 1 contrast, 2 saturation, 3 hue (the
    # four keys sorted; stable: a tie, however rare, runs the lower op first on every device)
    first = SLOT['order_brightness']
    order = host[:, first:first + 4].argsort(dim=1, stable=True)
    u = u.to(x.device, non_blocking=True)
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    parameters = ((2 * u[:, SLOT['brightness']] - 1) * view['brightness'],      # delta
                  1 + (2 * u[:, SLOT['contrast']] - 1) * view['contrast'],      # factor
                  1 + (2 * u[:, SLOT['saturation']] - 1) * view['saturation'],  # factor
                  (2 * u[:, SLOT['hue']] - 1) * view['hue'])                    # shift
    x = x.clone()  # (the groups are written back in place)
    for k in range(4):
        for op, (adjust, parameter) in enumerate(zip(ops, parameters)):
            images = (on & (order[:, k] == op)).nonzero()[:, 0]  # on the host: its size is known
            if len(images) == 0:
                continue
            images = images.to(x.device, non_blocking=True)
            x.index_copy_(0, images, adjust(x.index_select(0, images), parameter[images]))
    return x


def grayscale(x):
    """0.2989 R + 0.5870 G + 0.1140 B, tiled to three channels."""
    return (x * constant(GRAY_WEIGHTS, x.device, x.dtype)).sum(dim=1, keepdim=True).expand_as(x)


def blur_radius(size):
    """Kernel radius of the official code: int(size / 10 / 2), i.e. 23 taps at 224 px, 3 at 32."""
    return int(size / 10 / 2)


def gaussian_kernels(sigma, radius):
    """Normalised 1-D Gaussian kernels, one per image: (B,) -> (B, 2 radius + 1)."""
    t = torch.arange(-radius, radius + 1, device=sigma.device, dtype=torch.float32)
    kernel = torch.exp(-t ** 2 / (2 * sigma[:, None] ** 2))
    return kernel / kernel.sum(dim=1, keepdim=True)


def gaussian_blur(x, sigma, radius):
    """Separable Gaussian blur with one sigma per image and zero padding (as the official code;
    torchvision pads by reflection)."""
    if radius == 0:
        return x
    b, c, h, w = x.shape
    kernel = gaussian_kernels(sigma, radius).to(x.dtype).repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(y, kernel[:, None, :, None], padding=(radius, 0), groups=b * c)
    y = F.conv2d(y, kernel[:, None, None, :], padding=(0, radius), groups=b * c)
    return y.view(b, c, h, w)


def solarize(x):
    """x >= 0.5 -> 1 - x."""
    return torch.where(x >= SOLARIZE_THRESHOLD, 1 - x, x)


def normalize(x):
    return (x - constant(MEAN, x.device, x.dtype)) / constant(STD, x.device, x.dtype)


def flip(x, u, p=0.5):
    """Horizontal flip of the images whose flip uniform is below p."""
    return torch.where(_per_image(u[:, SLOT['flip']] < p), x.flip(-1), x)


def augment_batch(crops, u, view):
    """The photometric half of T or T' on a batch of uint8 crops (B, 3, S, S), with uniforms
    u (B, N_SLOTS) -> normalised float32 views. Order as the official code: flip, jitter,
    grayscale, blur, solarize, clip, normalise. u is best on the host (the pipeline's way): the
    jitter reads its groups' sizes there; u on a GPU makes the jitter wait for the GPU once."""
    jitter_u, u = u, u.to(crops.device, non_blocking=True)
    x = crops.float() / 255
    x = flip(x, u, view['flip_p'])
    x = color_jitter(x, jitter_u, view)
    x = torch.where(_per_image(u[:, SLOT['gray']] < view['gray_p']), grayscale(x), x)
    sigma = _between(u[:, SLOT['blur_sigma']], view['blur_sigma'])
    blurred = gaussian_blur(x, sigma, blur_radius(x.shape[-1]))
    x = torch.where(_per_image(u[:, SLOT['blur']] < view['blur_p']), blurred, x)
    x = torch.where(_per_image(u[:, SLOT['solarize']] < view['solarize_p']), solarize(x), x)
    return normalize(x.clamp(0, 1))


def eval_batch(crops, u=None):
    """Evaluation views: an optional random flip (training a linear head), then normalise."""
    x = crops.float() / 255
    if u is not None:
        x = flip(x, u)
    return normalize(x)

# ------------------------------------------------------------------------------------------------
# How an image becomes its two views
# ------------------------------------------------------------------------------------------------


def two_views(crops, u):
    """v ~ T and v' ~ T' for a batch of images (paper section 3.1): each image's two random
    resized crops (crops (B, 2, 3, S, S) uint8, made by crops_of with crop_boxes drawn from u),
    then the photometric half of T on the first and of T' on the second, each with the image's
    own uniform numbers u (B, 2, N_SLOTS) -> the two views (2, B, 3, S, S), normalised. Where
    the pipeline runs its stages (loader workers, the device), this is what it computes."""
    v = augment_batch(crops[:, 0], u[:, 0], T)
    v_prime = augment_batch(crops[:, 1], u[:, 1], T_PRIME)
    return torch.stack([v, v_prime])


# ================================================================================================
# Feeding them fast: image sources, the batch on the device, the loader
# ================================================================================================

# ------------------------------------------------------------------------------------------------
# Image sources: an image folder or a named torchvision dataset
# ------------------------------------------------------------------------------------------------
# A source has len(), labels (one int per image; -1: none), classes, name(i), read(indices) (a
# list of file bytes, or of decoded images, or one (B, 3, H, W) uint8 tensor), load(i) (one image
# decoded, uint8 (3, H, W)) and shared_size ((H, W) if every image has that size, else None).
NAMED_DATASETS = ('cifar10', 'cifar100', 'stl10', 'fashionmnist')
MAX_IN_MEMORY = 200_000  # images held on the device: CIFAR, STL-10 (105k at 96 px: 2.9 GB)


def decode(data):
    """File bytes (uint8 1-D) -> uint8 image (3, H, W): libjpeg-turbo / libpng through
    torchvision (faster than PIL, the same pixels), PIL for the formats it lacks (BMP, TIFF)."""
    try:
        return torchvision.io.decode_image(data, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError:
        from PIL import Image
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return torchvision.transforms.functional.pil_to_tensor(image.convert('RGB'))


def empty_to_send(like, shape):
    """An empty tensor of this shape, of like's dtype and device, for what the loader sends:
    in a worker process, in shared memory from the start (as torch's default_collate), so that
    sending it copies nothing (the copy took 0.5 ms per ImageNet-size photo: bench/RESULTS.md;
    none measurable for the smaller crops)."""
    if like.device.type != 'cpu' or torch.utils.data.get_worker_info() is None:
        return like.new_empty(shape)
    storage = like.untyped_storage()._new_shared(math.prod(shape) * like.itemsize)
    return like.new_empty(0).set_(storage, 0, shape)


class Photos(NamedTuple):
    """Decoded images of different sizes in one tensor, so that a batch of them travels as one:
    pixels (N, C) uint8, each image's H x W pixel rows in turn (channels last, as decoded), and
    shapes (B, 2), their (H, W), which stay on the host."""
    pixels: torch.Tensor
    shapes: torch.Tensor

    @classmethod
    def of(cls, images):
        """A list of uint8 (C, H, W) -> Photos (one copy: decoded images are channels last)."""
        shapes = torch.tensor([image.shape[1:] for image in images])
        pixels = empty_to_send(images[0], (int(shapes.prod(1).sum()), images[0].shape[0]))
        return cls(torch.cat([image.permute(1, 2, 0).reshape(-1, image.shape[0])
                              for image in images], out=pixels), shapes)

    def to(self, device, non_blocking=False):
        return Photos(self.pixels.to(device, non_blocking=non_blocking), self.shapes)

    def images(self):
        """-> the list of uint8 (C, H, W), views of pixels."""
        return [rows.view(h, w, -1).permute(2, 0, 1) for rows, (h, w) in zip(
            self.pixels.split(self.shapes.prod(1).tolist()), self.shapes.tolist())]


class FolderImages:
    """Images of a <root>/<class>/<image> folder, read as file bytes."""

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

    def read(self, indices):
        return [torchvision.io.read_file(self.samples[i][0])
                for i in torch.as_tensor(indices).tolist()]

    def load(self, i):
        return decode(self.read([i])[0])

    @functools.cached_property
    def shared_size(self):
        """(H, W) if every image has that one size, read from the files' headers (seconds for
        50,000 images; it stops at the second size it meets), else None. Folders of more than
        MAX_IN_MEMORY images are not read (None). Unreadable files are left to the decoder."""
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


class ArrayImages:
    """Images held in memory as uint8 (N, 3, H, W) with integer labels (on any device)."""

    def __init__(self, data, labels, classes):
        self.data, self.labels, self.classes = data, [int(y) for y in labels], classes
        self.shared_size = tuple(data.shape[-2:])

    def __len__(self):
        return len(self.data)

    def name(self, i):
        return f'image {i}'

    def read(self, indices):
        return self.data[torch.as_tensor(indices, device=self.data.device)]

    def load(self, i):
        return self.data[i]


class Subset:
    """Some of an image source's images, by index."""

    def __init__(self, images, indices):
        self.images, self.indices = images, list(indices)
        self.labels = [images.labels[i] for i in self.indices]
        self.classes = images.classes

    def __len__(self):
        return len(self.indices)

    @property
    def shared_size(self):
        return self.images.shared_size

    def name(self, i):
        return self.images.name(self.indices[i])

    def read(self, indices):
        return self.images.read([self.indices[i] for i in torch.as_tensor(indices).tolist()])

    def load(self, i):
        return self.images.load(self.indices[i])


def random_indices(n, k, seed):
    """k of range(n), drawn by a seeded permutation, in increasing order (quick-run subsets)."""
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


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
            if data.dim() == 3:  # grayscale (Fashion-MNIST), tiled to three channels
                data = data[:, None].expand(-1, 3, -1, -1)
            else:
                data = data.permute(0, 3, 1, 2)
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


def default_image_size(images):
    """The paper's 224 (with the ImageNet stem), except for a dataset whose images all share one
    smaller size (CIFAR's 32 px, STL-10's 96): its native size (the small-image stem at <= 64 px).
    Image folders of photos of varied sizes, and folders too large to check, train at 224."""
    size = images.shared_size
    return min(224, *size) if size else 224


def images_in_memory(images):
    """All images as one uint8 tensor (N, 3, H, W) if they fit (a named dataset, or a folder of
    at most MAX_IN_MEMORY images of one size and 8 GiB in all), else None. An unreadable image
    is replaced by the next readable one, with a warning."""
    if isinstance(images, ArrayImages):
        return images.data
    size = images.shared_size
    if size is None or len(images) * 3 * size[0] * size[1] > 8 * 2 ** 30:  # 8 GiB
        return None
    data = torch.empty(len(images), 3, *size, dtype=torch.uint8)
    for i in range(len(images)):
        for j in range(i, i + 100):
            try:
                data[i] = images.load(j % len(images))
                break
            except Exception as e:
                if isinstance(e, RuntimeError) and 'shape' in str(e):
                    return None  # a header that disagrees with its pixels
                warn_unreadable(images.name(j % len(images)), e)
        else:
            raise UserError(f'100 unreadable images in a row from {images.name(i)}')
    return data


def warn_unreadable(name, error):
    print(f'warning: skipping unreadable image {name}: {str(error).strip()[:200]}',
          file=sys.stderr, flush=True)

# ------------------------------------------------------------------------------------------------
# Every crop of a batch at once, on the device: the same resampling, batched
# ------------------------------------------------------------------------------------------------


def _crops_at_once(photos, boxes, size, dtype=torch.uint8, chunk=2 ** 24):
    """crops_of for every crop of a batch at once (GPUs: a few dozen kernels a run of crops,
    not a dozen a crop): the same two passes of four taps, as gathers of whole pixels from the
    photos' pixel rows (N, C). Pass 1 makes each crop's S output rows at its own width w (S w
    pixels a crop, the crops one after another), pass 2 their S columns. Crops go in runs of at
    most `chunk` pass-1 pixels (2^24: about 1 GB of temporaries). boxes and photos.shapes are
    on the host, so no size waits for the device."""
    b, v = boxes.shape[:2]
    boxes = boxes.reshape(-1, 4)
    areas = photos.shapes.prod(1)
    first = (areas.cumsum(0) - areas).repeat_interleave(v)      # each crop's image: first pixel,
    width = photos.shapes[:, 1].repeat_interleave(v)            # and width
    ends = (boxes[:, 3] * size).cumsum(0)                       # pass-1 pixels up to each crop
    out = torch.empty(b * v, size, size, photos.pixels.shape[1], dtype=dtype,
                      device=photos.pixels.device)
    start = 0
    while start < len(boxes):
        done = ends[start - 1] if start else 0
        end = max(start + 1, int(torch.searchsorted(ends, done + chunk, right=True)))
        k = slice(start, end)
        corner = first[k] + boxes[k, 0] * width[k] + boxes[k, 1]
        out[k] = _resample_at_once(photos.pixels, corner, width[k], boxes[k, 2:], size, dtype)
        start = end
    return out.permute(0, 3, 1, 2).contiguous().view(b, v, -1, size, size)  # (as crops_of's)


def _resample_at_once(pixels, corner, width, sizes, size, dtype):
    """The two passes for K crops of sizes (K, 2) (h, w) whose top-left pixel is
    pixels[corner] (K,), in images `width` (K,) pixels wide; all on the host -> (K, S, S, C) of
    dtype on the pixels' device."""
    device, k, n = pixels.device, len(sizes), int(sizes[:, 1].sum()) * size
    corner, width, h, w = (t.to(device, non_blocking=True) for t in (corner, width, *sizes.T))
    ry, wy = _bicubic_taps(h, size)                                     # (K, 4, S)
    rx, wx = _bicubic_taps(w, size)
    # pass 1: pixel x of output row i of crop k (row r = k S + i, w_k pixels): the sum over
    # the taps a of wy[k, a, i] * pixels[corner_k + ry[k, a, i] * width_k + x]
    length = w.repeat_interleave(size)                                  # (K S,)
    row_first = length.cumsum(0) - length                               # where row r starts
    r = torch.arange(k * size, device=device).repeat_interleave(length, output_size=n)
    x = torch.arange(n, device=device) - row_first[r]                   # (n,)
    tap_first = (corner[:, None, None] + ry * width[:, None, None]).transpose(1, 2).reshape(-1, 4)
    wy = wy.transpose(1, 2).reshape(-1, 4)                              # (K S, 4)
    rows = None
    for a in range(4):  # (acc + w x fused, as embedding_bag sums: the same floats)
        term = pixels.index_select(0, tap_first[r, a] + x).float()
        rows = wy[r, a, None] * term if rows is None else rows.addcmul_(wy[r, a, None], term)
    # pass 2: pixel j of row r = k S + i: the sum over the taps a of
    # wx[k, a, j] * rows[row_first[r] + rx[k, a, j]]
    out = None
    for a in range(4):
        term = rows.index_select(0, (row_first.view(k, size, 1) + rx[:, a, None]).view(-1))
        term, weight = term.view(k, size, size, -1), wx[:, a, None, :, None]
        out = weight * term if out is None else out.addcmul_(weight, term)
    return _rounded(out, dtype)


def _bicubic_matrix(start, length, in_size, size):
    """The same resampling as (B, size, in_size) matrices for rows [start, start + length) of
    same-size images, for the batched products of resized_crops."""
    taps, weight = _bicubic_taps(length, size)
    matrix = torch.zeros(len(start), size, in_size, device=start.device, dtype=torch.float32)
    return matrix.scatter_add_(2, (taps + start[:, None, None]).transpose(1, 2),
                               weight.transpose(1, 2))


def resized_crops(images, boxes, size, dtype=torch.uint8):
    """Random resized crops of a batch of same-size uint8 images (B, C, H, W) with boxes (B, 4)
    -> (B, C, S, S) of dtype, in two batched matrix products (rows, then columns).

    DEVIATION: training crops are rounded to uint8 (error <= 0.5/255), so that loaders ship 4x
    fewer bytes; the official pipeline keeps the resized crop in float, as evaluation crops
    are kept here (dtype float32)."""
    top, left, h, w = boxes.to(images.device, non_blocking=True).unbind(1)
    rows = _bicubic_matrix(top, h, images.shape[-2], size)              # (B, S, H)
    cols = _bicubic_matrix(left, w, images.shape[-1], size)             # (B, S, W)
    out = rows[:, None] @ images.float() @ cols[:, None].transpose(-1, -2)
    return _rounded(out, dtype)

# ------------------------------------------------------------------------------------------------
# The pipeline: image files -> batches of views on the training device
# ------------------------------------------------------------------------------------------------
# Four stages, each a function of a batch (data, u, labels, indices):
#   read    the images' file bytes, or the images themselves when they are held in memory
#   decode  file bytes -> uint8 images (3, H, W); a batch neighbour stands in for an unreadable one
#           (sent by the loader as Photos, one tensor, when the device crops)
#   crop    -> crops (b, V, 3, S, S): random resized crops (the geometric half of T and T'),
#           rounded to uint8 so that 4x fewer bytes travel to the device, or centre crops for
#           evaluation, kept in float32 as the official code's
#   views   -> normalised float views (V, b, 3, S, S): T and T' (mode 'byol'), a random flip
#           (mode 'train': linear evaluation and fine-tuning) or nothing (mode 'eval')
# The stages before `on_device` run in the data loader (its worker processes, if any); the rest
# on the training device, over the whole batch. Where each runs changes the speed, not the views.
STAGES = ('read', 'decode', 'crop', 'views')
# on_device, the first stage run on the device -> where the stages run: None, the loader's
# workers make the views (CPUs: they overlap the training step); 'views', the default on GPUs;
# 'crop', --on-device crop; 'read', a dataset held in memory on the device (no workers).
# (A worker cannot send the file bytes that read returns: they are mapped from the file.)
PLACEMENTS = {None: 'decoded, cropped and augmented by the loader',
              'views': 'decoded and cropped by the loader, augmented there',
              'crop': 'decoded by the loader, cropped and augmented there',
              'read': 'held in memory, cropped and augmented there'}
MODES = {'byol': 2, 'train': 1, 'eval': 1}  # mode -> views per image


def affinity_mask():
    """The CPU cores this process may run on (taskset, SLURM's --cpus-per-task, torchrun's
    --numa-binding)."""
    if hasattr(os, 'sched_getaffinity'):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))


def cpu_quota():
    """A container's CPU quota in cores (cgroup v2 cpu.max), or None."""
    try:
        quota, period = Path('/sys/fs/cgroup/cpu.max').read_text().split()
        if quota != 'max':
            return max(1, int(int(quota) / int(period)))
    except (OSError, ValueError):
        pass
    return None


def node_affinity_masks(mask):
    """The affinity masks of this node's training processes (this one's among them), gathered
    over torch.distributed; without it, this process's alone."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mask]
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (socket.gethostname(), sorted(mask)))
    return [set(cores) for host, cores in everyone if host == socket.gethostname()]


def default_workers():
    """Loader workers per training process: its share of the cores, less one for the training
    loop itself. The cores of its affinity mask are shared by the node's processes whose masks
    overlap it: every process when each may use the whole node (or SLURM's one task per node),
    those of one NUMA node under torchrun --numa-binding=node, none under exclusive binding. A
    container's CPU quota is shared by all the node's processes."""
    mask = affinity_mask()
    masks = node_affinity_masks(mask)
    sharing = sum(1 for other in masks if other & mask)
    cores = len(mask) // sharing
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, quota // len(masks))
    return max(0, cores - 1)


class Pipeline(torch.utils.data.Dataset):
    """The stages for one image source, crop size and mode; a Dataset whose items are keys
    (epoch, index) and whose batches run the loader's stages (__getitems__)."""

    def __init__(self, images, size, mode, seed=0, device=torch.device('cpu'), on_device=None,
                 center_fraction=0.875, dtype=torch.float32):
        self.images, self.size, self.mode, self.seed = images, size, mode, seed
        self.device, self.center_fraction, self.dtype = device, center_fraction, dtype
        if on_device not in PLACEMENTS:
            raise ValueError(f'on_device {on_device!r} is none of {list(PLACEMENTS)}')
        self.split = STAGES.index(on_device) if on_device else len(STAGES)

    def __len__(self):
        return len(self.images)

    def __getitems__(self, keys):
        """The loader's part: keys [(epoch, i), ...] -> the batch after the loader's stages."""
        epochs, indices = (torch.tensor(k) for k in zip(*keys))
        u = uniforms(self.seed, epochs, indices, MODES[self.mode])  # (b, V, N_SLOTS)
        labels = torch.tensor([self.images.labels[i] for i in indices.tolist()])
        data, *rest = self.run((None, u, labels, indices), STAGES[:self.split])
        if isinstance(data, list) and self.split == STAGES.index('crop'):
            data = Photos.of(data)  # decoded images travel as one tensor
        return data, *rest

    def finish(self, batch):
        """The device's part -> (views (V, b, 3, S, S), labels (b,), indices (b,)) there. The
        uniform numbers u stay on the host, where the crop boxes and the jitter's groups are
        computed without waiting for the device; the views send them there."""
        data, u, *rest = batch
        moves = torch.is_tensor(data) or isinstance(data, Photos)
        batch = (data.to(self.device, non_blocking=True) if moves else data, u,
                 *(t.to(self.device, non_blocking=True) for t in rest))
        views, _, labels, indices = self.run(batch, STAGES[self.split:])
        return views, labels, indices

    def run(self, batch, stages):
        for stage in stages:
            batch = (getattr(self, stage)(*batch), *batch[1:])
        return batch

    def read(self, data, u, labels, indices):
        return self.images.read(indices)

    def decode(self, data, u, labels, indices):
        if torch.is_tensor(data):  # held in memory: decoded already
            return data
        images = []
        for k, item in enumerate(data):
            try:
                images.append(decode(item))
            except Exception as e:
                warn_unreadable(self.images.name(indices[k].item()), e)
                images.append(None)
        readable = [image for image in images if image is not None]
        if not readable:
            raise UserError(f'a batch of {len(images)} unreadable images, from '
                            f'{self.images.name(indices[0].item())}')
        return [image if image is not None else readable[0] for image in images]

    def crop(self, data, u, labels, indices):
        if torch.is_tensor(data):  # (b, 3, H, W), one size: every crop in batched products
            heights, widths = data.shape[-2:]
        elif isinstance(data, Photos):
            heights, widths = data.shapes.T
        else:
            heights, widths = torch.tensor([image.shape[-2:] for image in data]).T
        if self.mode == 'eval':
            boxes = center_crop_boxes(heights, widths, len(u), self.center_fraction)[:, None]
        else:
            boxes = torch.stack([crop_boxes(u[:, v], heights, widths, (T, T_PRIME)[v])
                                 for v in range(u.shape[1])], dim=1)            # (b, V, 4)
        # Evaluation crops stay in float, as the official code's; training crops are rounded
        # to uint8 (resized_crops), 4x fewer bytes to send
        dtype = torch.float32 if self.mode == 'eval' else torch.uint8
        if torch.is_tensor(data):
            return torch.stack([resized_crops(data, boxes[:, v], self.size, dtype)
                                for v in range(boxes.shape[1])], dim=1)
        return crops_of(data, boxes, self.size, dtype)

    def views(self, crops, u, labels, indices):
        # u from the host: the colour jitter reads its groups' sizes there, with no wait for
        # the device (augment_batch moves u there for the rest)
        if self.mode == 'byol':
            views = two_views(crops, u)
        elif self.mode == 'train':
            views = eval_batch(crops[:, 0], u[:, 0].to(crops.device, non_blocking=True))[None]
        else:
            views = eval_batch(crops[:, 0])[None]
        return views.to(self.dtype)  # the cast autocast would make at the first layer


class EpochSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index) and can start mid-epoch, so that a resumed
    run sees exactly the batches the interrupted one would have. With drop_last, batch k of
    the global batch B holds permutation[kB:(k+1)B] whatever the number of processes."""

    def __init__(self, dataset, shuffle=True, seed=0):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(dataset, num_replicas=dist.get_world_size() if distributed else 1,
                         rank=dist.get_rank() if distributed else 0, shuffle=shuffle, seed=seed,
                         drop_last=shuffle)
        self.skip = 0

    def set_epoch(self, epoch, skip=0):
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self):
        return self.num_samples - self.skip


def _batch_as_is(batch):  # the loader's collate: __getitems__ made the batch already
    return batch


class Batches:
    """Batches of views: for views, labels, indices in Batches(...), on the training device.
    Training batches (shuffle) are drawn by an EpochSampler: set_epoch(epoch, skip_batches)
    before each epoch. batch_size is per process."""

    def __init__(self, pipeline, batch_size, workers=0, shuffle=True):
        self.pipeline, self.batch_size = pipeline, batch_size
        self.sampler = EpochSampler(pipeline, shuffle, pipeline.seed)
        workers, prefetch = self.shared_memory_budget(workers)
        self.loader = torch.utils.data.DataLoader(
            pipeline, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_batch_as_is, pin_memory=pipeline.device.type == 'cuda',
            drop_last=shuffle, persistent_workers=workers > 0, prefetch_factor=prefetch)

    def shared_memory_budget(self, workers, prefetch=2):
        """-> (workers, prefetch_factor) whose batches in flight (workers x prefetch, passed
        through /dev/shm) fill at most this process's share of half of it (the node's training
        processes, torchrun's LOCAL_WORLD_SIZE, share one /dev/shm): a container's small
        /dev/shm (Docker's 64 MB) otherwise kills the loader with a bus error. uint8 crops
        (GPUs) take 4x less than float views. Stops with one line if not even one batch fits."""
        if workers == 0:
            return 0, None
        p = self.pipeline
        if p.split == len(STAGES):  # float views
            item = p.dtype.itemsize
        elif p.mode == 'eval':  # float32 evaluation crops
            item = 4
        else:  # uint8 crops
            item = 1
        batch = self.batch_size * MODES[p.mode] * 3 * p.size ** 2 * item
        if p.split == STAGES.index('crop'):  # whole photos (ImageNet's: 470 x 390 on average)
            batch = self.batch_size * 3 * max(p.size ** 2, 470 * 390)
        try:
            shm = os.statvfs('/dev/shm')
        except OSError:
            return workers, prefetch
        processes = int(os.environ.get('LOCAL_WORLD_SIZE', 1))
        budget = shm.f_bavail * shm.f_frsize // 2 // processes
        fits = budget // batch
        if fits == 0:
            raise UserError(f'/dev/shm has {2 * processes * budget / 2**20:.0f} MB free, and '
                            f'one batch of {self.batch_size} in flight takes {batch / 2**20:.0f} '
                            f'MB of this process\'s share ({budget / 2**20:.0f} MB, with '
                            f'{processes} on the node): give the container more (docker run '
                            '--shm-size 16g), use fewer images per process, or --workers 0')
        if workers * prefetch <= fits:
            return workers, prefetch
        print(f'note: /dev/shm has room for {fits} batches in flight of {batch / 2**20:.0f} MB '
              f'in this process\'s share: {min(workers, fits)} workers, 1 batch each '
              '(docker run --shm-size 16g gives more)', file=sys.stderr, flush=True)
        return min(workers, fits), 1

    def set_epoch(self, epoch, skip_batches=0):
        self.sampler.set_epoch(epoch, skip_batches * self.batch_size)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        return (self.pipeline.finish(batch) for batch in self.loader)


def batches(images, size, batch_size, mode, seed=0, device=torch.device('cpu'), workers=0,
            in_memory=False, on_device=None, center_fraction=0.875, dtype=torch.float32):
    """Batches of views of an image source -> (Batches, where its stages run, in words).

    Where the stages run: a dataset held in memory (in_memory: True, or None for where it fits,
    images_in_memory) is cropped and augmented on the device, whole batches at once, with no
    loader workers. Image folders read from disk go through the loader's workers up to the
    stage on_device, the first run on the device: 'views' (the default on GPUs: the workers
    decode and crop), 'crop' (the workers only decode). On a CPU (on_device None) the workers
    make the views too: they then overlap with the training step."""
    data = images_in_memory(images) if in_memory is not False else None
    if in_memory and data is None:
        raise UserError(f'--data-on-device needs at most {MAX_IN_MEMORY} images of one size')
    if on_device and (data is not None or not isinstance(images, FolderImages)):
        raise UserError(f'--on-device {on_device} is for image folders read from disk; '
                        'add --no-data-on-device, or drop --on-device')
    if data is not None:
        images = ArrayImages(data.to(device), images.labels, images.classes)
        on_device, workers = 'read', 0
    elif on_device is None and device.type == 'cuda':
        on_device = 'views'
    pipeline = Pipeline(images, size, mode, seed, device, on_device, center_fraction, dtype)
    return Batches(pipeline, batch_size, workers, shuffle=mode != 'eval'), \
        f'{len(images)} images on {device.type}, {PLACEMENTS[on_device]}'

# ------------------------------------------------------------------------------------------------
# The command line: a picture of T and T' (python augment.py IMAGE --out views.png)
# ------------------------------------------------------------------------------------------------


def views_grid(image, n=8, size=None, seed=0):
    """One uint8 image (3, H, W) -> a grid (3, h, w) in [0, 1] of two rows: its centred square,
    then n views under T (top) and under T' (bottom), S x S each (default: the shorter side, at
    most 224). Both rows use the same uniform numbers, so they differ only where T and T' do:
    blur (always in T, 10% in T') and solarize (only in T', 20%)."""
    height, width = image.shape[-2:]
    size = size or min(224, height, width)
    u = uniforms(seed, 0, torch.arange(n), n_views=1)[:, 0]                      # (n, N_SLOTS)
    boxes = torch.cat([center_crop_boxes(height, width, 1, fraction=1.0),
                       crop_boxes(u, height, width)])                            # (1 + n, 4)
    crops = crops_of([image], boxes[None], size)[0]                    # (1 + n, 3, S, S) uint8
    mean, std = constant(MEAN, image.device), constant(STD, image.device)
    rows = [torch.cat([crops[:1] / 255, augment_batch(crops[1:], u, view) * std + mean])
            for view in (T, T_PRIME)]                                  # views un-normalised
    return torchvision.utils.make_grid(torch.cat(rows).clamp(0, 1), nrow=n + 1, pad_value=1)


def main(argv=None):
    p = argparse.ArgumentParser(prog='augment.py', description='Draw one image under T and T\' '
                                '(paper Table 6) into a PNG grid: top row T, bottom row T\'.')
    p.add_argument('image', help='a JPEG or PNG (any size)')
    p.add_argument('--out', default='views.png', help='the PNG to write (default: views.png)')
    p.add_argument('--n', type=int, default=8, help='views per row (default: 8)')
    p.add_argument('--size', type=int, help='view size (default: the shorter side, <= 224)')
    p.add_argument('--seed', type=int, default=0, help='seeds the views')
    args = p.parse_args(argv)
    try:
        if not Path(args.image).is_file():
            raise UserError(f'{args.image}: no such file')
        try:
            image = decode(torchvision.io.read_file(args.image))
        except Exception as e:
            raise UserError(f'cannot read image {args.image} ({str(e).strip()[:150]})') from None
        grid = views_grid(image, args.n, args.size, args.seed)
        try:
            torchvision.io.write_png((grid * 255).round().to(torch.uint8), args.out)
        except Exception as e:
            raise UserError(f'cannot write {args.out} ({str(e).strip()[:150]})') from None
    except UserError as e:
        print(f'augment.py: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'{args.out}: the original, then {args.n} views under T (top) and T\' (bottom), '
          f'{grid.shape[-1]}x{grid.shape[-2]} px')


if __name__ == '__main__':
    main()

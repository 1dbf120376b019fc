"""augment.py: BYOL's two image augmentation distributions T and T' (paper section 3.3, appendix B).

Each view of an image is made in two halves:

  1. in the data loader (CPU workers): decode, then a random resized crop to S x S (bicubic), kept
     as uint8 so that 4x fewer bytes travel to the device;
  2. on the training device, over the whole batch at once: flip, colour jitter (random order per
     image), grayscale, Gaussian blur, solarize, then normalisation. Every op is a batched tensor op
     whose random parameters are per image, so the same code runs on a CPU or over a GPU batch.

All randomness comes from `uniforms(seed, epoch, index)`: a counter-based hash of the image's index,
so an image's augmentation is the same whatever the number of processes, workers or batch
composition, and on any device. Each op maps its uniform numbers to its range in plain view.

The ops follow the official code, not torchvision's ColorJitter (SPEC.md section 3): brightness is
additive, contrast is around each channel's own mean, saturation and hue are shifts in HSV, values
are clipped to [0, 1] after every op, grayscale has its own gate and the blur kernel is 10% of the
image side (23 taps at 224 px, 3 at 32 px).

Usage (what byol.py does):
    u = uniforms(seed, epoch, indices, n_views=2)               # (B, 2, N_SLOTS), any device
    crop = resized_crop(image, crop_box(u[i, 0], H, W), 224)    # loader, per image: uint8 (3, S, S)
    v1 = augment_batch(crops1, u[:, 0], T)                      # device, per batch: normalised
    v2 = augment_batch(crops2, u[:, 1], T_PRIME)
"""
import math

import torch
import torch.nn.functional as F

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
# Crops (in the data loader, one image at a time)
# ------------------------------------------------------------------------------------------------


def crop_boxes(u, heights, widths, view=T):
    """Random resized crop boxes (B, 4) int64 rows (top, left, h, w) from one view's uniforms
    u (B, N_SLOTS), for images of the given heights and widths (B,) (or one shared size).

    As the official code: a single draw, no retry (torchvision retries 10 times then falls back to
    a centre crop): area A = U[0.08, 1] * H * W, ratio r log-uniform in [3/4, 4/3],
    w = round(sqrt(A r)), h = round(sqrt(A / r)), clamped to the image, uniform offset.
    Computed in float64, so the loader (one image at a time) and the device (whole batch) agree."""
    u = u.double()
    height = torch.as_tensor(heights, dtype=torch.float64, device=u.device)
    width = torch.as_tensor(widths, dtype=torch.float64, device=u.device)
    area = _between(u[:, SLOT['crop_area']], view['crop_area']) * height * width
    ratio = torch.exp(_between(u[:, SLOT['crop_ratio']],
                               [math.log(r) for r in view['crop_ratio']]))
    w = torch.minimum(width, torch.sqrt(area * ratio).round().clamp_min(1))
    h = torch.minimum(height, torch.sqrt(area / ratio).round().clamp_min(1))
    top = torch.minimum(height - h, (u[:, SLOT['crop_y']] * (height - h + 1)).floor())
    left = torch.minimum(width - w, (u[:, SLOT['crop_x']] * (width - w + 1)).floor())
    return torch.stack([top, left, h, w], dim=1).long()


def crop_box(u, height, width, view=T):
    """crop_boxes for one image: u (N_SLOTS,) -> (top, left, h, w) ints."""
    return tuple(crop_boxes(u[None], height, width, view)[0].tolist())


def center_crop_box(height, width, fraction=0.875):
    """Evaluation crop: the centred square of side 0.875 min(H, W) (SPEC.md section 3, 'Eval crop';
    resized to 224 this is the usual resize 256 + centre crop 224)."""
    side = max(1, round(fraction * min(height, width)))
    return (height - side) // 2, (width - side) // 2, side, side


def resized_crop(image, box, size):
    """Crop box (top, left, h, w) out of a uint8 image (C, H, W) and resize it to size x size as
    TF's bicubic resize in the official pipeline -> uint8."""
    return crops_of([image], torch.tensor([[box]]), size)[0, 0]


def crops_of(images, boxes, size):
    """Resized crops of images of any sizes (a list of B uint8 (C, H, W)) with boxes (B, V, 4)
    -> uint8 (B, V, C, S, S): the resampling matrices of all B x V crops are made at once, then
    each crop is resized by two small matrix products."""
    b, v, device = *boxes.shape[:2], images[0].device
    top, left, h, w = boxes.reshape(-1, 4).to(device).unbind(1)
    rows = _bicubic_matrix(torch.zeros_like(top), h, int(h.max()), size)     # (BV, S, h_max)
    cols = _bicubic_matrix(torch.zeros_like(left), w, int(w.max()), size)    # (BV, S, w_max)
    out = torch.empty(b * v, images[0].shape[0], size, size, dtype=torch.uint8, device=device)
    for k, (t, l, hk, wk) in enumerate(boxes.reshape(-1, 4).tolist()):
        crop = images[k // v][:, t:t + hk, l:l + wk].float()
        out[k] = (rows[k, :, :hk] @ crop @ cols[k, :, :wk].T).round_().clamp_(0, 255)
    return out.view(b, v, *out.shape[1:])


def _bicubic_matrix(start, length, in_size, size):
    """(B, size, in_size) matrices that resample rows [start, start + length) of each image to
    `size` rows as TF's bicubic resize (tf.image.resize, antialias off, as the official code):
    half-pixel centres x = (j + 0.5) length / size - 0.5; Keys' cubic convolution (a = -0.5) on
    the taps floor(x) - 1 .. floor(x) + 2, with x's fraction rounded to 1/1024 (TF's table of
    coefficients); taps outside the crop get weight 0 and the others are renormalised to sum 1.
    In float32, as TF computes the sample positions."""
    j = torch.arange(size, device=start.device, dtype=torch.float32)
    x = (j[None] + 0.5) * (length[:, None].float() / size) - 0.5        # (B, size)
    base = x.floor()
    t = ((x - base) * 1024).round()[..., None].double() / 1024          # (B, size, 1)
    offsets = torch.arange(-1, 3, device=start.device)                  # the four taps
    d = (t - offsets).abs()                                             # distances to them
    a = -0.5
    weight = torch.where(d <= 1, ((a + 2) * d - (a + 3)) * d * d + 1,
                         ((a * d - 5 * a) * d + 8 * a) * d - 4 * a)     # (B, size, 4)
    taps = base[..., None].long() + offsets
    weight = weight * ((taps >= 0) & (taps < length[:, None, None]))
    weight = weight / weight.sum(dim=-1, keepdim=True)
    taps = torch.minimum(taps.clamp_min(0), length[:, None, None] - 1) + start[:, None, None]
    matrix = torch.zeros(len(start), size, in_size, device=start.device, dtype=torch.float64)
    return matrix.scatter_add_(2, taps, weight).float()


def resized_crops(images, boxes, size):
    """Random resized crops of a batch of same-size uint8 images (B, C, H, W) with boxes (B, 4)
    -> uint8 (B, C, S, S), in two batched matrix products (rows, then columns).

    DEVIATION: the crops are rounded to uint8 (error <= 0.5/255), so that loaders ship 4x fewer
    bytes; the official pipeline keeps the resized crop in float."""
    top, left, h, w = boxes.to(images.device).unbind(1)
    rows = _bicubic_matrix(top, h, images.shape[-2], size)              # (B, S, H)
    cols = _bicubic_matrix(left, w, images.shape[-1], size)             # (B, S, W)
    out = rows[:, None] @ images.float() @ cols[:, None].transpose(-1, -2)
    return out.round_().clamp_(0, 255).to(torch.uint8)


# ------------------------------------------------------------------------------------------------
# Photometric ops (on the device, batched; x is (B, 3, H, W) in [0, 1], parameters are (B,))
# ------------------------------------------------------------------------------------------------


def _per_image(values):
    return values.view(-1, 1, 1, 1)


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
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    saturation = torch.where(value > 0, chroma / value.clamp_min(1e-12), 0.0)
    c = chroma.clamp_min(1e-12)
    hue = torch.where(value == r, (g - b) / c,
                      torch.where(value == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    hue = torch.where(chroma > 0, torch.remainder(hue / 6.0, 1.0), 0.0)
    return hue, saturation, value


def hsv_to_rgb(hue, saturation, value):
    """Inverse of rgb_to_hsv: channel_n = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6,
    with n = 5, 3, 1 for R, G, B."""
    n = torch.tensor([5.0, 3.0, 1.0], device=hue.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue[:, None], 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp(0, 1)
    return value[:, None] - (value * saturation)[:, None] * weight


def adjust_saturation_hue(x, factor, shift):
    """HSV saturation s <- clip(s * factor) and hue h <- (h + shift) mod 1, in one HSV round trip
    (TF's adjust_saturation and adjust_hue; each alone when the other is the identity)."""
    hue, saturation, value = rgb_to_hsv(x)
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    saturation = (saturation * factor.view(-1, 1, 1)).clamp(0, 1)
    return hsv_to_rgb(hue, saturation, value).clamp(0, 1)


def color_jitter(x, u, view):
    """Brightness, contrast, saturation and hue, in a random order per image, all gated by one coin
    (p = jitter_p). At each of the four positions every image runs the op it drew for that
    position; the other ops get identity parameters, which keeps the batch free of masks."""
    on = u[:, SLOT['jitter']] < view['jitter_p']
    delta = (2 * u[:, SLOT['brightness']] - 1) * view['brightness']
    contrast = 1 + (2 * u[:, SLOT['contrast']] - 1) * view['contrast']
    saturation = 1 + (2 * u[:, SLOT['saturation']] - 1) * view['saturation']
    hue = (2 * u[:, SLOT['hue']] - 1) * view['hue']
    first = SLOT['order_brightness']
    order = u[:, first:first + 4].argsort(dim=1)  # order[b, k]: the op image b runs k-th
    for k in range(4):
        op = torch.where(on, order[:, k], -1)     # 0 brightness, 1 contrast, 2 saturation, 3 hue
        x = adjust_brightness(x, torch.where(op == 0, delta, 0.0))
        x = adjust_contrast(x, torch.where(op == 1, contrast, 1.0))
        x = adjust_saturation_hue(x, torch.where(op == 2, saturation, 1.0),
                                  torch.where(op == 3, hue, 0.0))
    return x


def grayscale(x):
    """0.2989 R + 0.5870 G + 0.1140 B, tiled to three channels."""
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True).expand_as(x)


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
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def flip(x, u, p=0.5):
    """Horizontal flip of the images whose flip uniform is below p."""
    return torch.where(_per_image(u[:, SLOT['flip']] < p), x.flip(-1), x)


def augment_batch(crops, u, view):
    """The photometric half of T or T' on a batch of uint8 crops (B, 3, S, S), with uniforms
    u (B, N_SLOTS) -> normalised float32 views. Order as the official code: flip, jitter,
    grayscale, blur, solarize, clip, normalise."""
    x = crops.float() / 255
    x = flip(x, u, view['flip_p'])
    x = color_jitter(x, u, view)
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

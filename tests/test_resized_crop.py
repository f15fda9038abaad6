"""fastmae.ops.resized_crop on every backend (torchvision through the torch math, C++, Triton under
the interpreter) against the resampling the op specifies, written here independently: torch's
uint8 antialiased path (PIL's ImagingResample): weights normalised in double, quantised to fixed
point (the most bits, up to 22, that keep twice an axis's largest weight below 2^15), a horizontal
pass whose integer sums are rounded half up and clamped to uint8, then the vertical pass, likewise;
and against ``resized_crop_ref`` (torchvision's uint8 pipeline, which that truth reproduces bitwise).

Tolerance: every backend within one grey level (the op's pixels before normalisation) of both, plus
the output dtype's rounding, with at most 5% of the pixels off by a level (MAX_SHARE_OFF: a
systematic rounding error stays within one level but puts far more off); the torch and C++
backends bitwise equal to the reference in every dtype (the C++ kernel computes the same integer
sums and the reference's fp32 normalisation).
Inputs are uint8 noise (every tap matters): odd sizes (1x1, 7x13, 37x53, 300x211), boxes touching
the borders, the whole image, a single pixel, upscaling and downscaling (and one of each on the two
axes), non-square boxes, boxes of the output size (an identity pass), 1 and 3 channels, flips,
bicubic and bilinear, every output dtype; images packed at arbitrary offsets. Outputs are allocated
on NaN-filled memory. Bad inputs are refused with the same ValueError on every backend (the C++
kernel checks them itself, in the same order); ``torch.library.opcheck``; ``torch.compile``
(fullgraph) of the public function on packed inputs; the C++ kernel's instruction-set variants,
streaming stores and thread counts.
"""
import functools
import math
import re

import pytest
import torch
import torch._dynamo
from helpers import (OP_DTYPES, assert_exact, require_cpp, seeded, skip_big_on_triton, skip_triton_tracing,
                     worst_element)

from fastmae import config
from fastmae.ops.resized_crop import PackedImages, pack, resized_crop, resized_crop_ref

MEAN = {1: (0.5,), 3: (0.485, 0.456, 0.406)}
STD = {1: (0.25,), 3: (0.229, 0.224, 0.225)}

# name -> (image sizes (H, W), boxes (top, left, height, width), output size S); flips alternate
# per image (True, False, ...).
CASES = {
    # one pixel upscaled, twice (a flip and not)
    "1x1": ([(1, 1), (1, 1)], [(0, 0, 1, 1), (0, 0, 1, 1)], 5),
    # the whole image (upscaled, non-square), a corner pixel, a box on the bottom-left borders
    "7x13": ([(7, 13), (7, 13), (13, 7)], [(0, 0, 7, 13), (6, 12, 1, 1), (9, 0, 4, 7)], 9),
    # the whole image (down on both axes), a box touching the bottom and right borders, an interior
    # box down on one axis and up on the other
    "37x53": ([(37, 53), (300, 211), (53, 37)], [(0, 0, 37, 53), (17, 5, 283, 206), (10, 3, 30, 5)], 24),
    # boxes of the output size on one axis or both (an identity pass), tall and wide strips
    "identity": ([(40, 50), (40, 50), (300, 211)], [(3, 5, 32, 32), (0, 9, 32, 41), (0, 0, 300, 20)], 32),
    # the training shapes: ImageNet-sized images to 224 (3x+ downscale on one, upscale on another)
    "224": ([(375, 500), (300, 211), (64, 80)], [(30, 50, 300, 400), (0, 0, 300, 211), (10, 0, 50, 80)], 224),
}
TRITON_TOO_BIG = {"224"}  # too slow under the Triton interpreter (the smaller cases cover the kernel)


@pytest.fixture(autouse=True)
def _outputs_on_nan(nan_memory):
    """Every output of every test here is allocated on NaN (conftest's ``nan_memory``)."""


# ============================================================================ the truth
def _filter(x: float, bicubic: bool) -> float:
    x = abs(x)
    if not bicubic:
        return max(0.0, 1.0 - x)
    a = -0.5
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    if x < 2.0:
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return 0.0


@functools.lru_cache(maxsize=None)
def resample_matrix(n: int, S: int, bicubic: bool) -> tuple[torch.Tensor, int]:
    """([S, n] int64 fixed-point weights, their fractional bits): output i = sum_j M[i, j] * input j.
    PIL's antialiased weights (the filter widened by the scale when downscaling, normalised per
    output, in double), quantised as torch quantises them."""
    scale = n / S
    support = (2.0 if bicubic else 1.0) * max(scale, 1.0)
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    rows, w_max = [], 0.0
    for i in range(S):
        center = scale * (i + 0.5)
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n)
        k = [_filter((j + lo - center + 0.5) * invscale, bicubic) for j in range(hi - lo)]
        total = sum(k)
        k = [v / total for v in k] if total != 0 else k
        w_max = max([w_max] + k)
        rows.append((lo, k))
    bits = next((b for b in range(22) if int(0.5 + w_max * (1 << (b + 1))) >= 1 << 15), 22)
    M = torch.zeros(S, n, dtype=torch.int64)
    for i, (lo, k) in enumerate(rows):
        for j, v in enumerate(k):
            v *= 1 << bits
            M[i, lo + j] = int(v - 0.5 if v < 0 else v + 0.5)  # half away from zero
    return M, bits


def _to_uint8(sums: torch.Tensor, bits: int) -> torch.Tensor:
    return ((sums + (1 << (bits - 1))) >> bits).clamp_(0, 255)


def resized_crop_levels(images, boxes, flips, size: int, bicubic: bool) -> torch.Tensor:
    """The op's pixels [N, C, S, S] (int64 grey levels), written from the specification."""
    outs = []
    for img, (top, left, h, w), flip in zip(images, boxes, flips):
        x = img[:, top:top + h, left:left + w].long()
        M, bits = resample_matrix(w, size, bicubic)
        x = _to_uint8(x @ M.T, bits)  # horizontal pass
        M, bits = resample_matrix(h, size, bicubic)
        x = _to_uint8(M @ x, bits)  # vertical pass
        outs.append(x.flip(-1) if flip else x)
    return torch.stack(outs)


# ============================================================================ comparisons
def to_levels(out: torch.Tensor, mean, std) -> torch.Tensor:
    """Normalised outputs back to grey levels, fp64."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    return (out.double() * s + m) * 255.0


# Share of pixels that may be off by a level. A kernel with fp32 weights rounds sums that are a half
# in exact arithmetic (common where a scale is a ratio of small integers) its own way, and its
# weights differ from the fixed-point ones by up to 2^-15: up to 3% of the pixels of these cases
# were off by a level with such a kernel. A systematic error (truncating instead of rounding, a
# shifted filter) puts far more off.
MAX_SHARE_OFF = 0.05
# Backends whose outputs are bitwise the reference's.
EXACT_BACKENDS = ("torch", "cpp")


def assert_levels_close(name, out, want, mean, std, *, max_levels):
    """``out`` (normalised, any output dtype) against ``want`` (grey levels): at most ``max_levels``
    off anywhere and at most MAX_SHARE_OFF of the pixels off by a level (at least 2 pixels allowed),
    beyond the output dtype's rounding (one unit in the last place of the output value)."""
    assert not out.isnan().any(), f"{name}: output elements left unwritten (NaN fill survived)"
    got = to_levels(out, mean, std)
    s = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)
    slack = torch.finfo(out.dtype).eps * out.double().abs() * s * 255.0 + 1e-3
    diff = (got - want).abs()
    assert bool((diff <= max_levels + slack).all()), (
        f"{name}: more than {max_levels} grey levels off; {worst_element(got, want)}")
    off = int((diff > 0.5 + slack).sum())
    allowed = max(2, int(MAX_SHARE_OFF * diff.numel()))
    assert off <= allowed, f"{name}: {off} of {diff.numel()} pixels off by a level (at most {allowed})"


def _images(gen, sizes, C):
    return [torch.randint(0, 256, (C, H, W), dtype=torch.uint8, generator=gen) for H, W in sizes]


def _flips(n):
    return torch.tensor([i % 2 == 0 for i in range(n)])


# ============================================================================ values
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_resized_crop(case, C, interpolation, dtype, backend, request):
    sizes, boxes, S = CASES[case]
    skip_big_on_triton(backend, case in TRITON_TOO_BIG)
    images = _images(seeded(request), sizes, C)
    flips = _flips(len(images))
    bicubic = interpolation == "bicubic"
    out = resized_crop(images, torch.tensor(boxes), flips, S, MEAN[C], STD[C], dtype=dtype,
                       interpolation=interpolation)
    assert out.dtype == dtype and out.shape == (len(images), C, S, S) and out.is_contiguous()

    p = pack(images)
    ref = resized_crop_ref(p.data, p.offsets, p.sizes, torch.tensor(boxes), flips, C, S, list(MEAN[C]),
                           list(STD[C]), dtype, bicubic)
    if backend in EXACT_BACKENDS:
        assert_exact(out, ref, f"{backend} vs torchvision")
    truth = resized_crop_levels(images, boxes, flips.tolist(), S, bicubic)
    assert_levels_close(f"{backend} vs the truth", out, truth, MEAN[C], STD[C], max_levels=1)
    assert_levels_close(f"{backend} vs torchvision", out, to_levels(ref, MEAN[C], STD[C]), MEAN[C], STD[C],
                        max_levels=1)


@pytest.mark.parametrize("case", list(CASES))
def test_resized_crop_reference_is_the_truth(case):
    """resized_crop_ref is torchvision's uint8 pipeline (resized_crop, antialiased), flipped and
    normalised, and its pixels are the truth's, bitwise (so the truth states what torchvision does)."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    sizes, boxes, S = CASES[case]
    for C, bicubic, mode in ((3, True, InterpolationMode.BICUBIC), (1, False, InterpolationMode.BILINEAR)):
        images = _images(torch.Generator().manual_seed(C), sizes, C)
        flips = _flips(len(images))
        p = pack(images)
        ref = resized_crop_ref(p.data, p.offsets, p.sizes, torch.tensor(boxes), flips, C, S, list(MEAN[C]),
                               list(STD[C]), torch.float32, bicubic)
        levels = to_levels(ref, MEAN[C], STD[C])
        assert (levels - levels.round()).abs().max() < 1e-3
        assert_exact(levels.round().long(), resized_crop_levels(images, boxes, flips.tolist(), S, bicubic),
                     f"torchvision vs the truth, {case}, C={C}, bicubic={bicubic}")
        for n, (img, box, flip) in enumerate(zip(images, boxes, flips.tolist())):
            tv = F.resized_crop(img, *box, [S, S], interpolation=mode, antialias=True)
            assert_exact(levels[n].round().to(torch.uint8), tv.flip(-1) if flip else tv, f"torchvision, image {n}")


def test_resized_crop_packed_at_any_offsets(backend, request):
    """Images packed in any order with gaps between them (offsets are positions, not a cumsum):
    the same outputs as the plain packing."""
    gen = seeded(request)
    images = _images(gen, [(7, 13), (37, 53), (9, 4)], 3)
    boxes, flips = torch.tensor([(1, 2, 5, 9), (0, 0, 37, 53), (3, 0, 6, 4)]), _flips(3)
    gap = 5
    order = [2, 0, 1]  # stored in this order, each after `gap` bytes of junk
    parts, offsets, at = [], [0] * 3, 0
    for i in order:
        parts += [torch.randint(0, 256, (gap,), dtype=torch.uint8, generator=gen), images[i].reshape(-1)]
        offsets[i] = at + gap
        at += gap + images[i].numel()
    packed = PackedImages(torch.cat(parts), torch.tensor(offsets), torch.tensor([im.shape[1:] for im in images]), 3)
    got = resized_crop(packed, boxes, flips, 12, MEAN[3], STD[3])
    want = resized_crop(pack(images), boxes, flips, 12, MEAN[3], STD[3])
    assert torch.equal(got, want)


def test_resized_crop_flip_mirrors_the_output(backend, request):
    """A flipped output is exactly the unflipped one mirrored left-right."""
    images = _images(seeded(request), [(37, 53), (7, 13)], 3)
    boxes = torch.tensor([(3, 4, 30, 45), (0, 0, 7, 13)])
    plain = resized_crop(images, boxes, torch.tensor([False, False]), 19, MEAN[3], STD[3])
    flipped = resized_crop(images, boxes, torch.tensor([True, True]), 19, MEAN[3], STD[3])
    assert torch.equal(flipped, plain.flip(-1))


# ============================================================================ bad inputs
def _bad_inputs():
    """(name, call, message pattern): every bad input, through the public function; each a ValueError."""
    images = [torch.randint(0, 256, (3, 7, 13), dtype=torch.uint8), torch.randint(0, 256, (3, 9, 4), dtype=torch.uint8)]
    p = pack(images)
    good = torch.tensor([(0, 0, 7, 13), (1, 1, 8, 3)])
    flips = torch.tensor([False, True])

    def rc(imgs=p, boxes=good, fl=flips, size=8, mean=MEAN[3], std=STD[3], **kw):
        return lambda: resized_crop(imgs, torch.as_tensor(boxes), fl, size, mean, std, **kw)

    def shifted(offsets=None, sizes=None, data=None):
        return PackedImages(p.data if data is None else data, p.offsets if offsets is None else torch.tensor(offsets),
                            p.sizes if sizes is None else torch.tensor(sizes), 3)

    def outside(box):
        return re.escape(f"box 1 {box} (top, left, height, width) lies outside its 9x4 image")

    def empty(box):
        return re.escape(f"box 1 {box} (top, left, height, width) is empty")

    def beyond(offset, size):
        return re.escape(f"image 1 (offset {offset}, size {size}, 3 channels) does not lie inside the 381 bytes "
                         f"of data")

    return [
        ("box_right", rc(boxes=[(0, 0, 7, 13), (0, 1, 9, 4)]), outside((0, 1, 9, 4))),
        ("box_bottom", rc(boxes=[(0, 0, 7, 13), (1, 0, 9, 4)]), outside((1, 0, 9, 4))),
        ("box_negative", rc(boxes=[(0, 0, 7, 13), (0, -1, 2, 2)]), outside((0, -1, 2, 2))),
        ("box_empty_h", rc(boxes=[(0, 0, 7, 13), (2, 1, 0, 2)]), empty((2, 1, 0, 2))),
        ("box_empty_w", rc(boxes=[(0, 0, 7, 13), (2, 1, 3, -1)]), empty((2, 1, 3, -1))),
        # every check runs over all images before the next: box 0 outside, box 1 empty -> the empty one
        ("empty_before_outside", rc(boxes=[(0, 0, 8, 13), (2, 1, 0, 2)]), empty((2, 1, 0, 2))),
        # the first failing box of a check
        ("first_outside", rc(boxes=[(0, 0, 7, 14), (0, 0, 10, 4)]),
         re.escape("box 0 (0, 0, 7, 14) (top, left, height, width) lies outside its 7x13 image")),
        ("image_beyond_data", rc(imgs=shifted(offsets=[0, 274])), beyond(274, "9x4")),
        ("image_negative_offset", rc(imgs=shifted(offsets=[0, -1])), beyond(-1, "9x4")),
        ("image_bad_size", rc(imgs=shifted(sizes=[(7, 13), (9, 0)])), beyond(273, "9x0")),
        ("size_0", rc(size=0), "size must be a positive int, got 0"),
        ("size_float", rc(size=8.0), "size must be a positive int, got 8.0"),
        ("not_uint8", lambda: resized_crop([im.float() for im in images], good, flips, 8, MEAN[3], STD[3]),
         re.escape("image 0 must be uint8 (decoded pixels), got torch.float32")),
        ("packed_not_uint8", rc(imgs=shifted(data=p.data.float())), "packed image data must be a 1-D uint8 tensor"),
        ("image_dims", lambda: resized_crop([images[0][0]], good[:1], flips[:1], 8, MEAN[3], STD[3]),
         re.escape("image 0 must be a [C, H, W] tensor, got (7, 13)")),
        ("channels_differ", lambda: resized_crop([images[0], images[1][:1]], good, flips, 8, MEAN[3], STD[3]),
         "every image must have 3 channels like image 0; image 1 has 1"),
        ("boxes_shape", rc(boxes=good[:, :3]), re.escape("boxes must be an integer [2, 4] tensor")),
        ("boxes_float", rc(boxes=good.float()), re.escape("boxes must be an integer [2, 4] tensor")),
        ("boxes_count", rc(boxes=good[:1]), re.escape("boxes must be an integer [2, 4] tensor")),
        ("flips_count", rc(fl=flips[:1]), re.escape("flips must be a [2] tensor")),
        ("sizes_shape", rc(imgs=shifted(sizes=[7, 9])), re.escape("sizes must be an int64 [2, 2] tensor")),
        ("offsets_dtype", rc(imgs=PackedImages(p.data, p.offsets.int(), p.sizes, 3)),
         "offsets must be a non-empty 1-D int64 tensor"),
        ("mean_length", rc(mean=MEAN[1]), re.escape("mean and std need one value per channel (3), got 1 and 3")),
        ("std_zero", rc(std=(0.2, 0.0, 0.2)), "std must not be 0"),
        ("dtype", rc(dtype=torch.float64), "dtype must be one of"),
        ("interpolation", rc(interpolation="nearest"), "interpolation must be one of"),
    ]


_BAD = _bad_inputs()


@pytest.mark.parametrize("which", range(len(_BAD)), ids=[b[0] for b in _BAD])
def test_resized_crop_bad_input(which, backend):
    _, call, match = _BAD[which]
    with pytest.raises(ValueError, match=match):
        call()


def _cpp(*args):
    return torch.ops.fastmae_C.resized_crop_fwd(*args, *config.settings().cpp_args)


def _op_args(C=3, S=8, dtype=torch.float32, bicubic=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    p = pack(_images(gen, [(7, 13), (9, 4)], C))
    return [p.data, p.offsets, p.sizes, torch.tensor([(0, 0, 7, 13), (1, 1, 8, 3)]), torch.tensor([False, True]), C,
            S, list(MEAN[C]), list(STD[C]), dtype, bicubic]


def test_cpp_resized_crop_checks_its_arguments():
    """The C++ kernel, called directly, checks what the public function and the op's other backends
    check: the values (with _check's messages, in its order) and, defensively, the dtypes and shapes."""
    require_cpp()
    a = _op_args()

    def call(**changes):
        names = ["data", "offsets", "sizes", "boxes", "flips", "channels", "size", "mean", "std", "dtype", "bicubic"]
        args = [changes.get(n, v) for n, v in zip(names, a)]
        return _cpp(*args)

    cases = [
        (dict(boxes=torch.tensor([(0, 0, 7, 13), (1, 1, 9, 3)])),
         "box 1 (1, 1, 9, 3) (top, left, height, width) lies outside its 9x4 image"),
        (dict(boxes=torch.tensor([(0, 0, 8, 13), (1, 1, 0, 3)])),
         "box 1 (1, 1, 0, 3) (top, left, height, width) is empty"),
        (dict(offsets=torch.tensor([0, 275])),
         "image 1 (offset 275, size 9x4, 3 channels) does not lie inside the 381 bytes of data"),
        (dict(offsets=torch.tensor([0, 2 ** 62]), boxes=torch.tensor([(0, 0, 0, 13), (1, 1, 9, 3)])),
         f"image 1 (offset {2 ** 62}, size 9x4, 3 channels) does not lie inside the 381 bytes of data"),
        (dict(sizes=torch.tensor([(7, 13), (2 ** 40, 2 ** 40)])),  # C*H*W overflows int64
         f"image 1 (offset 273, size {2 ** 40}x{2 ** 40}, 3 channels) does not lie inside the 381 bytes of data"),
        (dict(boxes=torch.tensor([(0, 0, 7, 13), (1, 2 ** 62, 1, 2 ** 62)])), "lies outside its 9x4 image"),
        (dict(size=0), "size must be a positive int, got 0"),
        (dict(data=a[0].float()), "packed image data must be a 1-D uint8 tensor"),
        (dict(data=a[0].view(3, -1)), "packed image data must be a 1-D uint8 tensor"),
        (dict(offsets=a[1].int()), "offsets must be Long"),
        (dict(sizes=a[2].reshape(1, 4)), "sizes must have shape [2, 2]"),
        (dict(boxes=a[3].int()), "boxes must be Long"),
        (dict(boxes=a[3][:, :3]), "boxes must have shape [2, 4]"),
        (dict(flips=a[4].long()), "flips must be Bool"),
        (dict(flips=a[4][:1]), "flips must have shape [2]"),
        (dict(mean=[0.5]), "mean and std need one value per channel (3), got 1 and 3"),
        (dict(channels=0, mean=[], std=[]), "mean and std need one value per channel (0)"),
        (dict(std=[0.2, 0.0, 0.2]), "std must not be 0"),
        (dict(dtype=torch.float64), "dtype must be float32, bfloat16 or float16"),
    ]
    for changes, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            call(**changes)
    call()  # the unchanged arguments pass


def test_resized_crop_opcheck(backend):
    skip_triton_tracing(backend)
    torch.library.opcheck(torch.ops.fastmae.resized_crop, tuple(_op_args(S=6)))
    torch.library.opcheck(torch.ops.fastmae.resized_crop, tuple(_op_args(C=1, S=11, dtype=torch.bfloat16,
                                                                         bicubic=False)))


# ============================================================================ torch.compile
@pytest.fixture
def compile_backend(backend):
    if backend == "triton":
        pytest.skip("torch.compile over Triton ops fails under TRITON_INTERPRET (kernels would run on fake "
                    "tensors); the Triton path is covered by the interpreter's eager tests")
    torch._dynamo.reset()
    yield backend
    torch._dynamo.reset()


def test_resized_crop_compile_fullgraph(compile_backend, request):
    """torch.compile(fullgraph=True) of a function calling resized_crop on packed images (and using
    its output): one graph, eager's values."""
    gen = seeded(request)
    p = pack(_images(gen, [(37, 53), (7, 13)], 3))
    boxes, flips = torch.tensor([(2, 3, 30, 41), (0, 0, 7, 13)]), torch.tensor([True, False])

    def f(data, offsets, sizes, boxes, flips):
        x = resized_crop(PackedImages(data, offsets, sizes, 3), boxes, flips, 16, MEAN[3], STD[3],
                         dtype=torch.bfloat16)
        return x.float().mean(dim=(2, 3))

    want = f(p.data, p.offsets, p.sizes, boxes, flips)
    got = torch.compile(f, fullgraph=True)(p.data, p.offsets, p.sizes, boxes, flips)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ============================================================================ the C++ kernel
@pytest.mark.parametrize("isa", ["avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_resized_crop_isa_variants(dtype, isa, request):
    """The C++ loops exist three times (AVX-512, AVX2, the baseline x86-64 ISA; the best the CPU runs
    is chosen at run time, and the rest of this file tests that one): run the lower ones too."""
    require_cpp()
    with config.override(backend="cpp", cpu_isa=isa):
        for case in ("7x13", "37x53", "identity"):
            test_resized_crop(case, 3, "bicubic", dtype, "cpp", request)
        test_resized_crop("37x53", 1, "bilinear", dtype, "cpp", request)


@pytest.mark.parametrize("isa", ["native", "avx2", "base"])
@pytest.mark.parametrize("dtype", OP_DTYPES, ids=str)
def test_cpp_resized_crop_streamed_outputs_are_bitwise_equal(dtype, isa):
    """Streaming stores (used only when forced, stream mode always: the automatic mode never streams
    this op's output) give bitwise the rows plain stores give, for rows of whole 16-byte pieces
    (S = 32) and not (S = 21, 30: plain stores), in every instruction-set variant."""
    require_cpp()
    cap = config.settings().cpp_args[0] if isa == "native" else config.ISA_CAPS[isa]
    never, always = config.STREAM_MODES["never"], config.STREAM_MODES["always"]
    for S in (32, 21, 30):
        args = _op_args(S=S, dtype=dtype, seed=S)
        plain = torch.ops.fastmae_C.resized_crop_fwd(*args, cap, never)
        streamed = torch.ops.fastmae_C.resized_crop_fwd(*args, cap, always)
        assert not streamed.isnan().any()
        bits = torch.int16 if plain.element_size() == 2 else torch.int32
        assert torch.equal(plain.view(bits), streamed.view(bits)), f"S={S}: streamed output differs"


def test_cpp_resized_crop_any_thread_count_same_bits(request):
    """Each image is one task whatever the thread count: bitwise the same output on 1 and 2 threads,
    and from one call to the next (thread-local weight tables reused or rebuilt)."""
    require_cpp()
    gen = seeded(request)
    images = _images(gen, [(37, 53), (7, 13), (37, 53), (300, 211), (9, 4)], 3)
    boxes = torch.tensor([(2, 3, 30, 41), (0, 0, 7, 13), (2, 3, 30, 41), (5, 9, 200, 150), (1, 0, 8, 4)])
    flips = _flips(5)
    p = pack(images)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            outs.append(_cpp(p.data, p.offsets, p.sizes, boxes, flips, 3, 24, list(MEAN[3]), list(STD[3]),
                             torch.float32, True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert not math.isnan(outs[0].sum().item())

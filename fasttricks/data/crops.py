"""Reproducible random-resized-crop + flip decoder for FFCV, compiled with numba.

FFCV's stock ``RandomResizedCropRGBImageDecoder`` and ``RandomHorizontalFlip`` draw from
``np.random`` inside numba worker threads, whose states are neither seeded by the Loader's ``seed``
nor tied to a sample: two runs with one seed see different crops, and a resumed run is not the
uninterrupted one. Here every draw is a counter-based hash (splitmix64) of (seed, epoch, sample
index, draw number), so a crop is a pure function of those and of nothing else: not the thread
that decodes it, not the batch it falls in, not what was decoded before.

The epoch (and the validation crop and resize) change at run time while the pipeline is compiled
once, and numba freezes captured arrays as constants, so (seed, epoch, crop, resize) live in a small
numpy array that the compiled code reads through its address (see ``_state_view``).
"""

from __future__ import annotations

import numba
import numpy as np
from ffcv.fields.rgb_image import IMAGE_MODES, ResizedCropRGBImageDecoder
from ffcv.libffcv import imdecode, resize_crop
from ffcv.pipeline.compiler import Compiler
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from fasttricks.errors import InputError

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TO_UNIT = 1.0 / 9007199254740992.0  # 2**-53
FLIP_DRAW = 40  # draw number of the flip coin; crops use draws 0..39 (10 tries x 4)

# numba 0.68 corrupts a dispatcher's overload table when compiled closures of FFCV pipelines that
# call it are collected: one dispatcher shared by several decoders then fails to compile
# (KeyError, and FFCV's loader thread dies, leaving the loop waiting forever), and even private
# ones print a KeyError when collected. So each decoder compiles its own, as FFCV does, and they
# are kept alive for the life of the process (a few kB each).
_KEEP_ALIVE: list = []


@numba.njit(inline="always")
def mix64(x):
    """splitmix64's finaliser: a bijection of uint64 with full avalanche."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


@numba.njit(inline="always")
def sample_key(seed, epoch, index):
    return mix64(mix64(mix64(np.uint64(seed)) ^ np.uint64(epoch)) ^ np.uint64(index))


@numba.njit(inline="always")
def uniform(key, draw):
    """The ``draw``-th U[0, 1) variate of a sample's stream."""
    return np.float64(mix64(key + _GOLDEN * np.uint64(draw + 1)) >> np.uint64(11)) * _TO_UNIT


@numba.njit
def crop_box(key, height, width, scale_lo, scale_hi, log_ratio_lo, log_ratio_hi):
    """(top, left, h, w) of a random-resized crop, torchvision's algorithm on our random stream:
    ten tries at an area fraction and log-uniform aspect ratio, else the largest central crop
    whose aspect ratio is inside the range."""
    height, width = np.int64(height), np.int64(width)
    area = np.float64(height * width)
    for t in range(10):
        target = area * (scale_lo + (scale_hi - scale_lo) * uniform(key, 4 * t))
        aspect = np.exp(log_ratio_lo + (log_ratio_hi - log_ratio_lo) * uniform(key, 4 * t + 1))
        w = np.int64(np.round(np.sqrt(target * aspect)))
        h = np.int64(np.round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = np.int64(uniform(key, 4 * t + 2) * (height - h + 1))
            left = np.int64(uniform(key, 4 * t + 3) * (width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    lo, hi = np.exp(log_ratio_lo), np.exp(log_ratio_hi)
    if in_ratio < lo:
        w, h = width, np.int64(np.round(width / lo))
    elif in_ratio > hi:
        h, w = height, np.int64(np.round(height * hi))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


@numba.njit
def centre_box(height, width, crop, resize):
    """The centred square of side crop/resize x the short side (FFCV's centre crop), in integer
    arithmetic: FFCV's float product can land just below an integer (40/48 x 48 = 39.99...)."""
    side = np.int64(crop) * min(np.int64(height), np.int64(width)) // np.int64(resize)
    return (np.int64(height) - side) // 2, (np.int64(width) - side) // 2, side, side


@numba.njit(inline="always")
def flip_columns(img):
    """Mirror an HxWxC image in place."""
    width = img.shape[1]
    for y in range(img.shape[0]):
        for x in range(width // 2):
            for c in range(img.shape[2]):
                tmp = img[y, x, c]
                img[y, x, c] = img[y, width - 1 - x, c]
                img[y, width - 1 - x, c] = tmp


@intrinsic
def _as_voidptr(typingctx, address):
    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return types.voidptr(address), codegen


@numba.njit(inline="always")
def _state_view(address):
    # Why an address: the state must be readable by compiled code and writable from Python
    # between epochs; an array captured by a closure would be frozen into the code as a constant.
    return numba.carray(_as_voidptr(address), (4,), np.uint64)


class SeededRandomResizedCropFlip(ResizedCropRGBImageDecoder):
    """FFCV decoder: decode, random-resized crop, resize to ``output_size`` and flip with p=0.5,
    every draw a pure function of (seed, epoch, sample index). Call ``set_epoch`` before each
    epoch's iteration; change ``output_size`` between epochs for progressive resizing."""

    def __init__(self, output_size: tuple[int, int], seed: int = 0, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), flip: bool = True):
        super().__init__(output_size)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.centre_ratio = None
        # read by the compiled decoder: seed, epoch, and the validation crop and resize
        self.state = np.array([seed, 0, 1, 1], dtype=np.uint64)
        self._decode = None

    def set_epoch(self, epoch: int) -> None:
        self.state[1] = epoch

    @property
    def get_crop_generator(self):  # FFCV's abstract hook; our draw needs the sample index
        return crop_box

    def generate_code(self):
        # FFCV asks again at every epoch (to size its buffers) and discards the answer: one function
        # per decoder, or each epoch would add one to _KEEP_ALIVE for the life of the process
        if self._decode is None:
            self._decode = self._generate_code()
        return self._decode

    def _generate_code(self):
        jpg = IMAGE_MODES["jpg"]
        mem_read = self.memory_read
        my_range = Compiler.get_iterator()
        imdecode_c, resize_crop_c = Compiler.compile(imdecode), Compiler.compile(resize_crop)
        address = self.state.ctypes.data
        scale_lo, scale_hi = float(self.scale[0]), float(self.scale[1])
        log_lo, log_hi = float(np.log(self.ratio[0])), float(np.log(self.ratio[1]))
        flip, centre = self.flip, self.centre_ratio is not None

        def decode(batch_indices, my_storage, metadata, storage_state):
            destination, temp_storage = my_storage
            state = _state_view(address)
            seed, epoch = state[0], state[1]
            for dst_ix in my_range(len(batch_indices)):
                source_ix = batch_indices[dst_ix]
                field = metadata[source_ix]
                image_data = mem_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpg:
                    temp_buffer = temp_storage[dst_ix]
                    imdecode_c(image_data, temp_buffer, height, width, height, width, 0, 0, 1, 1,
                               False, False)
                    temp_buffer = temp_buffer.reshape(-1)[:3 * height * width].reshape(height, width, 3)
                else:
                    temp_buffer = image_data.reshape(height, width, 3)
                key = sample_key(seed, epoch, source_ix)
                if centre:
                    top, left, h, w = centre_box(height, width, state[2], state[3])
                else:
                    top, left, h, w = crop_box(key, height, width, scale_lo, scale_hi, log_lo, log_hi)
                resize_crop_c(temp_buffer, top, top + h, left, left + w, destination[dst_ix])
                if flip and uniform(key, FLIP_DRAW) < 0.5:
                    flip_columns(destination[dst_ix])
            return destination[:len(batch_indices)]

        decode.is_parallel = True
        _KEEP_ALIVE.append((imdecode_c, resize_crop_c, decode))
        return decode


class CentreCropDecoder(SeededRandomResizedCropFlip):
    """Validation decoder: resize R and centre crop C, i.e. the centred square of C/R of the short
    side, resized to (C, C). FFCV's ``CenterCropRGBImageDecoder`` computes the same box; this one
    shares the compiled-code handling above."""

    def __init__(self, resize: int, crop: int):
        super().__init__((crop, crop), flip=False)
        self.set_size(resize, crop)

    def set_size(self, resize: int, crop: int) -> None:
        """May change between epochs, like ``output_size`` (a FixRes sweep re-uses one compiled
        loader for every test size)."""
        if not 0 < crop <= resize:
            raise InputError(f"the validation crop ({crop}) must be positive and at most the resize ({resize})")
        self.centre_ratio = crop / resize
        self.resize, self.crop = resize, crop
        self.output_size = (crop, crop)
        self.state[2], self.state[3] = crop, resize

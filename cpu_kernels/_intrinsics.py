"""LLVM-level helpers for the Numba kernels: 16-bit float widening, bit casts, 2**k, prefetch hints,
and atomic loads, stores and a pause for the flags and spin-waits host threads share.

Numba has no bfloat16 or float16 type, so 16-bit pools reach the kernels as uint16 bit
patterns. The conversions emit the LLVM operation directly (a 16-bit shift for bfloat16,
`fpext half` for float16, which x86 lowers to F16C's vcvtph2ps) so that LLVM vectorizes the
loops around them.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

_I32 = ir.IntType(32)


class NamedType(ir.Type):
    """An LLVM type llvmlite does not model (`bfloat`, `x86_amx`), written by its name, for the
    signatures of intrinsics that take or return it."""

    def __init__(self, name: str):
        self.name = name

    def _to_string(self):
        return self.name

    def __eq__(self, other):
        return isinstance(other, NamedType) and other.name == self.name

    def __hash__(self):
        return hash(self.name)


def c_array(context, builder, array_type, value):
    """(data pointer, shape values) of a C-contiguous array argument, for hand-built LLVM."""
    array = context.make_array(array_type)(context, builder, value)
    return array.data, cgutils.unpack_tuple(builder, array.shape)


def check_c_array(name, array_type, ndim, dtype):
    """Refuse, at typing, an intrinsic's argument that is not a C-contiguous ndim-d array of dtype."""
    if not (isinstance(array_type, types.Array) and array_type.ndim == ndim and array_type.layout == "C"
            and array_type.dtype == dtype):
        raise TypeError(f"{name}: expected a C-contiguous {ndim}-d array of {dtype}, got {array_type}")


@intrinsic
def bf16_bits_to_f32(typingctx, bits):
    """float32 whose upper 16 bits are `bits` (a bfloat16 pattern)."""

    def codegen(context, builder, signature, args):
        wide = builder.zext(args[0], _I32)
        return builder.bitcast(builder.shl(wide, ir.Constant(_I32, 16)), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def f16_bits_to_f32(typingctx, bits):
    """float32 value of the IEEE half-precision pattern `bits` (subnormals, inf, NaN exact)."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def exponent_to_f32(typingctx, k):
    """2.0 ** k for an int32 k in [-126, 127], built from the exponent bits."""

    def codegen(context, builder, signature, args):
        biased = builder.add(args[0], ir.Constant(_I32, 127))
        return builder.bitcast(builder.shl(biased, ir.Constant(_I32, 23)), ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def f32_bits(typingctx, x):
    """The bit pattern of a float32, as uint32."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _I32)

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, bits):
    """The float32 whose bit pattern is `bits` (uint32)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


def to_f32(x, fp16):
    """float32 value of a pool element: uint16 bits (float16 if `fp16`, else bfloat16) or float32.

    Numba-only (overloaded per element type).
    """
    raise NotImplementedError("to_f32 is only callable from Numba-compiled code")


@overload(to_f32)
def _to_f32_impl(x, fp16):
    if x == types.uint16:
        return lambda x, fp16: f16_bits_to_f32(x) if fp16 else bf16_bits_to_f32(x)
    if x == types.float32:
        return lambda x, fp16: x
    return None


def emit_prefetch(builder, address, locality: int) -> None:
    """Emit a prefetch of the cache line at `address` for reading, with LLVM's `locality` (3: every
    cache level, 2: L2 and L3)."""
    byte_pointer = builder.bitcast(address, ir.IntType(8).as_pointer())
    hint = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
    # a read (0), the locality, into the data cache (1)
    builder.call(hint, [byte_pointer, ir.Constant(_I32, 0), ir.Constant(_I32, locality), ir.Constant(_I32, 1)])


def _prefetch_intrinsic(locality, doc):
    @intrinsic
    def prefetch(typingctx, arr, row, col):
        if not isinstance(arr, types.Array) or arr.ndim != 2:
            return None

        def codegen(context, builder, signature, args):
            array_type = signature.args[0]
            array = context.make_array(array_type)(context, builder, args[0])
            index = [context.cast(builder, v, t, types.intp) for v, t in zip(args[1:], signature.args[1:])]
            pointer = cgutils.get_item_pointer2(
                context, builder, data=array.data, shape=cgutils.unpack_tuple(builder, array.shape),
                strides=cgutils.unpack_tuple(builder, array.strides), layout=array_type.layout, inds=index,
                wraparound=False, boundscheck=False)
            emit_prefetch(builder, pointer, locality)
            return context.get_dummy_value()

        return types.none(arr, row, col), codegen

    prefetch.__doc__ = doc
    return prefetch


# Hints only, no effect on results. The hardware prefetchers stop at 4 KiB pages, and a tile's rows
# span several.
prefetch_l1 = _prefetch_intrinsic(3, "Bring the cache line of arr[row, col] (a 2-D array) into every cache level.")
prefetch_l2 = _prefetch_intrinsic(2, "Bring the cache line of arr[row, col] (a 2-D array) into L2 and L3, not L1.")


@intrinsic
def load_acquire(typingctx, arr, index):
    """arr[index] of a C-contiguous 1-D int64 array, read as an atomic load with acquire ordering:
    a loop reads memory again each time (what another thread or a device wrote shows), and nothing
    after it in this thread is read before it."""
    check_c_array("load_acquire", arr, 1, types.int64)
    if not isinstance(index, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        data, _ = c_array(context, builder, signature.args[0], args[0])
        pointer = builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(arr, index), codegen


@intrinsic
def spin_pause(typingctx):
    """x86's `pause`, which eases a spin-wait loop on the core and its sibling; nothing elsewhere."""

    def codegen(context, builder, signature, args):
        if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
            pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def store_release(typingctx, arr, index, value):
    """arr[index] = value for a C-contiguous 1-D int32 array, as an atomic store with release
    ordering: whoever sees it (another thread, or a device reading over PCIe) also sees every store
    this thread made, or saw, before it."""
    check_c_array("store_release", arr, 1, types.int32)
    if not (isinstance(index, types.Integer) and isinstance(value, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        data, _ = c_array(context, builder, signature.args[0], args[0])
        pointer = builder.gep(data, [context.cast(builder, args[1], signature.args[1], types.intp)])
        builder.store_atomic(context.cast(builder, args[2], signature.args[2], types.int32), pointer, "release", 4)
        return context.get_dummy_value()

    return types.none(arr, index, value), codegen

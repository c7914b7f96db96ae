"""Eight float lanes as a Numba type, and the vector operations the hot loops are built from.

LLVM does not find good code for the kernels' inner products from Numba's scalar loops: the
per-block scale of "32 packed weights · 32 activations" forces a horizontal sum per block, and a
row-at-a-time matrix product is bound by its stores. Written with `Lanes` (an LLVM <8 x float>
that a loop carries in one register) they are:

- block dot products: the weights widen to int16, `pmaddwd` multiplies and adds pairs into eight
  int32 lanes, and the lanes accumulate scale · sums across blocks; a row ends in one horizontal
  sum. The activations are int16 with a float scale per block of 32 (cpu.quantize_act): a relative
  error of 1.5e-5 per element, far below the weights' own rounding, so the products keep float
  precision (llama.cpp's int8 activations cost ~1% per product).
- register-blocked products: `fma` of a broadcast scalar with eight consecutive floats.

Without AVX2 the same IR uses generic vector operations, which every LLVM target lowers.
"""
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config, errors, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
LANES = 8  # an AVX2 register of floats


class LanesType(types.Type):
    def __init__(self):
        super().__init__(name="Lanes")


lanes_type = LanesType()


@register_model(LanesType)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F32, LANES))


def _vec(t, n):
    return ir.VectorType(t, n)


def _const(t, n, values):
    return ir.Constant(_vec(t, n), list(values))


def _has_avx2() -> bool:
    return not config.CPU_NAME and bool(llvm.get_host_cpu_features().get("avx2", False))


def _check_c(array_type, what: str):
    """Offsets count over all elements from the data pointer: only C-contiguous arrays qualify."""
    if not (isinstance(array_type, types.Array) and array_type.layout == "C"):
        raise errors.TypingError(f"{what} must be a C-contiguous array, got {array_type}")


def _pointer(context, builder, array_type, array, offset, element_vector):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element_vector.as_pointer())


def _splat(builder, value):
    undef = ir.Constant(_vec(_F32, LANES), ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(_I32, 0)), undef,
                                  _const(_I32, LANES, [0] * LANES))


def _fma(builder, a, b, c):
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vec(_F32, LANES), [_vec(_F32, LANES)] * 3),
                                         f"llvm.fma.v{LANES}f32")
    return builder.call(fma, [a, b, c])


@intrinsic
def lanes_zero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_vec(_F32, LANES), [0.0] * LANES)
    return lanes_type(), codegen


@intrinsic
def lanes_sum(typingctx, acc):
    def codegen(context, builder, sig, args):
        total = builder.extract_element(args[0], ir.Constant(_I32, 0))
        for i in range(1, LANES):
            total = builder.fadd(total, builder.extract_element(args[0], ir.Constant(_I32, i)))
        return total
    return types.float32(lanes_type), codegen


@intrinsic
def lanes_store(typingctx, acc, out, offset):
    """out[offset:offset+8] = acc (out C-contiguous float32, offset counted over all its elements)."""
    _check_c(out, "lanes_store's out")

    def codegen(context, builder, sig, args):
        acc_v, out_v, off_v = args
        builder.store(acc_v, _pointer(context, builder, sig.args[1], out_v, off_v, _vec(_F32, LANES)), align=4)
        return context.get_dummy_value()
    return types.none(lanes_type, out, types.int64), codegen


@intrinsic
def fma_lanes(typingctx, acc, a, m, offset):
    """acc + a · m[offset:offset+8] (m C-contiguous float32, offset over all its elements)."""
    _check_c(m, "fma_lanes's m")

    def codegen(context, builder, sig, args):
        acc_v, a_v, m_v, off_v = args
        row = builder.load(_pointer(context, builder, sig.args[2], m_v, off_v, _vec(_F32, LANES)), align=4)
        return _fma(builder, _splat(builder, a_v), row, acc_v)
    return lanes_type(lanes_type, types.float32, m, types.int64), codegen


def _pair_sums(builder, w16, x16):
    """<32 x i16> · <32 x i16> → <8 x i32>, each lane the sum of four products."""
    halves = [_const(_I32, 16, range(k, k + 16)) for k in (0, 16)]
    if _has_avx2():
        pmaddwd = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_vec(_I32, 8), [_vec(_I16, 16)] * 2), "llvm.x86.avx2.pmadd.wd")
        parts = [builder.call(pmaddwd, [builder.shuffle_vector(w16, w16, h), builder.shuffle_vector(x16, x16, h)])
                 for h in halves]
        return builder.add(*parts)
    prod = builder.mul(builder.sext(w16, _vec(_I32, 32)), builder.sext(x16, _vec(_I32, 32)))
    quarters = [builder.shuffle_vector(prod, prod, _const(_I32, 8, range(k, k + 8))) for k in (0, 8, 16, 24)]
    return builder.add(builder.add(quarters[0], quarters[1]), builder.add(quarters[2], quarters[3]))


def _block_dot(w, x16, nibbles: bool):
    _check_c(w, "the weight row")
    _check_c(x16, "the int16 activations")
    sig = lanes_type(lanes_type, w, types.int64, x16, types.int64, types.float32)

    def codegen(context, builder, sig, args):
        acc_v, w_v, w_off_v, x_v, x_off_v, scale_v = args
        if nibbles:  # 16 bytes: low nibbles are elements 0-15, high nibbles 16-31 (ggml's Q4 layout)
            q = builder.load(_pointer(context, builder, sig.args[1], w_v, w_off_v, _vec(_I8, 16)), align=1)
            lo = builder.and_(q, _const(_I8, 16, [15] * 16))
            hi = builder.lshr(q, _const(_I8, 16, [4] * 16))
            w16 = builder.zext(builder.shuffle_vector(lo, hi, _const(_I32, 32, range(32))), _vec(_I16, 32))
        else:  # 32 signed bytes (Q8_0)
            q = builder.load(_pointer(context, builder, sig.args[1], w_v, w_off_v, _vec(_I8, 32)), align=1)
            w16 = builder.sext(q, _vec(_I16, 32))
        x16_v = builder.load(_pointer(context, builder, sig.args[3], x_v, x_off_v, _vec(_I16, 32)), align=2)
        sums = builder.sitofp(_pair_sums(builder, w16, x16_v), _vec(_F32, LANES))
        return _fma(builder, sums, _splat(builder, scale_v), acc_v)
    return sig, codegen


@intrinsic
def nibble_dot(typingctx, acc, w, w_off, x16, x_off, scale):
    """acc + scale · (the 32 nibbles in w[w_off:w_off+16] · x16[x_off:x_off+32]), over 8 lanes."""
    return _block_dot(w, x16, nibbles=True)


@intrinsic
def byte_dot(typingctx, acc, w, w_off, x16, x_off, scale):
    """acc + scale · (the 32 int8 in w[w_off:w_off+32] · x16[x_off:x_off+32]), over 8 lanes."""
    return _block_dot(w, x16, nibbles=False)

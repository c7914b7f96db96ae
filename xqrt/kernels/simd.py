"""Eight float lanes as a Numba type, and the vector operations the hot loops are built from.

LLVM does not find good code for the kernels' inner products from Numba's scalar loops: the
per-block scale of "32 packed weights · 32 activations" forces a horizontal sum per block, and a
row-at-a-time matrix product is bound by its stores. Written with `Lanes` (an LLVM <8 x float>
that a loop carries in one register) they are:

- block dot products: the activations are integer codes with a float scale per block of 32
  (cpu.quantize_act). With int8 codes (llama.cpp's choice) 32 weight codes (unsigned nibbles, or
  int8 made unsigned by moving their sign onto the activations) meet 32 activations in one
  `pmaddubsw`, and a `pmaddwd` by ones sums them into eight int32 lanes. With int16 codes the
  weights widen to int16 and two `pmaddwd` do it: about 1.3× slower, but the products then match
  float arithmetic to ~1e-5 instead of ~1e-3. The lanes accumulate scale · sums across blocks; a
  row ends in one horizontal sum. The dtype of the codes array picks the variant at compile time.
- register-blocked products (the latent caches' rebuild): `fma` of a broadcast scalar with WIDE
  consecutive floats, in a type of their own (`Wide`): sixteen lanes where the CPU has AVX-512,
  else eight. On this project's 2-core Xeon one core's FMA peak is 220 GFLOP/s at sixteen lanes
  against 129 at eight (bench/latent_step.py prints the first; the second was timed once by hand
  with the same twelve chains at eight). Each lane still sums one output in order, so the width
  never changes a result.
- the cache's dequantization: eight 1–4-bit codes of one word shifted, masked and scaled at once.

Without AVX2 the same IR uses generic vector operations, which every LLVM target lowers.
"""
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config, errors, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
LANES = 8  # an AVX2 register of floats


def _has(feature: str) -> bool:
    """A feature of this host's CPU (none where NUMBA_CPU_NAME asks for code for another)."""
    return not config.CPU_NAME and bool(llvm.get_host_cpu_features().get(feature, False))


def _has_avx2() -> bool:
    return _has("avx2")


WIDE = 16 if _has("avx512f") else LANES  # floats per register of the register-blocked products


class LanesType(types.Type):
    def __init__(self, name="Lanes"):
        super().__init__(name=name)


lanes_type = LanesType()
wide_type = LanesType("Wide")


@register_model(LanesType)
class _LanesModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F32, WIDE if fe_type is wide_type else LANES))


def _vec(t, n):
    return ir.VectorType(t, n)


def _const(t, n, values):
    return ir.Constant(_vec(t, n), list(values))


def _check_c(array_type, what: str):
    """Offsets count over all elements from the data pointer: only C-contiguous arrays qualify."""
    if not (isinstance(array_type, types.Array) and array_type.layout == "C"):
        raise errors.TypingError(f"{what} must be a C-contiguous array, got {array_type}")


def _pointer(context, builder, array_type, array, offset, element_vector):
    data = context.make_array(array_type)(context, builder, array).data
    return builder.bitcast(builder.gep(data, [offset]), element_vector.as_pointer())


def _splat(builder, value, n=LANES):
    """value (a float or an i32) in all n lanes."""
    undef = ir.Constant(_vec(value.type, n), ir.Undefined)
    return builder.shuffle_vector(builder.insert_element(undef, value, ir.Constant(_I32, 0)), undef,
                                  _const(_I32, n, [0] * n))


def _fma(builder, a, b, c):
    n = a.type.count
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_vec(_F32, n), [_vec(_F32, n)] * 3),
                                         f"llvm.fma.v{n}f32")
    return builder.call(fma, [a, b, c])


@intrinsic
def lanes_zero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_vec(_F32, LANES), [0.0] * LANES)
    return lanes_type(), codegen


@intrinsic
def lanes_add(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return lanes_type(lanes_type, lanes_type), codegen


@intrinsic
def lanes_sum(typingctx, acc):
    def codegen(context, builder, sig, args):
        total = builder.extract_element(args[0], ir.Constant(_I32, 0))
        for i in range(1, LANES):
            total = builder.fadd(total, builder.extract_element(args[0], ir.Constant(_I32, i)))
        return total
    return types.float32(lanes_type), codegen


@intrinsic
def wide_zero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(_vec(_F32, WIDE), [0.0] * WIDE)
    return wide_type(), codegen


@intrinsic
def wide_store(typingctx, acc, out, offset):
    """out[offset:offset+WIDE] = acc (out C-contiguous float32, offset counted over all its elements)."""
    _check_c(out, "wide_store's out")

    def codegen(context, builder, sig, args):
        acc_v, out_v, off_v = args
        builder.store(acc_v, _pointer(context, builder, sig.args[1], out_v, off_v, _vec(_F32, WIDE)), align=4)
        return context.get_dummy_value()
    return types.none(wide_type, out, types.int64), codegen


@intrinsic
def fma_wide(typingctx, acc, a, m, offset):
    """acc + a · m[offset:offset+WIDE] (m C-contiguous float32, offset over all its elements)."""
    _check_c(m, "fma_wide's m")

    def codegen(context, builder, sig, args):
        acc_v, a_v, m_v, off_v = args
        row = builder.load(_pointer(context, builder, sig.args[2], m_v, off_v, _vec(_F32, WIDE)), align=4)
        return _fma(builder, _splat(builder, a_v, WIDE), row, acc_v)
    return wide_type(wide_type, types.float32, m, types.int64), codegen


def _x86(builder, name, result, operand, args):
    f = cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, [operand] * len(args)), name)
    return builder.call(f, args)


def _quad_sums(builder, w8, x, signed_w: bool, wide_x: bool):
    """<32 x i8> weights · 32 activations (i8, or i16 when wide_x) → <8 x i32>, each lane the sum
    of four products (weights unsigned unless signed_w)."""
    if _has_avx2() and not wide_x:
        if signed_w:  # pmaddubsw wants unsigned weights: |w| times x with w's sign (|w| ≤ 128 fits u8)
            x = _x86(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), _vec(_I8, 32), [x, w8])
            w8 = _x86(builder, "llvm.x86.avx2.psign.b", _vec(_I8, 32), _vec(_I8, 32), [w8, w8])
        # Pair sums reach 2·128·127 < 2^15: pmaddubsw's saturation never triggers.
        pairs = _x86(builder, "llvm.x86.avx2.pmadd.ub.sw", _vec(_I16, 16), _vec(_I8, 32), [w8, x])
        return _x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), _vec(_I16, 16),
                    [pairs, _const(_I16, 16, [1] * 16)])
    widen = builder.sext if signed_w else builder.zext
    if _has_avx2():  # int16 activations: pmaddwd on the widened weights, one per 16 elements
        w16 = widen(w8, _vec(_I16, 32))
        halves = [_const(_I32, 16, range(k, k + 16)) for k in (0, 16)]
        return builder.add(*[_x86(builder, "llvm.x86.avx2.pmadd.wd", _vec(_I32, 8), _vec(_I16, 16),
                                  [builder.shuffle_vector(w16, w16, h), builder.shuffle_vector(x, x, h)])
                             for h in halves])
    prod = builder.mul(widen(w8, _vec(_I32, 32)), builder.sext(x, _vec(_I32, 32)))
    quarters = [builder.shuffle_vector(prod, prod, _const(_I32, 8, range(k, k + 32, 4))) for k in range(4)]
    return builder.add(builder.add(quarters[0], quarters[1]), builder.add(quarters[2], quarters[3]))


def _block_dot(w, x, nibbles: bool):
    _check_c(w, "the weight row")
    _check_c(x, "the activation codes")
    if x.dtype not in (types.int8, types.int16):
        raise errors.TypingError(f"activation codes must be int8 or int16, got {x.dtype}")
    wide_x = x.dtype == types.int16
    x_type = _I16 if wide_x else _I8
    sig = lanes_type(lanes_type, w, types.int64, x, types.int64, types.float32)

    def codegen(context, builder, sig, args):
        acc_v, w_v, w_off_v, x_v, x_off_v, scale_v = args
        if nibbles:  # 16 bytes: low nibbles are elements 0-15, high nibbles 16-31 (ggml's Q4 layout)
            q = builder.load(_pointer(context, builder, sig.args[1], w_v, w_off_v, _vec(_I8, 16)), align=1)
            lo = builder.and_(q, _const(_I8, 16, [15] * 16))
            hi = builder.lshr(q, _const(_I8, 16, [4] * 16))
            w8 = builder.shuffle_vector(lo, hi, _const(_I32, 32, range(32)))
        else:  # 32 signed bytes (Q8_0)
            w8 = builder.load(_pointer(context, builder, sig.args[1], w_v, w_off_v, _vec(_I8, 32)), align=1)
        x_v = builder.load(_pointer(context, builder, sig.args[3], x_v, x_off_v, _vec(x_type, 32)), align=1)
        sums = builder.sitofp(_quad_sums(builder, w8, x_v, signed_w=not nibbles, wide_x=wide_x), _vec(_F32, LANES))
        return _fma(builder, sums, _splat(builder, scale_v), acc_v)
    return sig, codegen


@intrinsic
def nibble_dot(typingctx, acc, w, w_off, x, x_off, scale):
    """acc + scale · (the 32 nibbles in w[w_off:w_off+16] · x[x_off:x_off+32]), over 8 lanes."""
    return _block_dot(w, x, nibbles=True)


@intrinsic
def byte_dot(typingctx, acc, w, w_off, x, x_off, scale):
    """acc + scale · (the 32 int8 in w[w_off:w_off+32] · x[x_off:x_off+32]), over 8 lanes."""
    return _block_dot(w, x, nibbles=False)


@intrinsic
def unpack8(typingctx, word, bits, scale, zero, out, offset):
    """out[offset:offset+8] = q_i · scale + zero for the eight codes q_i = (word >> bits·i) &
    (2^bits − 1) of a word of eight bits-wide values (bits ≤ 4), as one vector shift, mask and
    conversion (the scalar loop took about 2 cycles a value). Multiply, then add: the same
    rounding as the scalar formula, not a fused multiply-add."""
    _check_c(out, "unpack8's out")
    if not isinstance(word, types.Integer):
        raise errors.TypingError(f"unpack8's word must be an integer, got {word}")

    def codegen(context, builder, sig, args):
        word_v, bits_v, scale_v, zero_v, out_v, off_v = args
        w32 = builder.trunc(word_v, _I32) if word_v.type.width > 32 else builder.zext(word_v, _I32) \
            if word_v.type.width < 32 else word_v
        b32 = builder.trunc(bits_v, _I32)
        shifts = builder.mul(_splat(builder, b32), _const(_I32, LANES, range(LANES)))
        mask = builder.sub(builder.shl(ir.Constant(_I32, 1), b32), ir.Constant(_I32, 1))
        codes = builder.and_(builder.lshr(_splat(builder, w32), shifts), _splat(builder, mask))
        values = builder.fadd(builder.fmul(builder.uitofp(codes, _vec(_F32, LANES)), _splat(builder, scale_v)),
                              _splat(builder, zero_v))
        builder.store(values, _pointer(context, builder, sig.args[4], out_v, off_v, _vec(_F32, LANES)), align=4)
        return context.get_dummy_value()
    return types.none(word, types.int64, types.float32, types.float32, out, types.int64), codegen

"""Integer block dot products as LLVM vector IR, for the quantized matrix-vector products.

LLVM does not find the good code for "32 packed weights · 32 activations" from Numba's scalar
loops (the per-block scale forces a horizontal sum per block). Written as vector IR it does: the
weights widen to int16, `pmaddwd` multiplies and adds pairs into eight int32 lanes, and eight float
lanes accumulate scale · lanes across blocks, so a row ends in one horizontal sum.

The activations are int16 with a float scale per block of 32 (xqrt.kernels.cpu.quantize_act): a
relative error of 1.5e-5 per element, far below the weights' own rounding, so the products stay
at float precision (llama.cpp's int8 activations cost ~1% per product). Without AVX2 the same
IR is written with generic vector operations, which every LLVM target lowers.
"""
from llvmlite import binding as llvm
from llvmlite import ir
from numba import config, types
from numba.core import cgutils
from numba.extending import intrinsic

_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()
LANES = 8  # float accumulator lanes: an AVX2 register


def _vec(t, n):
    return ir.VectorType(t, n)


def _const(t, n, values):
    return ir.Constant(_vec(t, n), list(values))


def _has_avx2() -> bool:
    return not config.CPU_NAME and bool(llvm.get_host_cpu_features().get("avx2", False))


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


def _block_dot(acc, w, x16, nibbles: bool):
    sig = acc(acc, w, types.int64, x16, types.int64, types.float32)

    def codegen(context, builder, sig, args):
        acc_v, w_v, w_off_v, x_v, x_off_v, scale_v = args
        w_ptr = builder.gep(context.make_array(sig.args[1])(context, builder, w_v).data, [w_off_v])
        x_ptr = builder.gep(context.make_array(sig.args[3])(context, builder, x_v).data, [x_off_v])
        if nibbles:  # 16 bytes: low nibbles are elements 0-15, high nibbles 16-31 (ggml's Q4 layout)
            q = builder.load(builder.bitcast(w_ptr, _vec(_I8, 16).as_pointer()), align=1)
            lo = builder.and_(q, _const(_I8, 16, [15] * 16))
            hi = builder.lshr(q, _const(_I8, 16, [4] * 16))
            w16 = builder.zext(builder.shuffle_vector(lo, hi, _const(_I32, 32, range(32))), _vec(_I16, 32))
        else:  # 32 signed bytes (Q8_0)
            q = builder.load(builder.bitcast(w_ptr, _vec(_I8, 32).as_pointer()), align=1)
            w16 = builder.sext(q, _vec(_I16, 32))
        x16_v = builder.load(builder.bitcast(x_ptr, _vec(_I16, 32).as_pointer()), align=2)
        sums = builder.sitofp(_pair_sums(builder, w16, x16_v), _vec(_F32, LANES))
        undef = ir.Constant(_vec(_F32, LANES), ir.Undefined)
        scale_vec = builder.shuffle_vector(builder.insert_element(undef, scale_v, ir.Constant(_I32, 0)), undef,
                                           _const(_I32, LANES, [0] * LANES))
        total = undef
        for i in range(LANES):
            total = builder.insert_element(total, builder.extract_value(acc_v, i), ir.Constant(_I32, i))
        total = builder.fadd(total, builder.fmul(sums, scale_vec))
        out = context.get_constant_undef(sig.return_type)
        for i in range(LANES):
            out = builder.insert_value(out, builder.extract_element(total, ir.Constant(_I32, i)), i)
        return out
    return sig, codegen


@intrinsic
def nibble_dot(typingctx, acc, w, w_off, x16, x_off, scale):
    """acc + scale · (the 32 nibbles in w[w_off:w_off+16] · x16[x_off:x_off+32]), over 8 lanes."""
    return _block_dot(acc, w, x16, nibbles=True)


@intrinsic
def byte_dot(typingctx, acc, w, w_off, x16, x_off, scale):
    """acc + scale · (the 32 int8 in w[w_off:w_off+32] · x16[x_off:x_off+32]), over 8 lanes."""
    return _block_dot(acc, w, x16, nibbles=False)

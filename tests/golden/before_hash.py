# ruff: noqa
# Golden TensorIR, case 'before_hash': schedule 'before', kernel 'hash'
# shapes: KernelShapes(d_in=64, d_out=32, tables=8, bits=4, block_size=32, repeats=1, table_dtype='float32')
# target: llvm -mtriple=x86_64-linux-gnu -mcpu=znver3 -num-cores=2 (numerics only)
# Written by tests/test_schedule_golden.py; do not edit. Regenerate only for an
# intended change, then review the diff: LOOKUPC_REGEN_GOLDEN=1 python -m pytest tests/test_schedule_golden.py
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(x: T.Buffer(("n", 64), "float32"), weight: T.Buffer((1, 4, 2, 32, 32), "float32"), hash_bias: T.Buffer((32,), "float32"), decay: T.float32, code: T.Buffer(((n + 15) // 16 * 16, 8), "int32"), score: T.Buffer(((n + 15) // 16 * 16, 8), "float32")):
        n = T.int32()
        T.func_attr({"global_symbol": "hash", "tirx.noalias": True})
        # with T.sblock("root"):
        pad = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 64))
        bmm0 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        fwht0_0 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        bmm1 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        fwht1_0 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        bmm2 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        fwht2_0 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        bmm3 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        fwht3_0 = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32))
        mix = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 4, 8))
        sabs = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 8))
        den = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 8))
        for i, c in T.grid((n + 15) // 16 * 16, 64):
            with T.sblock("pad"):
                v_i, v_c = T.axis.remap("SS", [i, c])
                T.reads(x[T.min(v_i, n - 1), v_c])
                T.writes(pad[v_i, v_c])
                pad[v_i, v_c] = T.if_then_else(v_c < 64, x[T.min(v_i, n - 1), v_c], T.float32(0.0))
        for i, r, b, o, k in T.grid((n + 15) // 16 * 16, 1, 2, 32, 32):
            with T.sblock("bmm0"):
                v_i, v_r, v_b, v_o, v_k = T.axis.remap("SSSSR", [i, r, b, o, k])
                T.reads(weight[v_r, 0, v_b, v_k, v_o], pad[v_i, v_b * 32 + v_k])
                T.writes(bmm0[v_i, v_r, v_b, v_o])
                with T.init():
                    bmm0[v_i, v_r, v_b, v_o] = T.float32(0.0)
                bmm0[v_i, v_r, v_b, v_o] = bmm0[v_i, v_r, v_b, v_o] + weight[v_r, 0, v_b, v_k, v_o] * pad[v_i, v_b * 32 + v_k]
        for i, r, b, o in T.grid((n + 15) // 16 * 16, 1, 2, 32):
            with T.sblock("fwht0_0"):
                v_i, v_r, v_b, v_o = T.axis.remap("SSSS", [i, r, b, o])
                T.reads(bmm0[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                T.writes(fwht0_0[v_i, v_r, v_b, v_o])
                fwht0_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm0[v_i, v_r, v_b // 2 * 2, v_o] + bmm0[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm0[v_i, v_r, v_b // 2 * 2, v_o] - bmm0[v_i, v_r, v_b // 2 * 2 + 1, v_o])
        for i, r, b, o, k in T.grid((n + 15) // 16 * 16, 1, 2, 32, 32):
            with T.sblock("bmm1"):
                v_i, v_r, v_b, v_o, v_k = T.axis.remap("SSSSR", [i, r, b, o, k])
                T.reads(weight[v_r, 1, v_b, v_k, v_o], fwht0_0[v_i, v_r, v_b, v_k])
                T.writes(bmm1[v_i, v_r, v_b, v_o])
                with T.init():
                    bmm1[v_i, v_r, v_b, v_o] = T.float32(0.0)
                bmm1[v_i, v_r, v_b, v_o] = bmm1[v_i, v_r, v_b, v_o] + weight[v_r, 1, v_b, v_k, v_o] * fwht0_0[v_i, v_r, v_b, v_k]
        for i, r, b, o in T.grid((n + 15) // 16 * 16, 1, 2, 32):
            with T.sblock("fwht1_0"):
                v_i, v_r, v_b, v_o = T.axis.remap("SSSS", [i, r, b, o])
                T.reads(bmm1[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                T.writes(fwht1_0[v_i, v_r, v_b, v_o])
                fwht1_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm1[v_i, v_r, v_b // 2 * 2, v_o] + bmm1[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm1[v_i, v_r, v_b // 2 * 2, v_o] - bmm1[v_i, v_r, v_b // 2 * 2 + 1, v_o])
        for i, r, b, o, k in T.grid((n + 15) // 16 * 16, 1, 2, 32, 32):
            with T.sblock("bmm2"):
                v_i, v_r, v_b, v_o, v_k = T.axis.remap("SSSSR", [i, r, b, o, k])
                T.reads(weight[v_r, 2, v_b, v_k, v_o], fwht1_0[v_i, v_r, v_b, v_k])
                T.writes(bmm2[v_i, v_r, v_b, v_o])
                with T.init():
                    bmm2[v_i, v_r, v_b, v_o] = T.float32(0.0)
                bmm2[v_i, v_r, v_b, v_o] = bmm2[v_i, v_r, v_b, v_o] + weight[v_r, 2, v_b, v_k, v_o] * fwht1_0[v_i, v_r, v_b, v_k]
        for i, r, b, o in T.grid((n + 15) // 16 * 16, 1, 2, 32):
            with T.sblock("fwht2_0"):
                v_i, v_r, v_b, v_o = T.axis.remap("SSSS", [i, r, b, o])
                T.reads(bmm2[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                T.writes(fwht2_0[v_i, v_r, v_b, v_o])
                fwht2_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm2[v_i, v_r, v_b // 2 * 2, v_o] + bmm2[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm2[v_i, v_r, v_b // 2 * 2, v_o] - bmm2[v_i, v_r, v_b // 2 * 2 + 1, v_o])
        for i, r, b, o, k in T.grid((n + 15) // 16 * 16, 1, 2, 32, 32):
            with T.sblock("bmm3"):
                v_i, v_r, v_b, v_o, v_k = T.axis.remap("SSSSR", [i, r, b, o, k])
                T.reads(weight[v_r, 3, v_b, v_k, v_o], fwht2_0[v_i, v_r, v_b, v_k])
                T.writes(bmm3[v_i, v_r, v_b, v_o])
                with T.init():
                    bmm3[v_i, v_r, v_b, v_o] = T.float32(0.0)
                bmm3[v_i, v_r, v_b, v_o] = bmm3[v_i, v_r, v_b, v_o] + weight[v_r, 3, v_b, v_k, v_o] * fwht2_0[v_i, v_r, v_b, v_k]
        for i, r, b, o in T.grid((n + 15) // 16 * 16, 1, 2, 32):
            with T.sblock("fwht3_0"):
                v_i, v_r, v_b, v_o = T.axis.remap("SSSS", [i, r, b, o])
                T.reads(bmm3[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                T.writes(fwht3_0[v_i, v_r, v_b, v_o])
                fwht3_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm3[v_i, v_r, v_b // 2 * 2, v_o] + bmm3[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm3[v_i, v_r, v_b // 2 * 2, v_o] - bmm3[v_i, v_r, v_b // 2 * 2 + 1, v_o])
        for i, b, t in T.grid((n + 15) // 16 * 16, 4, 8):
            with T.sblock("mix"):
                v_i, v_b, v_t = T.axis.remap("SSS", [i, b, t])
                T.reads(fwht3_0[v_i, (v_t * 4 + v_b) // 64, (v_t * 4 + v_b) % 64 // 32, (v_t * 4 + v_b) % 32], pad[v_i, (v_t * 4 + v_b) % 64], hash_bias[v_t * 4 + v_b])
                T.writes(mix[v_i, v_b, v_t])
                mix[v_i, v_b, v_t] = decay * fwht3_0[v_i, (v_t * 4 + v_b) // 64, (v_t * 4 + v_b) % 64 // 32, (v_t * 4 + v_b) % 32] + (T.float32(1.0) - decay) * pad[v_i, (v_t * 4 + v_b) % 64] + hash_bias[v_t * 4 + v_b]
        for i, t, bit in T.grid((n + 15) // 16 * 16, 8, 4):
            with T.sblock("code"):
                v_i, v_t, v_bit = T.axis.remap("SSR", [i, t, bit])
                T.reads(mix[v_i, v_bit, v_t])
                T.writes(code[v_i, v_t])
                with T.init():
                    code[v_i, v_t] = 0
                code[v_i, v_t] = code[v_i, v_t] + (T.Cast("int32", T.float32(0.0) < mix[v_i, v_bit, v_t]) << 3 - v_bit)
        for i, t, b2 in T.grid((n + 15) // 16 * 16, 8, 4):
            with T.sblock("sabs"):
                v_i, v_t, v_b2 = T.axis.remap("SSR", [i, t, b2])
                T.reads(mix[v_i, v_b2, v_t])
                T.writes(sabs[v_i, v_t])
                with T.init():
                    sabs[v_i, v_t] = T.float32(0.0)
                sabs[v_i, v_t] = sabs[v_i, v_t] + T.fabs(mix[v_i, v_b2, v_t])
        for i, t, b3 in T.grid((n + 15) // 16 * 16, 8, 4):
            with T.sblock("den"):
                v_i, v_t, v_b3 = T.axis.remap("SSR", [i, t, b3])
                T.reads(mix[v_i, v_b3, v_t])
                T.writes(den[v_i, v_t])
                with T.init():
                    den[v_i, v_t] = T.float32(1.0)
                den[v_i, v_t] = den[v_i, v_t] * (T.float32(1.0) + (((((((T.float32(0.00019841269841269841) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.0013888888888888889)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.0083333333333333332)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.041666666666666664)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.16666666666666666)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.5)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(1.0)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(1.0)) * T.reinterpret("float32", T.Cast("int32", T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5))) + 127 << 23))
        for i, t in T.grid((n + 15) // 16 * 16, 8):
            with T.sblock("score"):
                v_i, v_t = T.axis.remap("SS", [i, t])
                T.reads(sabs[v_i, v_t], den[v_i, v_t])
                T.writes(score[v_i, v_t])
                score[v_i, v_t] = sabs[v_i, v_t] / den[v_i, v_t]
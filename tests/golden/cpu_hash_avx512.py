# ruff: noqa
# Golden TensorIR, case 'cpu_hash_avx512': schedule 'cpu', kernel 'hash'
# shapes: KernelShapes(d_in=64, d_out=32, tables=8, bits=4, block_size=32, repeats=1, table_dtype='float32')
# target: llvm -mtriple=x86_64-linux-gnu -mcpu=znver4 -num-cores=2
# knobs: hash_knobs=HashKnobs(tile=16, rows=4, cols=16)
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
        pad = T.sblock_alloc_buffer((2, (n + 15) // 16 * 16, 32))
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
        hash_bias_global = T.sblock_alloc_buffer((4, 8))
        bmm0_local = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32), scope="local")
        bmm1_local = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32), scope="local")
        bmm2_local = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32), scope="local")
        bmm3_local = T.sblock_alloc_buffer(((n + 15) // 16 * 16, 1, 2, 32), scope="local")
        for ax0 in range(32):
            with T.sblock("hash_bias_global"):
                v0 = T.axis.spatial(32, ax0)
                T.reads(hash_bias[v0])
                T.writes(hash_bias_global[v0 % 4, v0 // 4])
                hash_bias_global[v0 % 4, v0 // 4] = hash_bias[v0]
        for i_0 in T.parallel((n + 15) // 16):
            for ax0, ax1_0 in T.grid(16, 4):
                for ax1_1 in T.vectorized(16):
                    with T.sblock("pad"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                        v_c = T.axis.spatial(64, ax1_0 * 16 + ax1_1)
                        T.reads(x[T.min(v_i, n - 1), v_c])
                        T.writes(pad[v_c // 32, v_i, v_c % 32])
                        pad[v_c // 32, v_i, v_c % 32] = T.if_then_else(v_c < 64, x[T.min(v_i, n - 1), v_c], T.float32(0.0))
            for ax1, ax0_0, ax2_0 in T.grid(2, 4, 2):
                for ax0_1_init in T.unroll(4):
                    for ax2_1_0_init in T.unroll(1):
                        for ax2_1_1_init in T.vectorized(16):
                            with T.sblock("bmm0_init"):
                                v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1_init)
                                v_r = T.axis.spatial(1, 0)
                                v_b = T.axis.spatial(2, ax1)
                                v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0_init * 16 + ax2_1_1_init)
                                T.reads()
                                T.writes(bmm0_local[v_i, v_r, v_b, v_o])
                                bmm0_local[v_i, v_r, v_b, v_o] = T.float32(0.0)
                for ax3 in range(32):
                    for ax0_1 in T.unroll(4):
                        for ax2_1_0 in T.unroll(1):
                            for ax2_1_1 in T.vectorized(16):
                                with T.sblock("bmm0_update"):
                                    v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1)
                                    v_r = T.axis.spatial(1, 0)
                                    v_b = T.axis.spatial(2, ax1)
                                    v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0 * 16 + ax2_1_1)
                                    v_k = T.axis.reduce(32, ax3)
                                    T.reads(bmm0_local[v_i, v_r, v_b, v_o], weight[v_r, 0, v_b, v_k, v_o], pad[v_b, v_i, v_k])
                                    T.writes(bmm0_local[v_i, v_r, v_b, v_o])
                                    bmm0_local[v_i, v_r, v_b, v_o] = bmm0_local[v_i, v_r, v_b, v_o] + weight[v_r, 0, v_b, v_k, v_o] * pad[v_b, v_i, v_k]
                for ax0 in T.unroll(4):
                    for ax1_0 in T.unroll(1):
                        for ax1_1 in T.vectorized(16):
                            with T.sblock("bmm0_local"):
                                v0 = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0)
                                v1 = T.axis.spatial(1, 0)
                                v2 = T.axis.spatial(2, ax1)
                                v3 = T.axis.spatial(32, ax2_0 * 16 + ax1_0 * 16 + ax1_1)
                                T.reads(bmm0_local[v0, v1, v2, v3])
                                T.writes(bmm0[v0, v1, v2, v3])
                                bmm0[v0, v1, v2, v3] = bmm0_local[v0, v1, v2, v3]
            for ax0, ax1, ax2_0 in T.grid(16, 2, 2):
                for ax2_1 in T.vectorized(16):
                    with T.sblock("fwht0_0"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                        v_r = T.axis.spatial(1, 0)
                        v_b = T.axis.spatial(2, ax1)
                        v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1)
                        T.reads(bmm0[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                        T.writes(fwht0_0[v_i, v_r, v_b, v_o])
                        fwht0_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm0[v_i, v_r, v_b // 2 * 2, v_o] + bmm0[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm0[v_i, v_r, v_b // 2 * 2, v_o] - bmm0[v_i, v_r, v_b // 2 * 2 + 1, v_o])
            for ax1, ax0_0, ax2_0 in T.grid(2, 4, 2):
                for ax0_1_init in T.unroll(4):
                    for ax2_1_0_init in T.unroll(1):
                        for ax2_1_1_init in T.vectorized(16):
                            with T.sblock("bmm1_init"):
                                v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1_init)
                                v_r = T.axis.spatial(1, 0)
                                v_b = T.axis.spatial(2, ax1)
                                v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0_init * 16 + ax2_1_1_init)
                                T.reads()
                                T.writes(bmm1_local[v_i, v_r, v_b, v_o])
                                bmm1_local[v_i, v_r, v_b, v_o] = T.float32(0.0)
                for ax3 in range(32):
                    for ax0_1 in T.unroll(4):
                        for ax2_1_0 in T.unroll(1):
                            for ax2_1_1 in T.vectorized(16):
                                with T.sblock("bmm1_update"):
                                    v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1)
                                    v_r = T.axis.spatial(1, 0)
                                    v_b = T.axis.spatial(2, ax1)
                                    v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0 * 16 + ax2_1_1)
                                    v_k = T.axis.reduce(32, ax3)
                                    T.reads(bmm1_local[v_i, v_r, v_b, v_o], weight[v_r, 1, v_b, v_k, v_o], fwht0_0[v_i, v_r, v_b, v_k])
                                    T.writes(bmm1_local[v_i, v_r, v_b, v_o])
                                    bmm1_local[v_i, v_r, v_b, v_o] = bmm1_local[v_i, v_r, v_b, v_o] + weight[v_r, 1, v_b, v_k, v_o] * fwht0_0[v_i, v_r, v_b, v_k]
                for ax0 in T.unroll(4):
                    for ax1_0 in T.unroll(1):
                        for ax1_1 in T.vectorized(16):
                            with T.sblock("bmm1_local"):
                                v0 = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0)
                                v1 = T.axis.spatial(1, 0)
                                v2 = T.axis.spatial(2, ax1)
                                v3 = T.axis.spatial(32, ax2_0 * 16 + ax1_0 * 16 + ax1_1)
                                T.reads(bmm1_local[v0, v1, v2, v3])
                                T.writes(bmm1[v0, v1, v2, v3])
                                bmm1[v0, v1, v2, v3] = bmm1_local[v0, v1, v2, v3]
            for ax0, ax1, ax2_0 in T.grid(16, 2, 2):
                for ax2_1 in T.vectorized(16):
                    with T.sblock("fwht1_0"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                        v_r = T.axis.spatial(1, 0)
                        v_b = T.axis.spatial(2, ax1)
                        v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1)
                        T.reads(bmm1[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                        T.writes(fwht1_0[v_i, v_r, v_b, v_o])
                        fwht1_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm1[v_i, v_r, v_b // 2 * 2, v_o] + bmm1[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm1[v_i, v_r, v_b // 2 * 2, v_o] - bmm1[v_i, v_r, v_b // 2 * 2 + 1, v_o])
            for ax1, ax0_0, ax2_0 in T.grid(2, 4, 2):
                for ax0_1_init in T.unroll(4):
                    for ax2_1_0_init in T.unroll(1):
                        for ax2_1_1_init in T.vectorized(16):
                            with T.sblock("bmm2_init"):
                                v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1_init)
                                v_r = T.axis.spatial(1, 0)
                                v_b = T.axis.spatial(2, ax1)
                                v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0_init * 16 + ax2_1_1_init)
                                T.reads()
                                T.writes(bmm2_local[v_i, v_r, v_b, v_o])
                                bmm2_local[v_i, v_r, v_b, v_o] = T.float32(0.0)
                for ax3 in range(32):
                    for ax0_1 in T.unroll(4):
                        for ax2_1_0 in T.unroll(1):
                            for ax2_1_1 in T.vectorized(16):
                                with T.sblock("bmm2_update"):
                                    v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1)
                                    v_r = T.axis.spatial(1, 0)
                                    v_b = T.axis.spatial(2, ax1)
                                    v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0 * 16 + ax2_1_1)
                                    v_k = T.axis.reduce(32, ax3)
                                    T.reads(bmm2_local[v_i, v_r, v_b, v_o], weight[v_r, 2, v_b, v_k, v_o], fwht1_0[v_i, v_r, v_b, v_k])
                                    T.writes(bmm2_local[v_i, v_r, v_b, v_o])
                                    bmm2_local[v_i, v_r, v_b, v_o] = bmm2_local[v_i, v_r, v_b, v_o] + weight[v_r, 2, v_b, v_k, v_o] * fwht1_0[v_i, v_r, v_b, v_k]
                for ax0 in T.unroll(4):
                    for ax1_0 in T.unroll(1):
                        for ax1_1 in T.vectorized(16):
                            with T.sblock("bmm2_local"):
                                v0 = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0)
                                v1 = T.axis.spatial(1, 0)
                                v2 = T.axis.spatial(2, ax1)
                                v3 = T.axis.spatial(32, ax2_0 * 16 + ax1_0 * 16 + ax1_1)
                                T.reads(bmm2_local[v0, v1, v2, v3])
                                T.writes(bmm2[v0, v1, v2, v3])
                                bmm2[v0, v1, v2, v3] = bmm2_local[v0, v1, v2, v3]
            for ax0, ax1, ax2_0 in T.grid(16, 2, 2):
                for ax2_1 in T.vectorized(16):
                    with T.sblock("fwht2_0"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                        v_r = T.axis.spatial(1, 0)
                        v_b = T.axis.spatial(2, ax1)
                        v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1)
                        T.reads(bmm2[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                        T.writes(fwht2_0[v_i, v_r, v_b, v_o])
                        fwht2_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm2[v_i, v_r, v_b // 2 * 2, v_o] + bmm2[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm2[v_i, v_r, v_b // 2 * 2, v_o] - bmm2[v_i, v_r, v_b // 2 * 2 + 1, v_o])
            for ax1, ax0_0, ax2_0 in T.grid(2, 4, 2):
                for ax0_1_init in T.unroll(4):
                    for ax2_1_0_init in T.unroll(1):
                        for ax2_1_1_init in T.vectorized(16):
                            with T.sblock("bmm3_init"):
                                v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1_init)
                                v_r = T.axis.spatial(1, 0)
                                v_b = T.axis.spatial(2, ax1)
                                v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0_init * 16 + ax2_1_1_init)
                                T.reads()
                                T.writes(bmm3_local[v_i, v_r, v_b, v_o])
                                bmm3_local[v_i, v_r, v_b, v_o] = T.float32(0.0)
                for ax3 in range(32):
                    for ax0_1 in T.unroll(4):
                        for ax2_1_0 in T.unroll(1):
                            for ax2_1_1 in T.vectorized(16):
                                with T.sblock("bmm3_update"):
                                    v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0_1)
                                    v_r = T.axis.spatial(1, 0)
                                    v_b = T.axis.spatial(2, ax1)
                                    v_o = T.axis.spatial(32, ax2_0 * 16 + ax2_1_0 * 16 + ax2_1_1)
                                    v_k = T.axis.reduce(32, ax3)
                                    T.reads(bmm3_local[v_i, v_r, v_b, v_o], weight[v_r, 3, v_b, v_k, v_o], fwht2_0[v_i, v_r, v_b, v_k])
                                    T.writes(bmm3_local[v_i, v_r, v_b, v_o])
                                    bmm3_local[v_i, v_r, v_b, v_o] = bmm3_local[v_i, v_r, v_b, v_o] + weight[v_r, 3, v_b, v_k, v_o] * fwht2_0[v_i, v_r, v_b, v_k]
                for ax0 in T.unroll(4):
                    for ax1_0 in T.unroll(1):
                        for ax1_1 in T.vectorized(16):
                            with T.sblock("bmm3_local"):
                                v0 = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0_0 * 4 + ax0)
                                v1 = T.axis.spatial(1, 0)
                                v2 = T.axis.spatial(2, ax1)
                                v3 = T.axis.spatial(32, ax2_0 * 16 + ax1_0 * 16 + ax1_1)
                                T.reads(bmm3_local[v0, v1, v2, v3])
                                T.writes(bmm3[v0, v1, v2, v3])
                                bmm3[v0, v1, v2, v3] = bmm3_local[v0, v1, v2, v3]
            for ax0, ax1_0 in T.grid(16, 2):
                for ax1_1 in T.vectorized(16):
                    with T.sblock("fwht3_0"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                        v_r = T.axis.spatial(1, 0)
                        v_b = T.axis.spatial(2, 0)
                        v_o = T.axis.spatial(32, ax1_0 * 16 + ax1_1)
                        T.reads(bmm3[v_i, v_r, v_b // 2 * 2:v_b // 2 * 2 + 2, v_o])
                        T.writes(fwht3_0[v_i, v_r, v_b, v_o])
                        fwht3_0[v_i, v_r, v_b, v_o] = T.if_then_else(v_b % 2 == 0, bmm3[v_i, v_r, v_b // 2 * 2, v_o] + bmm3[v_i, v_r, v_b // 2 * 2 + 1, v_o], bmm3[v_i, v_r, v_b // 2 * 2, v_o] - bmm3[v_i, v_r, v_b // 2 * 2 + 1, v_o])
            for i_1, b, t_0 in T.grid(16, 4, 1):
                for t_1 in T.vectorized(8):
                    with T.sblock("mix"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + i_1)
                        v_b = T.axis.spatial(4, b)
                        v_t = T.axis.spatial(8, t_0 * 8 + t_1)
                        T.reads(fwht3_0[v_i, (v_t * 4 + v_b) // 64, (v_t * 4 + v_b) % 64 // 32, (v_t * 4 + v_b) % 32], pad[(v_t * 4 + v_b) % 64 // 32, v_i, (v_t * 4 + v_b) % 32], hash_bias_global[v_b, v_t])
                        T.writes(mix[v_i, v_b, v_t])
                        mix[v_i, v_b, v_t] = decay * fwht3_0[v_i, (v_t * 4 + v_b) // 64, (v_t * 4 + v_b) % 64 // 32, (v_t * 4 + v_b) % 32] + (T.float32(1.0) - decay) * pad[(v_t * 4 + v_b) % 64 // 32, v_i, (v_t * 4 + v_b) % 32] + hash_bias_global[v_b, v_t]
            for ax0 in range(16):
                for ax1_0_init in range(1):
                    for ax1_1_init in T.vectorized(8):
                        with T.sblock("code_init"):
                            v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                            v_t = T.axis.spatial(8, ax1_0_init * 8 + ax1_1_init)
                            T.reads()
                            T.writes(code[v_i, v_t])
                            code[v_i, v_t] = 0
                for ax2, ax1_0 in T.grid(4, 1):
                    for ax1_1 in T.vectorized(8):
                        with T.sblock("code_update"):
                            v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                            v_t = T.axis.spatial(8, ax1_0 * 8 + ax1_1)
                            v_bit = T.axis.reduce(4, ax2)
                            T.reads(code[v_i, v_t], mix[v_i, v_bit, v_t])
                            T.writes(code[v_i, v_t])
                            code[v_i, v_t] = code[v_i, v_t] + (T.Cast("int32", T.float32(0.0) < mix[v_i, v_bit, v_t]) << 3 - v_bit)
            for ax0 in range(16):
                for ax1_0_init in range(1):
                    for ax1_1_init in T.vectorized(8):
                        with T.sblock("sabs_init"):
                            v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                            v_t = T.axis.spatial(8, ax1_0_init * 8 + ax1_1_init)
                            T.reads()
                            T.writes(sabs[v_i, v_t])
                            sabs[v_i, v_t] = T.float32(0.0)
                for ax2, ax1_0 in T.grid(4, 1):
                    for ax1_1 in T.vectorized(8):
                        with T.sblock("sabs_update"):
                            v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                            v_t = T.axis.spatial(8, ax1_0 * 8 + ax1_1)
                            v_b2 = T.axis.reduce(4, ax2)
                            T.reads(sabs[v_i, v_t], mix[v_i, v_b2, v_t])
                            T.writes(sabs[v_i, v_t])
                            sabs[v_i, v_t] = sabs[v_i, v_t] + T.fabs(mix[v_i, v_b2, v_t])
            for ax0 in range(16):
                for ax1_0_init in range(1):
                    for ax1_1_init in T.vectorized(8):
                        with T.sblock("den_init"):
                            v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                            v_t = T.axis.spatial(8, ax1_0_init * 8 + ax1_1_init)
                            T.reads()
                            T.writes(den[v_i, v_t])
                            den[v_i, v_t] = T.float32(1.0)
                for ax2, ax1_0 in T.grid(4, 1):
                    for ax1_1 in T.vectorized(8):
                        with T.sblock("den_update"):
                            v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                            v_t = T.axis.spatial(8, ax1_0 * 8 + ax1_1)
                            v_b3 = T.axis.reduce(4, ax2)
                            T.reads(den[v_i, v_t], mix[v_i, v_b3, v_t])
                            T.writes(den[v_i, v_t])
                            den[v_i, v_t] = den[v_i, v_t] * (T.float32(1.0) + (((((((T.float32(0.00019841269841269841) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.0013888888888888889)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.0083333333333333332)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.041666666666666664)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.16666666666666666)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(0.5)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(1.0)) * (T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) - T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5)) * T.float32(0.69314718055994529)) + T.float32(1.0)) * T.reinterpret("float32", T.Cast("int32", T.floor(T.max(T.float32(-2.0) * T.fabs(mix[v_i, v_b3, v_t]), T.float32(-87.0)) * T.float32(1.4426950408889634) + T.float32(0.5))) + 127 << 23))
            for ax0, ax1_0 in T.grid(16, 1):
                for ax1_1 in T.vectorized(8):
                    with T.sblock("score"):
                        v_i = T.axis.spatial((n + 15) // 16 * 16, i_0 * 16 + ax0)
                        v_t = T.axis.spatial(8, ax1_0 * 8 + ax1_1)
                        T.reads(sabs[v_i, v_t], den[v_i, v_t])
                        T.writes(score[v_i, v_t])
                        score[v_i, v_t] = sabs[v_i, v_t] / den[v_i, v_t]
# ruff: noqa
# Golden TensorIR, case 'cpu_gather_register_int8_avx2': schedule 'cpu', kernel 'gather'
# shapes: KernelShapes(d_in=64, d_out=32, tables=8, bits=4, block_size=32, repeats=1, table_dtype='int8')
# target: llvm -mtriple=x86_64-linux-gnu -mcpu=znver3 -num-cores=2
# knobs: gather_knobs=GatherKnobs(kb=4, cols=32)
# Written by tests/test_schedule_golden.py; do not edit. Regenerate only for an
# intended change, then review the diff: LOOKUPC_REGEN_GOLDEN=1 python -m pytest tests/test_schedule_golden.py
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(codes: T.Buffer(("n", 8), "int32"), scores: T.Buffer((n, 8), "float32"), tables: T.Buffer((8, 16, 32), "int8"), scale: T.Buffer((8, 16), "float32"), bias: T.Buffer((32,), "float32"), y: T.Buffer((n, 32), "float32")):
        n = T.int32()
        T.func_attr({"global_symbol": "gather", "tirx.noalias": True})
        # with T.sblock("root"):
        y_local = T.sblock_alloc_buffer((n, 32), scope="local")
        for i_0 in T.parallel((n + 31) // 32):
            for c_0, i_1 in T.grid(1, 32):
                for c_1_0_init in T.unroll(4):
                    for c_1_1_init in T.vectorized(8):
                        with T.sblock("gather_init"):
                            vi = T.axis.spatial(n, i_0 * 32 + i_1)
                            vc = T.axis.spatial(32, c_0 * 32 + c_1_0_init * 8 + c_1_1_init)
                            T.where(i_0 * 32 + i_1 < n)
                            T.reads()
                            T.writes(y_local[vi, vc])
                            y_local[vi, vc] = bias[vc]
                for k in range(8):
                    for c_1_0 in T.unroll(4):
                        for c_1_1 in T.vectorized(8):
                            with T.sblock("gather_update"):
                                vi = T.axis.spatial(n, i_0 * 32 + i_1)
                                vc = T.axis.spatial(32, c_0 * 32 + c_1_0 * 8 + c_1_1)
                                vk = T.axis.reduce(8, k)
                                T.where(i_0 * 32 + i_1 < n)
                                T.reads(y_local[vi, vc], bias[vc], scores[vi, vk], scale[vk, 0:16], codes[vi, vk], tables[vk, 0:16, vc])
                                T.writes(y_local[vi, vc])
                                y_local[vi, vc] = y_local[vi, vc] + scores[vi, vk] * scale[vk, codes[vi, vk] & 15] * T.Cast("float32", tables[vk, codes[vi, vk] & 15, vc])
                for ax0_0 in range(4):
                    for ax0_1 in T.vectorized(8):
                        with T.sblock("y_local"):
                            v0 = T.axis.spatial(n, i_0 * 32 + i_1)
                            v1 = T.axis.spatial(32, ax0_0 * 8 + ax0_1)
                            T.where(i_0 * 32 + i_1 < n)
                            T.reads(y_local[v0, v1])
                            T.writes(y[v0, v1])
                            y[v0, v1] = y_local[v0, v1]
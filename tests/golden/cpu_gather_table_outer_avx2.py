# ruff: noqa
# Golden TensorIR, case 'cpu_gather_table_outer_avx2': schedule 'cpu', kernel 'gather'
# shapes: KernelShapes(d_in=64, d_out=32, tables=8, bits=12, block_size=32, repeats=2, table_dtype='float32')
# target: llvm -mtriple=x86_64-linux-gnu -mcpu=znver3 -num-cores=2
# knobs: gather_knobs=GatherKnobs(kb=4, cols=0)
# Written by tests/test_schedule_golden.py; do not edit. Regenerate only for an
# intended change, then review the diff: LOOKUPC_REGEN_GOLDEN=1 python -m pytest tests/test_schedule_golden.py
# from tvm.script import ir as I
# from tvm.script import tirx as T
# from tvm.tirx.layout import Axis

@I.ir_module
class Module:
    @T.prim_func(s_tir=True)
    def main(codes: T.Buffer(("n", 8), "int32"), scores: T.Buffer((n, 8), "float32"), tables: T.Buffer((8, 4096, 32), "float32"), bias: T.Buffer((32,), "float32"), y: T.Buffer((n, 32), "float32")):
        n = T.int32()
        T.func_attr({"global_symbol": "gather", "tirx.noalias": True})
        # with T.sblock("root"):
        for i_init in T.parallel(n):
            for c_0_init in range(4):
                for c_1_init in T.vectorized(8):
                    with T.sblock("gather_init"):
                        vi = T.axis.spatial(n, i_init)
                        vc = T.axis.spatial(32, c_0_init * 8 + c_1_init)
                        T.reads()
                        T.writes(y[vi, vc])
                        y[vi, vc] = bias[vc]
        for k_0 in range(2):
            for i in T.parallel(n):
                for k_1, c_0 in T.grid(4, 4):
                    for c_1 in T.vectorized(8):
                        with T.sblock("gather_update"):
                            vi = T.axis.spatial(n, i)
                            vc = T.axis.spatial(32, c_0 * 8 + c_1)
                            vk = T.axis.reduce(8, k_0 * 4 + k_1)
                            T.reads(y[vi, vc], bias[vc], scores[vi, vk], tables[vk, 0:4096, vc], codes[vi, vk])
                            T.writes(y[vi, vc])
                            y[vi, vc] = y[vi, vc] + scores[vi, vk] * tables[vk, codes[vi, vk] & 4095, vc]
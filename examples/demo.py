"""Demo: a LookupFFN at the paper's configuration next to the dense FFN it replaces."""

import torch

import lookupc


def main() -> None:
    cfg = lookupc.LookupConfig(tables=128, bits=8, block_size=64)
    ffn = lookupc.LookupFFN(512, 512, cfg).eval()
    dense = lookupc.dense_ffn_flops(512, 2048, 512)
    print(f"dense FFN 512->2048->512: {dense:,} FLOPs/token")
    print(f"LookupFFN {cfg}: {ffn.flops_per_token():,} FLOPs/token "
          f"({dense / ffn.flops_per_token():.2f}x fewer), tables {ffn.table_bytes() / 2**20:.0f} MiB")
    with torch.no_grad():
        y = ffn(torch.randn(2, 16, 512))
    print("output", tuple(y.shape), "finite:", bool(torch.isfinite(y).all()))


if __name__ == "__main__":
    main()

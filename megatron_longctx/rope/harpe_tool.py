"""Print the HARPE RoPE base set for given settings (one base per KV group / head).

Example (the paper's Llama-2-7B setting; compares with the paper's published list):
    python tools/harpe_bases.py --scheme peak_valley --count 32 --head-dim 128 \
        --base-min 1e6 --base-max 5e6 --stride 3e4 --plot harpe_bases.png
"""

import argparse

from megatron_longctx.rope.harpe import (
    PAPER_BASES_LLAMA2_7B,
    extrema,
    harpe_bases,
    waveform,
)
from megatron_longctx.rope.methods import HARPE_SCHEMES


def plot(bases: list[float], dim: int, path: str, positions: int = 300) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    for b in bases[:: max(1, len(bases) // 6)]:
        w = waveform(b, dim, positions)
        peaks, valleys = extrema(w)
        line, = ax.plot(w, lw=0.9, label=f"base {b / 1e6:.2f}M")
        ax.plot(peaks, w[peaks], "^", ms=3, color=line.get_color())
        ax.plot(valleys, w[valleys], "v", ms=3, color=line.get_color())
    ax.set_xlabel("relative position m")
    ax.set_ylabel(r"$(2/\sqrt{d})\sum_j \cos(m\,b^{-2j/d})$")
    ax.set_title(f"RoPE attention waveforms of HARPE bases (d={dim}); ^ peaks, v valleys")
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scheme", choices=HARPE_SCHEMES, default="peak_valley")
    parser.add_argument("--count", type=int, default=32, help="heads (KV groups with GQA)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--base-min", type=float, default=1e6)
    parser.add_argument("--base-max", type=float, default=5e6)
    parser.add_argument("--stride", type=float, default=3e4)
    parser.add_argument("--plot", help="write a PNG of the waveforms with peaks and valleys")
    args = parser.parse_args(argv)
    bases = harpe_bases(args.scheme, args.count, args.base_min, args.base_max, args.stride,
                        args.head_dim)
    print("harpe_bases:", ", ".join(f"{b:.6g}" for b in bases))
    paper_setting = (args.scheme, args.count, args.head_dim, args.base_min, args.base_max,
                     args.stride) == ("peak_valley", 32, 128, 1e6, 5e6, 3e4)
    if paper_setting:
        ours = {round(b / 1e4) for b in bases}
        paper = {round(b / 1e4) for b in PAPER_BASES_LLAMA2_7B}
        print(f"paper's list (x1e6): {' '.join(f'{b / 1e6:.2f}' for b in PAPER_BASES_LLAMA2_7B)}")
        print(f"in common with the paper: {len(ours & paper)}/32 (see megatron_longctx/rope/"
              f"harpe.py for why they differ; pass --harpe-bases to use the paper's list)")
    if args.plot:
        plot(bases, args.head_dim, args.plot)
        print(f"wrote {args.plot}")


"""Draw docs/img/sp_layout_ring.png: the sequence-parallel layouts and the ring schedule (docs/distributed.md).

    python docs/img/make_sp_figure.py [--out docs/img/sp_layout_ring.png] [--ranks 4]

Top: the 2P blocks of a sequence assigned to P ranks under ``contiguous`` and ``zigzag`` (mcdist.parallel.layout),
each drawn as the causal read it causes (query block × cached-state block, lower triangle, coloured by the rank
that owns the queries), and the read work per rank. Bottom: which rank's block every rank holds at each step of
the forward ring (``_RingRead``), with the send to the next rank that is posted before the compute.
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

COLOURS = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def block_owner(block: int, ranks: int, layout: str) -> int:
    """Rank that holds block ``block`` of the 2P blocks."""
    if layout == "contiguous":
        return block // 2
    return block if block < ranks else 2 * ranks - 1 - block


def block_work(block: int) -> float:
    """Read work of the queries of block b against every earlier cached state, in units of one full
    block × block square (b earlier blocks, plus half of its own diagonal block)."""
    return block + 0.5


def draw_layout(ax, ranks: int, layout: str) -> None:
    blocks = 2 * ranks
    for query in range(blocks):
        owner = block_owner(query, ranks, layout)
        for state in range(query + 1):
            shade = 0.55 if state == query else 1.0  # the diagonal block is half full (causal inside it)
            ax.add_patch(Rectangle((state, blocks - 1 - query), 1, 1, facecolor=COLOURS[owner], alpha=shade,
                                   edgecolor="white", linewidth=1))
        ax.text(-0.15, blocks - 0.5 - query, f"B{query}  r{owner}", ha="right", va="center", fontsize=9,
                color=COLOURS[owner], fontweight="bold")
    ax.set_xlim(-2.2, blocks + 0.1)
    ax.set_ylim(-0.9, blocks + 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.text(blocks / 2, -0.55, "cached-state block →", ha="center", va="center", fontsize=9)
    rule = "L multiple of P·C" if layout == "contiguous" else "L multiple of 2P·C"
    title = ("contiguous: rank r holds blocks 2r, 2r+1" if layout == "contiguous"
             else "zigzag: rank r holds blocks r and 2P−1−r")
    ax.set_title(f"{title}\n({rule}); rows = query blocks", fontsize=10)


def draw_work(ax, ranks: int) -> None:
    width = 0.38
    for offset, layout in ((-width / 2, "contiguous"), (width / 2, "zigzag")):
        work = [0.0] * ranks
        for block in range(2 * ranks):
            work[block_owner(block, ranks, layout)] += block_work(block)
        bars = ax.bar([r + offset for r in range(ranks)], work, width,
                      color=[COLOURS[r] for r in range(ranks)], alpha=0.55 if layout == "contiguous" else 1.0,
                      edgecolor="black", hatch="//" if layout == "contiguous" else None, label=layout)
        for bar, value in zip(bars, work):
            ax.text(bar.get_x() + bar.get_width() / 2, value + 0.2, f"{value:g}", ha="center", fontsize=8)
    ax.set_xticks(range(ranks))
    ax.set_xticklabels([f"rank {r}" for r in range(ranks)])
    ax.set_ylabel("read work (block² units)")
    ax.set_title("causal read work per rank\n(hatched: contiguous, solid: zigzag)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.spines[["top", "right"]].set_visible(False)


def draw_ring(ax, ranks: int) -> None:
    steps = ranks
    cell_w, cell_h, gap = 2.6, 0.9, 0.9
    pitch = cell_w + gap
    for step in range(steps):
        ax.text(step * pitch + cell_w / 2, ranks * cell_h + 0.3,
                f"step {step}" + (" (own block)" if step == 0 else ""), ha="center", fontsize=10, fontweight="bold")
        for rank in range(ranks):
            origin = (rank - step) % ranks
            y = (ranks - 1 - rank) * cell_h
            ax.add_patch(Rectangle((step * pitch, y + 0.1), cell_w, cell_h - 0.2, facecolor=COLOURS[origin],
                                   alpha=0.85, edgecolor="black", linewidth=0.6))
            ax.text(step * pitch + cell_w / 2, y + cell_h / 2, f"r{origin}: B{origin} + B{2 * ranks - 1 - origin}",
                    ha="center", va="center", fontsize=9, color="white", fontweight="bold")
            if step == steps - 1:
                continue
            # the send to the next rank, posted before computing on the block in hand
            target = (rank + 1) % ranks
            start = (step * pitch + cell_w, y + cell_h / 2)
            if target != 0:
                end = ((step + 1) * pitch, (ranks - 1 - target) * cell_h + cell_h / 2)
                style = dict(color="#333333", linestyle="-")
            else:  # wrap-around: the last rank sends to rank 0
                end = ((step + 1) * pitch, (ranks - 1) * cell_h + cell_h / 2)
                style = dict(color="#999999", linestyle="--")
            ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=10, linewidth=0.9,
                                         connectionstyle="arc3,rad=0.0", **style))
    for rank in range(ranks):
        ax.text(-0.15, (ranks - 1 - rank) * cell_h + cell_h / 2, f"rank {rank}", ha="right", va="center",
                fontsize=10, color=COLOURS[rank], fontweight="bold")
    ax.text(steps * pitch + 0.1, ranks * cell_h / 2,
            "forward (P−1 sends): at each step a rank posts\n"
            "  isend(block in hand → rank+1), irecv(← rank−1),\n"
            "  computes its partial (out, lse) against the block\n"
            "  in hand, merges by log-sum-exp, then waits.\n"
            "  Dashed: the wrap-around from rank P−1 to rank 0.\n\n"
            "backward: the same schedule carries each block with\n"
            "  its gradient accumulator; after the last step one\n"
            "  more hop sends every accumulator home to its owner.",
            ha="left", va="center", fontsize=9, family="monospace")
    ax.set_xlim(-1.3, steps * pitch + 9.5)
    ax.set_ylim(-0.2, ranks * cell_h + 0.7)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(f"ring schedule under zigzag (P = {ranks}): each cell = the block in hand "
                 f"(owner rank: its cached states and contexts of blocks Bi + Bj)",
                 fontsize=11)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description="Draw the sequence-parallel layout and ring figure.")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                      "sp_layout_ring.png"))
    parser.add_argument("--ranks", type=int, default=4)
    args = parser.parse_args(argv)
    if not 2 <= args.ranks <= len(COLOURS):
        raise ValueError(f"--ranks = {args.ranks}; expected 2..{len(COLOURS)}")
    figure = plt.figure(figsize=(15, 10.5), dpi=110)
    grid = figure.add_gridspec(2, 3, height_ratios=[1.25, 1.0], width_ratios=[1, 1, 0.9], hspace=0.12, wspace=0.15)
    draw_layout(figure.add_subplot(grid[0, 0]), args.ranks, "contiguous")
    draw_layout(figure.add_subplot(grid[0, 1]), args.ranks, "zigzag")
    draw_work(figure.add_subplot(grid[0, 2]), args.ranks)
    draw_ring(figure.add_subplot(grid[1, :]), args.ranks)
    figure.suptitle(f"Sequence parallelism over P = {args.ranks} ranks: 2P = {2 * args.ranks} blocks", fontsize=13)
    figure.savefig(args.out, bbox_inches="tight")
    plt.close(figure)
    return args.out


if __name__ == "__main__":
    print(main())

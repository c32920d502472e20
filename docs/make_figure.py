"""Draw docs/csr_slot.svg: what one slot of a CSR KV page holds (the README's picture).

    .venv/bin/python docs/make_figure.py

The numbers are csr-2b's on SmolLM2-135M (head_dim D = 64): a 16-byte key code of 7 atoms,
each a 5-bit log5 coefficient and a 13-bit index into an 8192-atom dictionary, the value code
the same, 32 bytes against bf16's 256 (csr_vllm/engine/page_layout.py, codec/packing.py).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

OUT = Path(__file__).with_name("csr_slot.svg")
ATOMS = 7  # csr-2b at D = 64: 7 key atoms in 16 bytes
BLUE, ORANGE, GREY, GREEN = "#4c72b0", "#dd8452", "#c8c8c8", "#55a868"


def box(ax, x, y, w, h, color, text="", size=8, tcolor="black"):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", lw=0.6))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size,
                color=tcolor)


def arrow(ax, start, end, color="black", rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, lw=0.7,
                                 color=color, connectionstyle=f"arc3,rad={rad}"))


def page(ax):
    """A KV block: one slot per (token, KV head); one slot picked out."""
    ax.text(0, 9.6, "KV page (vLLM block): one uint8 slot per token and KV head",
            fontsize=9, weight="bold")
    for i in range(16):
        box(ax, 0.45 * i, 8.6, 0.42, 0.7, ORANGE if i == 5 else GREY)
    ax.text(7.35, 8.95, "... block_size slots", fontsize=8, va="center")


def slot(ax):
    """The slot: key code then value code, to scale against bf16."""
    ax.text(0, 7.7, "one slot, to scale (csr-2b, head_dim 64)", fontsize=9, weight="bold")
    box(ax, 0, 6.9, 0.5, 0.55, BLUE, "K 16 B", 6, "white")
    box(ax, 0.5, 6.9, 0.5, 0.55, GREEN, "V 16 B", 6, "white")
    ax.text(1.1, 7.17, "32 bytes = 2 bits per channel", fontsize=8, va="center")
    box(ax, 0, 6.1, 8.0, 0.55, "#eeeeee", "bf16: K 128 B + V 128 B = 256 bytes (16 bits per "
        "channel)", 8)
    arrow(ax, (2.4, 8.6), (0.5, 7.5), ORANGE, 0.15)


def key_code(ax):
    """The key code: 7 coefficients, then 7 indices (little-endian bit stream)."""
    ax.text(0, 5.3, "key code: 7 atoms = 7 coefficients (log5, 5 bits) + 7 indices (13 bits)",
            fontsize=9, weight="bold")
    for s in range(ATOMS):
        box(ax, 0.42 * s, 4.4, 0.4, 0.6, "#f3c9a8", f"c{s + 1}", 7)
        box(ax, 3.1 + 0.62 * s, 4.4, 0.6, 0.6, "#b7c7e3", f"i{s + 1}", 7)
    ax.text(7.55, 4.7, "+2 pad bits", fontsize=7, va="center")
    arrow(ax, (0.25, 6.9), (1.5, 5.1), BLUE, -0.2)


def dictionary(ax):
    """The layer's key dictionary: 8192 unit-norm atoms of 64 channels."""
    x0, y0, w, h, rows = 0.0, 0.3, 5.2, 3.0, 24
    ax.text(x0, 3.55, "key dictionary of the layer: 8192 atoms x 64 channels (trained "
            "offline)", fontsize=9, weight="bold")
    picked = {3: "i1", 9: "i2", 17: "i3"}
    for r in range(rows):
        color = "#b7c7e3" if r in picked else "white"
        ax.add_patch(Rectangle((x0, y0 + h - (r + 1) * h / rows), w, h / rows,
                               facecolor=color, edgecolor="#999999", lw=0.3))
    for r, name in picked.items():
        yr = y0 + h - (r + 0.5) * h / rows
        ax.text(x0 - 0.1, yr, name, fontsize=6, ha="right", va="center")
    arrow(ax, (3.4, 4.4), (2.6, y0 + h - 3.5 * h / rows), BLUE, 0.2)
    arrow(ax, (4.0, 4.4), (3.4, y0 + h - 9.5 * h / rows), BLUE, 0.2)
    arrow(ax, (4.6, 4.4), (4.4, y0 + h - 17.5 * h / rows), BLUE, 0.2)
    ax.text(5.5, 2.0, "key = c1 D[i1] + c2 D[i2]\n        + ... + c7 D[i7]", fontsize=9,
            va="center", family="monospace")
    ax.text(5.5, 1.05, "(OMP picks the atoms;\n coefficients quantised\n inside the pursuit)",
            fontsize=7, va="center")


def main() -> None:
    plt.rcParams["svg.fonttype"] = "none"  # text stays text: small, diffable file
    plt.rcParams["svg.hashsalt"] = "csr-vllm"  # stable ids: reruns give the same file
    fig, ax = plt.subplots(figsize=(8.4, 5.4))
    ax.set_xlim(-0.4, 8.6)
    ax.set_ylim(0, 10)
    ax.axis("off")
    page(ax)
    slot(ax)
    key_code(ax)
    dictionary(ax)
    fig.savefig(OUT, bbox_inches="tight", metadata={"Date": None})
    print(OUT)


if __name__ == "__main__":
    main()

"""Draw RoPE's inverse frequency per dimension pair: plain theta=500,000, after Llama 3.1's rule (factor 8), and
after Llama 3.2's (factor 32), with the two band edges of the rule. Writes a PNG.

    python scripts/plot_rope.py --out rope_frequencies.png      (needs matplotlib: pip install -e ".[plot]")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from llama.config import ModelConfig  # noqa: E402
from llama.model import rope_inv_freq  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="rope_frequencies.png")
    args = parser.parse_args()

    llama31 = ModelConfig.from_file(CONFIGS / "llama-3.1-8b.json")
    llama32 = dataclasses.replace(llama31, rope=ModelConfig.from_file(CONFIGS / "llama-3.2-3b.json").rope)
    plain = dataclasses.replace(llama31, rope=dataclasses.replace(llama31.rope, type="default"))
    rope = llama31.rope

    fig, ax = plt.subplots(figsize=(9, 5))
    for config, label, style in [(plain, "theta = 500,000 (Llama 3)", "-"),
                                 (llama31, "Llama 3.1 rule, factor 8", "--"),
                                 (llama32, "Llama 3.2 rule, factor 32", ":")]:
        inv_freq, _ = rope_inv_freq(config)
        ax.semilogy(range(len(inv_freq)), inv_freq.numpy(), style, label=label, linewidth=2)
    # The bands are defined on wavelength: 2 pi / inv_freq against L0 / high_freq_factor and L0 / low_freq_factor.
    plain_freq, _ = rope_inv_freq(plain)
    wavelength = (2 * math.pi / plain_freq).tolist()
    L0 = rope.original_max_position_embeddings
    for edge, name in [(L0 / rope.high_freq_factor, "wavelength = L0 / high"), (L0 / rope.low_freq_factor,
                                                                               "wavelength = L0 / low")]:
        index = next(i for i, w in enumerate(wavelength) if w > edge)
        ax.axvline(index - 0.5, color="gray", linewidth=1)
        ax.text(index - 0.3, plain_freq[0].item() / 3, name, rotation=90, va="top", fontsize=8, color="gray")
    ax.set_xlabel("dimension pair i (head_dim 128)")
    ax.set_ylabel("inverse frequency (radians per token)")
    ax.set_title("RoPE frequencies: high frequencies kept, low frequencies stretched, a blend between")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

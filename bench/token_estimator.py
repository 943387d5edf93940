"""Print the offline token estimator's counts next to real tokenizer counts for the samples.

The reference counts were measured with js-tiktoken 1.0.21 (cl100k_base, o200k_base), which
cannot run here without Node; they are data, the estimates are computed now.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._token_samples import SAMPLES
from bot.chat.tokens import estimate_tokens

REFERENCE: dict[str, tuple[int, int]] = {
    "English prose, 62 words": (67, 66),
    "Chinese prose, 95 characters": (98, 72),
    "Mixed zh/en with code, 160 characters": (53, 45),
    "Python snippet, 14 lines": (108, 110),
}


def main() -> None:
    print(f"{'sample':40} {'estimate':>8} {'cl100k':>7} {'err':>6} {'o200k':>6} {'err':>6}")
    for name, text in SAMPLES.items():
        estimate = estimate_tokens(text)
        cl100k, o200k = REFERENCE[name]
        print(
            f"{name:40} {estimate:8d} {cl100k:7d} {(estimate - cl100k) / cl100k:+6.0%}"
            f" {o200k:6d} {(estimate - o200k) / o200k:+6.0%}"
        )


if __name__ == "__main__":
    main()

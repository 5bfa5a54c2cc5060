"""How far a correct float32 RoPE table is from float64, position by position: the float32 policy of
`rotary_emb.cos` / `.sin` (qwen2np/golden/tolerances.py, docs/tolerances.md).

A float32 implementation computes inv_freq and the angles position · inv_freq in float32 (transformers
does); the angle's rounding error grows with the position, and so does the table's. This script computes
the tables of a config at every position up to its max_position_embeddings in float32 and in float64 with
qwen2np's golden RoPE (qwen2np/golden/rotary.py) and, when transformers is installed, with transformers'
own Qwen2RotaryEmbedding in float32, and prints the worst error at a few positions and the worst error per
position.

    python scripts/measure_rope_tables.py [--theta 1e6] [--head-dim 64] [--max-positions 32768]

Measured (the test checkpoint's RoPE: θ = 1e6, HD = 64, 32768 positions; qwen2np and transformers 5.24
alike): the worst |float32 − float64| is 4.37e-8 · position (at position 12634), 2.2e-6 at position 60,
1.2e-3 at 32527. The float32 policy holds the tables to 1e-6 + 1e-7 · position (2.3× over it).
"""

import argparse
from types import SimpleNamespace

import numpy as np

from qwen2np.golden.rotary import rotary_tables


def worst_errors(config, tables):
    """The worst |table - float64| over cos and sin at each position: [N]."""
    positions = np.arange(config.max_position_embeddings)[None]
    c64, s64 = rotary_tables(config, positions, np.float64)
    cos, sin = tables(positions)
    return np.maximum(np.abs(cos - c64), np.abs(sin - s64)).max(-1)[0]


def transformers_tables(theta, head_dim, max_positions):
    """transformers' own float32 tables, or None when it is not installed."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    config = transformers.Qwen2Config(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                                      max_position_embeddings=max_positions,
                                      rope_parameters={"rope_type": "default", "rope_theta": theta})
    rotary = transformers.models.qwen2.modeling_qwen2.Qwen2RotaryEmbedding(config)

    def tables(positions):
        cos, sin = rotary(torch.zeros(1, dtype=torch.float32), torch.from_numpy(positions))
        return cos.numpy(), sin.numpy()
    return tables


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--theta", type=float, default=1e6)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--max-positions", type=int, default=32768)
    args = parser.parse_args()
    config = SimpleNamespace(rope_parameters={"rope_type": "default", "rope_theta": args.theta},
                             head_dim=args.head_dim, max_position_embeddings=args.max_positions)
    sides = {"qwen2np float32": lambda p: rotary_tables(config, p, np.float32)}
    theirs = transformers_tables(args.theta, args.head_dim, args.max_positions)
    if theirs is not None:
        sides["transformers float32"] = theirs
    marks = [p for p in (8, 60, 64, 512, 4096, 32767) if p < args.max_positions]
    print(f"{'implementation':<22} worst/position (at)   " + "  ".join(f"{'p ≤ ' + str(p):>10}" for p in marks))
    for label, tables in sides.items():
        e = worst_errors(config, tables)
        ratio = e[1:] / np.arange(1, e.size)
        worst = [e[:p + 1].max() for p in marks]
        print(f"{label:<22} {ratio.max():9.3e} ({ratio.argmax() + 1:5d})   " + "  ".join(f"{w:10.2e}" for w in worst))


if __name__ == "__main__":
    main()

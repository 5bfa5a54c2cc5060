"""Figures for the notebooks, drawn with matplotlib (the `notebooks` extra): each one readable on its
own, with axis labels, token labels where positions are shown, and colour bars.

>>> import matplotlib
>>> matplotlib.use("Agg")
>>> from qwen2np import Qwen2Config
>>> fig = decoder_layer_diagram(Qwen2Config())
>>> len(fig.axes)
1
"""

import functools

import numpy as np


def decoder_layer_diagram(config, layer="{l}"):
    """One decoder layer as boxes and arrows, each labelled with its intermediate name and shape
    (docs/intermediates.md), for `config`'s sizes."""
    import matplotlib.pyplot as plt   # optional (the `notebooks` extra), as every import of matplotlib here
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    D, H, KV = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    HD, F = config.head_dim, config.intermediate_size
    p = f"model.layers.{layer}."
    # (x, y, label, name, shape, colour): the residual stream runs down the left, the blocks to the right
    boxes = [
        (0.0, 13.0, "residual stream in", "model.layers.{l-1}", f"[B, T, {D}]", "#dddddd"),
        (3.0, 12.0, "RMSNorm", p + "input_layernorm", f"[B, T, {D}]", "#fde2b8"),
        (1.6, 10.5, "q = h Wqᵀ + bq", "self_attn.q_proj", f"[B, T, {H}·{HD}]", "#cfe3f7"),
        (4.4, 10.5, "k, v = h Wk,vᵀ + b", "self_attn.k_proj, v_proj", f"[B, T, {KV}·{HD}]", "#cfe3f7"),
        (3.0, 9.0, "RoPE (half-split pairs)", "self_attn.q_rope, k_rope", f"[B, {H}|{KV}, T, {HD}]", "#cfe3f7"),
        (3.0, 7.6, "q kᵀ / √HD, G = H/KV", "self_attn.scores", f"[B, {H}, T, S]", "#cfe3f7"),
        (3.0, 6.3, "+ mask, softmax", "self_attn.mask, probs", f"[B, 1|{H}, T, S]", "#cfe3f7"),
        (3.0, 5.0, "probs v, heads merged", "self_attn.context", f"[B, T, {H}·{HD}]", "#cfe3f7"),
        (3.0, 3.7, "context Woᵀ", "self_attn.o_proj", f"[B, T, {D}]", "#cfe3f7"),
        (0.0, 3.7, "+", p + "resid_mid", f"[B, T, {D}]", "#dddddd"),
        (3.0, 2.4, "RMSNorm", p + "post_attention_layernorm", f"[B, T, {D}]", "#fde2b8"),
        (3.0, 1.1, "silu(gate) * up", "mlp.gate_proj, up_proj, act", f"[B, T, {F}]", "#d5efd0"),
        (3.0, -0.2, "down_proj", "mlp.down_proj", f"[B, T, {D}]", "#d5efd0"),
        (0.0, -1.5, "+  (residual stream out)", f"model.layers.{layer}", f"[B, T, {D}]", "#dddddd"),
    ]
    fig, ax = plt.subplots(figsize=(10, 10.5))
    centres = {}
    for x, y, label, name, shape, colour in boxes:
        w = 2.7 if x != 0.0 else 2.2
        ax.add_patch(FancyBboxPatch((x - w / 2, y - 0.45), w, 0.9, boxstyle="round,pad=0.05", fc=colour,
                                    ec="#555555", lw=1))
        ax.text(x, y + 0.15, label, ha="center", va="center", fontsize=10, weight="bold")
        ax.text(x, y - 0.2, f"{name}  {shape}", ha="center", va="center", fontsize=7.5, family="monospace")
        centres[name] = (x, y)

    def arrow(a, b, **kw):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color="#333333", lw=1.2, **kw))

    order = [b[3] for b in boxes]
    xs = {n: centres[n] for n in order}
    arrow((0.0, 12.55), (0.0, 4.15))                                     # residual: in -> + (attention)
    arrow((0.0, 3.25), (0.0, -1.05))                                     # residual: + -> + (MLP)
    arrow((1.1, 13.0), (3.0, 12.45), connectionstyle="arc3,rad=-0.2")   # into the first norm
    arrow((3.0, 11.55), xs["self_attn.q_proj"][:1] + (10.95,))
    arrow((3.0, 11.55), xs["self_attn.k_proj, v_proj"][:1] + (10.95,))
    arrow((1.6, 10.05), (2.6, 9.45))
    arrow((4.4, 10.05), (3.4, 9.45))
    for a, b in [(9.0, 7.6), (7.6, 6.3), (6.3, 5.0), (5.0, 3.7)]:
        arrow((3.0, a - 0.45), (3.0, b + 0.45))
    arrow((4.4, 10.05), (4.4, 5.2), connectionstyle="arc3,rad=-0.25")   # v goes to probs · v
    ax.text(4.55, 3.3, f"per head: self_attn.head_out\n[B, {H}, T, {D}], sums to o_proj", fontsize=7.5,
            family="monospace", va="top", color="#1f4e79")
    ax.text(0.0, 13.65, "(model.embed_tokens for l = 0)", ha="center", fontsize=7.5, color="#555555")
    arrow((1.65, 3.7), (1.1, 3.7))                                       # o_proj -> +
    arrow((0.5, 3.25), (3.0, 2.85), connectionstyle="arc3,rad=0.2")     # resid_mid -> second norm
    arrow((3.0, 1.95), (3.0, 1.55))
    arrow((3.0, 0.65), (3.0, 0.25))
    arrow((1.65, -0.2), (1.1, -1.2))                                     # down_proj -> +
    ax.text(-1.35, 8.5, "the residual stream:\neach block adds to it", rotation=90, ha="center", va="center",
            fontsize=9, color="#555555")
    ax.set_xlim(-1.8, 6.6)
    ax.set_ylim(-2.2, 14.0)
    ax.axis("off")
    ax.set_title(f"One Qwen2 decoder layer: operation, intermediate name (under model.layers.{layer}.) and shape\n"
                 f"D={D}, H={H}, KV={KV}, HD={HD}, F={F}; B batch, T positions, S key positions", fontsize=10)
    fig.tight_layout()
    return fig


def attention_heatmap(ax, probs, labels, title, colorbar=True):
    """One head's attention [T, S] with token labels: query positions as rows, key positions as columns."""
    image = ax.imshow(probs, cmap="viridis", vmin=0, vmax=1)
    T, S = probs.shape
    ax.set_xticks(range(S), labels[-S:], rotation=90, fontsize=8)
    ax.set_yticks(range(T), labels[-T:], fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
    ax.set_title(title, fontsize=10)
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    return image


def token_grid(ax, values, texts, row_labels, col_labels, title, cbar_label, cmap="viridis", vmin=None, vmax=None):
    """A [rows, cols] heatmap with a short text in every cell (e.g. the logit lens' top token)."""
    image = ax.imshow(values, aspect="auto", cmap=cmap, vmin=vmin, vmax=vmax)
    rows, cols = values.shape
    lo, hi = np.nanmin(values) if vmin is None else vmin, np.nanmax(values) if vmax is None else vmax
    for r in range(rows):
        for c in range(cols):
            if texts is not None:
                light = (values[r, c] - lo) < 0.6 * (hi - lo)
                ax.text(c, r, texts[r][c], ha="center", va="center", fontsize=7,
                        color="white" if light else "black")
    ax.set_xticks(range(cols), col_labels, rotation=90, fontsize=8)
    ax.set_yticks(range(rows), row_labels, fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.figure.colorbar(image, ax=ax, label=cbar_label)
    return image


def show_token(text, width=8):
    """A token's text made visible for labels: spaces as ␣, newlines as ↵, characters the plotting font
    cannot draw (CJK, Thai, …) as □, cut to `width` characters.

    >>> show_token(" Paris"), show_token("\\n    return"), show_token("现在")
    ('␣Paris', '↵␣␣␣␣re…', '□□')
    """
    shown = text.replace(" ", "␣").replace("\n", "↵").replace("\t", "→")
    glyphs = _font_glyphs()
    shown = "".join(ch if ord(ch) in glyphs else "□" for ch in shown)
    return shown if len(shown) <= width else shown[:width - 1] + "…"


@functools.lru_cache(maxsize=1)
def _font_glyphs():
    """The code points matplotlib's default font (DejaVu Sans) can draw; Latin-1 if it cannot be read."""
    try:
        from matplotlib import font_manager, ft2font

        return frozenset(ft2font.FT2Font(font_manager.findfont("DejaVu Sans")).get_charmap())
    except Exception:   # no matplotlib, or no font file: labels in Latin-1 are safe everywhere
        return frozenset(range(0x100)) | frozenset(map(ord, "␣↵→□…�"))

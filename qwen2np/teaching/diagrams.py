"""Box-and-arrow drawings for the notebooks (matplotlib, the `notebooks` extra): the tokenizer's pipeline,
the whole model, and one decoder layer, each labelled with real names and shapes.

>>> import matplotlib
>>> matplotlib.use("Agg")
>>> from qwen2np import Qwen2Config
>>> [len(f.axes) for f in (decoder_layer_diagram(Qwen2Config()), model_diagram(Qwen2Config()))]
[1, 1]
"""

GREY, NORM, ATTN, MLP, TOKEN = "#dddddd", "#fde2b8", "#cfe3f7", "#d5efd0", "#ead7f3"


def _canvas(size, xlim, ylim):
    import matplotlib.pyplot as plt   # optional (the `notebooks` extra), as every import of matplotlib here

    fig, ax = plt.subplots(figsize=size)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.axis("off")
    return fig, ax


def _box(ax, x, y, w, h, title, lines=(), colour=GREY, size=10, line_size=7.5):
    from matplotlib.patches import FancyBboxPatch

    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.05", fc=colour, ec="#555555",
                                lw=1))
    n = len(lines)
    ax.text(x, y + (0.15 if n else 0) + 0.12 * max(n - 1, 0), title, ha="center", va="center", fontsize=size,
            weight="bold")
    for i, line in enumerate(lines):
        ax.text(x, y - 0.2 - 0.27 * i + 0.12 * max(n - 1, 0), line, ha="center", va="center", fontsize=line_size,
                family="monospace")


def _arrow(ax, a, b, label=None, **kw):
    from matplotlib.patches import FancyArrowPatch

    ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, color="#333333", lw=1.2, **kw))
    if label:
        ax.text((a[0] + b[0]) / 2 + 0.08, (a[1] + b[1]) / 2, label, fontsize=8, color="#1f4e79", va="center")


# -- the tokenizer ----------------------------------------------------------------------------------------


def tokenizer_pipeline_diagram(stages):
    """The tokenizer as a chain of stages, top to bottom. `stages` is [(name, what it does, what the
    example looks like after it)], computed by the caller with the real functions."""
    n = len(stages)
    fig, ax = _canvas((10, 0.62 * n + 0.8), (0, 10), (-0.5, n - 0.4))
    for i, (name, does, example) in enumerate(stages):
        y = n - 1 - i
        _box(ax, 1.45, y, 2.6, 0.72, name, [does], TOKEN if i else GREY, size=10, line_size=8)
        ax.text(3.0, y, example, ha="left", va="center", fontsize=10, family="monospace",
                bbox=dict(fc="white", ec="#bbbbbb", boxstyle="round,pad=0.3"))
        if i + 1 < n:
            _arrow(ax, (1.45, y - 0.4), (1.45, y - 0.6))
    ax.set_title("From text to ids: each stage, and what the example looks like after it", fontsize=10)
    fig.tight_layout()
    return fig


# -- the whole model ----------------------------------------------------------------------------------------


def model_diagram(config, tokens="T"):
    """Qwen2ForCausalLM from ids to the next token: the embedding, L decoder layers, the final norm and
    lm_head, with every array's shape and every weight's size for `config`."""
    D, L, V = config.hidden_size, config.num_hidden_layers, config.vocab_size
    H, KV, HD, F = config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size
    per_layer = 2 * D + (D + 1) * H * HD + 2 * (D + 1) * KV * HD + H * HD * D + 3 * D * F
    fig, ax = _canvas((9, 7.6), (0, 10), (-0.2, 8.9))
    steps = [
        (8.3, "input_ids", [f"[B, {tokens}] integers in [0, {V})"], GREY),
        (7.05, "embed_tokens: one row per id", [f"weight [V, D] = [{V}, {D}]", f"-> x [B, {tokens}, {D}]"], GREY),
        (5.1, f"{L} decoder layers, l = 0 … {L - 1}",
         ["x = x + attention(rms_norm(x))   (mixes positions)", "x = x + mlp(rms_norm(x))         (each position alone)",
          f"{per_layer / 1e6:.1f} M weights each; x stays [B, {tokens}, {D}]"], ATTN),
        (3.15, "model.norm: RMSNorm", [f"weight [{D}]", f"-> [B, {tokens}, {D}]"], NORM),
        (1.9, "lm_head: a score per vocabulary entry", [f"weight [V, D] = [{V}, {D}]", f"-> logits [B, {tokens}, {V}]"],
         MLP),
        (0.55, "softmax of the last position, pick a token", ["-> the next id; append it, run again"], GREY),
    ]
    heights = {5.1: 1.6}
    for y, title, lines, colour in steps:
        _box(ax, 4.2, y, 6.4, heights.get(y, 0.85), title, lines, colour, size=11, line_size=9)
    ys = [y for y, *_ in steps]
    for a, b in zip(ys, ys[1:]):
        top = a - heights.get(a, 0.85) / 2 - 0.05
        _arrow(ax, (4.2, top), (4.2, b + heights.get(b, 0.85) / 2 + 0.05))
    ax.annotate("", xy=(7.6, 4.5), xytext=(7.6, 5.7), arrowprops=dict(arrowstyle="-|>", color="#1f4e79",
                                                                        connectionstyle="arc3,rad=-0.6"))
    ax.text(7.95, 5.1, f"× {L}\n(own weights,\nsame shapes)", fontsize=8.5, color="#1f4e79", va="center")
    ax.text(8.0, 8.3, "B: rows in the batch\nT: positions (tokens)\nD: hidden size\nV: vocabulary", fontsize=8,
            va="center", color="#555555")
    ax.set_title(f"Qwen2ForCausalLM as a whole: D={D}, L={L}, V={V}, H={H}, KV={KV}, HD={HD}, F={F}", fontsize=10)
    fig.tight_layout()
    return fig


# -- one decoder layer ---------------------------------------------------------------------------------------


def decoder_layer_diagram(config, layer="{l}"):
    """One decoder layer as boxes and arrows, each labelled with its intermediate name and shape
    (docs/intermediates.md), for `config`'s sizes. Only q and k are rotated: v goes to `probs v` as
    projected."""
    D, H, KV = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    HD, F = config.head_dim, config.intermediate_size
    p = f"model.layers.{layer}."
    fig, ax = _canvas((10.5, 10.5), (-1.8, 7.4), (-2.2, 14.0))
    w = 2.5
    boxes = [   # (x, y, width, label, name and shape, colour): the residual stream runs down the left
        (0.0, 13.0, 2.2, "residual stream in", f"model.layers.{{l-1}}  [B, T, {D}]", GREY),
        (3.0, 12.0, w, "RMSNorm", f"{p}input_layernorm  [B, T, {D}]", NORM),
        (1.2, 10.5, 2.3, "q = h Wqᵀ + bq", f"self_attn.q_proj  [B, T, {H}·{HD}]", ATTN),
        (3.65, 10.5, 2.3, "k = h Wkᵀ + bk", f"self_attn.k_proj  [B, T, {KV}·{HD}]", ATTN),
        (6.1, 10.5, 2.3, "v = h Wvᵀ + bv", f"self_attn.v_proj  [B, T, {KV}·{HD}]", ATTN),
        (2.4, 9.0, 3.0, "RoPE on q and k", f"self_attn.q_rope, k_rope  [B, {H}|{KV}, T, {HD}]", ATTN),
        (3.0, 7.6, w, "q kᵀ / √HD, G = H/KV", f"self_attn.scores  [B, {H}, T, S]", ATTN),
        (3.0, 6.3, w, "+ mask, softmax", f"self_attn.mask, probs  [B, 1|{H}, T, S]", ATTN),
        (3.0, 5.0, w, "probs v, heads merged", f"self_attn.context  [B, T, {H}·{HD}]", ATTN),
        (3.0, 3.7, w, "context Woᵀ", f"self_attn.o_proj  [B, T, {D}]", ATTN),
        (0.0, 3.7, 2.2, "+", f"{p}resid_mid  [B, T, {D}]", GREY),
        (3.0, 2.4, w, "RMSNorm", f"post_attention_layernorm  [B, T, {D}]", NORM),
        (3.0, 1.1, w, "silu(gate) * up", f"mlp.gate_proj, up_proj, act  [B, T, {F}]", MLP),
        (3.0, -0.2, w, "down_proj", f"mlp.down_proj  [B, T, {D}]", MLP),
        (0.0, -1.5, 2.2, "+  (residual stream out)", f"model.layers.{layer}  [B, T, {D}]", GREY),
    ]
    for x, y, bw, label, name, colour in boxes:
        _box(ax, x, y, bw, 0.9, label, [name], colour)
    _arrow(ax, (0.0, 12.55), (0.0, 4.15))                                     # residual: in -> + (attention)
    _arrow(ax, (0.0, 3.25), (0.0, -1.05))                                     # residual: + -> + (MLP)
    _arrow(ax, (1.1, 13.0), (3.0, 12.45), connectionstyle="arc3,rad=-0.2")    # into the first norm
    for x in (1.2, 3.65, 6.1):
        _arrow(ax, (3.0, 11.55), (x, 10.95))
    _arrow(ax, (1.2, 10.05), (1.9, 9.45), "q")
    _arrow(ax, (3.65, 10.05), (2.9, 9.45), "k")
    for a, b in [(9.0, 7.6), (7.6, 6.3), (6.3, 5.0), (5.0, 3.7)]:
        _arrow(ax, (2.4 if a == 9.0 else 3.0, a - 0.45), (3.0, b + 0.45))
    _arrow(ax, (6.1, 10.05), (4.3, 5.4), "v: not rotated", connectionstyle="arc3,rad=-0.15")
    ax.text(4.55, 3.3, f"per head: self_attn.head_out\n[B, {H}, T, {D}], sums to o_proj", fontsize=7.5,
            family="monospace", va="top", color="#1f4e79")
    ax.text(0.0, 13.65, "(model.embed_tokens for l = 0)", ha="center", fontsize=7.5, color="#555555")
    _arrow(ax, (1.75, 3.7), (1.1, 3.7))                                       # o_proj -> +
    _arrow(ax, (0.5, 3.25), (3.0, 2.85), connectionstyle="arc3,rad=0.2")     # resid_mid -> second norm
    _arrow(ax, (3.0, 1.95), (3.0, 1.55))
    _arrow(ax, (3.0, 0.65), (3.0, 0.25))
    _arrow(ax, (1.75, -0.2), (1.1, -1.2))                                     # down_proj -> +
    ax.text(-1.35, 8.5, "the residual stream:\neach block adds to it", rotation=90, ha="center", va="center",
            fontsize=9, color="#555555")
    ax.set_title(f"One Qwen2 decoder layer: operation, intermediate name (under model.layers.{layer}.) and shape\n"
                 f"D={D}, H={H}, KV={KV}, HD={HD}, F={F}; B batch, T positions, S key positions", fontsize=10)
    fig.tight_layout()
    return fig


def token_spans(tokens, ids, title, width=96, wrap_at_newline=True):
    """A text as coloured boxes, one per token, its id under it: how the tokenizer cut it. `tokens` are the
    tokens' texts as shown (e.g. through figures.show_token); a token ending in a newline ends its line."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch

    palette = ["#fbe3b6", "#c9e4f6", "#d4efcc", "#f6cfd6", "#e2d5f3", "#f3efb5"]
    rows, row, used = [], [], 0
    for i, (text, token_id) in enumerate(zip(tokens, ids)):
        cells = max(len(text), len(str(token_id))) + 1
        if row and used + cells > width:
            rows.append(row)
            row, used = [], 0
        row.append((i, text, token_id, used, cells))
        used += cells
        if wrap_at_newline and text.endswith("↵"):
            rows.append(row)
            row, used = [], 0
    if row:
        rows.append(row)
    fig, ax = plt.subplots(figsize=(width * 0.13, 0.62 * len(rows) + 0.7))
    for r, line in enumerate(rows):
        y = -r * 1.0
        for i, text, token_id, x, cells in line:
            ax.add_patch(FancyBboxPatch((x + 0.1, y - 0.05), cells - 0.2, 0.62, boxstyle="round,pad=0.02",
                                        fc=palette[i % len(palette)], ec="#777777", lw=0.6))
            ax.text(x + cells / 2, y + 0.27, text, ha="center", va="center", fontsize=8.5, family="monospace")
            ax.text(x + cells / 2, y - 0.2, str(token_id), ha="center", va="center", fontsize=6, color="#555555")
    ax.set_xlim(0, width)
    ax.set_ylim(-len(rows) + 0.45, 0.75)
    ax.axis("off")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig

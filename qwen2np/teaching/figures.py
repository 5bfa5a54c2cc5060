"""Figures for the notebooks, drawn with matplotlib (the `notebooks` extra): each one readable on its
own, with axis labels, token labels where positions are shown, and colour bars.

The box-and-arrow drawings (the tokenizer's pipeline, the model, a decoder layer) are in diagrams.py.

>>> import matplotlib
>>> matplotlib.use("Agg")
>>> import matplotlib.pyplot as plt
>>> fig, ax = plt.subplots()
>>> _ = attention_heatmap(ax, np.eye(3), ["a", "b", "c"], "one head")
>>> [t.get_text() for t in ax.get_xticklabels()]
['a', 'b', 'c']
"""

import functools

import numpy as np

from .diagrams import decoder_layer_diagram, model_diagram, token_spans, tokenizer_pipeline_diagram  # noqa: F401


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

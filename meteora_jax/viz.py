"""Routing pictures: which adapter each token of a prompt + answer used (the original's Figure 4).

Input everywhere is a token's top-1 adapter per layer and projection, `routing [T, n_layers,
n_proj]` int (-1: not routed), as `Generator.generate(..., return_routing=True).routing[b]` or
`generate.token_routing(config, params, ids)` give it. MixLoRA's experts draw alike, from their
router's top-1 expert per layer (`.expert_routing[b]`, [T, n_layers]) with `what="expert"`.

    shares = routing_shares(routing, L)            # [T, L]: fraction of (layer, projection) picks
    save_routing_png(path, pieces, routing, names)  # heatmaps: shares, and per-layer majority
    save_routing_html(path, pieces, routing, names) # tokens coloured by their dominant adapter
    save_routing_pictures(stem, pieces, ...)        # both, for the adapters and for the experts

`pieces` are the tokens' surface strings (`token_pieces(tokenizer, ids)`).
"""

from __future__ import annotations

import html
import os
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

from meteora_jax.files import written_whole

__all__ = [
    "adapter_colors",
    "dominant_adapter",
    "layer_majority",
    "remove_earlier_pictures",
    "remove_earlier_routing_pictures",
    "routing_html",
    "routing_shares",
    "save_routing_html",
    "save_routing_pictures",
    "save_routing_png",
    "token_pieces",
]


def routing_shares(routing: np.ndarray, num_adapters: int) -> np.ndarray:
    """[T, n_layers, n_proj] top-1 indices -> [T, L] share of each adapter among the token's
    (layer, projection) picks (rows of unrouted tokens are 0)."""
    routing = np.asarray(routing)
    flat = routing.reshape(routing.shape[0], -1)
    counts = np.stack([(flat == a).sum(axis=1) for a in range(num_adapters)], axis=1).astype(np.float64)
    total = np.maximum((flat >= 0).sum(axis=1, keepdims=True), 1)
    return counts / total


def dominant_adapter(routing: np.ndarray, num_adapters: int) -> np.ndarray:
    """[T] the adapter with the largest share per token (lowest index on ties; -1 if unrouted)."""
    shares = routing_shares(routing, num_adapters)
    return np.where(shares.sum(axis=1) > 0, shares.argmax(axis=1), -1)


def layer_majority(routing: np.ndarray, num_adapters: int) -> np.ndarray:
    """[n_layers, T] the most picked adapter over a layer's projections, per token (-1: unrouted)."""
    routing = np.asarray(routing)
    counts = np.stack([(routing == a).sum(axis=2) for a in range(num_adapters)], axis=-1)  # [T, n_layers, L]
    out = counts.argmax(axis=-1)
    return np.where(counts.sum(axis=-1) > 0, out, -1).T


def adapter_colors(num_adapters: int) -> list[str]:
    """One hex colour per adapter: colorcet's Glasbey palette that starts with matplotlib's tab10
    (the first 10 are tab10's; every further one is chosen to differ most from those before it, so
    the 28 adapters of the paper's configs stay apart, where tab20's light/dark pairs or evenly
    spaced hues did not). Past its 256 colours, evenly spaced hues."""
    import colorcet
    import matplotlib

    palette = list(colorcet.palette["glasbey_category10"][:num_adapters])
    hues = matplotlib.colormaps["hsv"]
    extra = num_adapters - len(palette)
    return palette + [matplotlib.colors.to_hex(hues(i / extra)) for i in range(extra)]


def token_pieces(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """The surface text of each token: decode(ids[:i+1]) minus decode(ids[:i]), special tokens
    kept; falls back to the token's own decoding where a prefix does not extend.

    A character whose UTF-8 bytes span several tokens (byte-level BPE, byte fallback) is the piece
    of the token that completes it; the tokens before get "" (decoded alone, each would be U+FFFD).
    """
    ids = [int(t) for t in token_ids]
    pieces, prev = [], ""
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and i + 1 < len(ids):  # an unfinished character: its end comes later
            pieces.append("")
            continue
        if text.startswith(prev) and len(text) > len(prev):
            pieces.append(text[len(prev) :])
        else:
            pieces.append(tokenizer.decode([ids[i]], skip_special_tokens=False) or tokenizer.convert_ids_to_tokens(ids[i]))
        prev = text
    return pieces


# What a picture's indices name: (the word, what its top-1 choices are counted across, the per-layer
# heatmap's title: MixLoRA has one router per layer, the HTML page's default title).
_WHAT = {"adapter": ("adapter", "layers and projections", "majority adapter per layer", "MeteoRA routing"),
         "expert": ("expert", "layers", "top-1 expert per layer", "MixLoRA routing")}


def _words(what: str) -> tuple[str, str, str, str]:
    if what not in _WHAT:
        raise ValueError(f"what={what!r}: choose one of {tuple(_WHAT)}")
    return _WHAT[what]


def _check(pieces, routing, adapter_names):
    routing = np.asarray(routing)
    if routing.ndim != 3:
        raise ValueError(f"routing must be [T, n_layers, n_proj], got shape {routing.shape}")
    if not routing.shape[0] or not len(adapter_names):
        raise ValueError(f"nothing to draw: {routing.shape[0]} tokens, {len(adapter_names)} adapter names")
    if len(pieces) != routing.shape[0]:
        raise ValueError(f"{len(pieces)} token pieces but routing covers {routing.shape[0]} tokens")
    if routing.max(initial=-1) >= len(adapter_names):
        raise ValueError(f"routing names adapter {routing.max()} but only {len(adapter_names)} names given")
    return routing


# Longest token label in the PNG (a longer one is cut, with an ellipsis; the HTML page shows it whole):
# one 64-character token made tight_layout give up and clipped its label at the image edge.
MAX_LABEL_CHARS = 16


def _label(piece: str) -> str:
    """A token piece as a PNG tick label: control characters escaped (\\n, \\t, \\r, \\x0b: they drew
    as boxes), a piece of spaces shown as ␣ (it was an invisible label), cut to MAX_LABEL_CHARS."""
    if not piece:
        return "''"
    if piece.isspace() and not any(unicodedata.category(c) == "Cc" for c in piece):
        return "␣" * min(len(piece), MAX_LABEL_CHARS)
    text = "".join(repr(c)[1:-1] if unicodedata.category(c) == "Cc" else c for c in piece)
    if len(text) > MAX_LABEL_CHARS:
        text = text[: MAX_LABEL_CHARS - 1] + "…"
    return _mathtext_plain(text)


def _mathtext_plain(text: str) -> str:
    """`text` drawn as written: matplotlib reads a pair of $ as math (a name like "usd$_to_$eur" raised
    a mathtext parse error)."""
    return text.replace("$", r"\$")


# Past this many tokens the PNG labels every n-th token only: one label per column would overlap.
MAX_TOKEN_LABELS = 300


def routing_figure(
    pieces: Sequence[str],
    routing: np.ndarray,  # [T, n_layers, n_proj]
    adapter_names: Sequence[str],
    *,
    prompt_length: int | None = None,
    title: str | None = None,
    what: str = "adapter",
):
    """A matplotlib Figure with two heatmaps over the tokens, column t of both at the same x: top,
    each adapter's share of the token's top-1 picks across layers and projections; bottom, each
    layer's majority adapter. The colour bar and the legend sit in a column of their own, so the
    heatmaps share their width. A dashed line marks where the prompt ends. what="expert": the same
    for MixLoRA's experts (one router per layer)."""
    word, across, per_layer, _ = _words(what)
    # The object API with the Agg canvas: no pyplot state, works under any backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    routing = _check(pieces, routing, adapter_names)
    T, n_layers, _ = routing.shape
    L = len(adapter_names)
    shares = routing_shares(routing, L)  # [T, L]
    layers = layer_majority(routing, L)  # [n_layers, T]
    width = min(max(6.0, 0.28 * T + 2.5), 60.0)
    height = 2.0 + 0.3 * L + 0.25 * n_layers + 1.0
    side = 0.4 + 0.07 * max((len(n) for n in adapter_names), default=0)  # inches: legend names at fontsize 7
    fig = Figure(figsize=(width + side, height))
    FigureCanvasAgg(fig)
    (ax_share, ax_bar), (ax_layer, ax_key) = fig.subplots(2, 2, gridspec_kw={
        "height_ratios": [max(L, 1), max(n_layers, 1)], "width_ratios": [width, side]})
    im = ax_share.imshow(shares.T, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax_share.set_yticks(range(L), [_mathtext_plain(n) for n in adapter_names])
    ax_share.set_xticks([])
    ax_share.set_title(_mathtext_plain(title or f"top-1 {word} share across {across}"))
    ax_bar.axis("off")
    fig.colorbar(im, cax=ax_bar.inset_axes([0.0, 0.0, min(0.15 / side, 1.0), 1.0]))

    colors = ["#ffffff"] + adapter_colors(L)  # -1 (unrouted) is white
    ax_layer.imshow(
        layers + 1, aspect="auto", cmap=ListedColormap(colors), vmin=-0.5, vmax=L + 0.5, interpolation="nearest"
    )
    ax_layer.set_yticks(range(n_layers), [f"layer {i}" for i in range(n_layers)])
    every = -(-T // MAX_TOKEN_LABELS)
    ax_layer.set_xticks(range(0, T, every), [_label(p) for p in pieces[::every]], rotation=90, fontsize=7)
    if every > 1:
        ax_layer.set_xlabel(f"one label every {every} tokens (the HTML page shows them all)", fontsize=7)
    ax_layer.set_title(per_layer)
    ax_key.axis("off")
    handles = [Rectangle((0, 0), 1, 1, color=c) for c in colors[1:]]
    ax_key.legend(handles, [_mathtext_plain(n) for n in adapter_names], loc="upper left", fontsize=7, frameon=False)
    if prompt_length is not None and 0 < prompt_length < T:
        for ax in (ax_share, ax_layer):
            ax.axvline(prompt_length - 0.5, color="red", linestyle="--", linewidth=1)
    fig.tight_layout()
    return fig


def save_routing_png(
    path: str | os.PathLike,
    pieces: Sequence[str],
    routing: np.ndarray,  # [T, n_layers, n_proj]
    adapter_names: Sequence[str],
    *,
    prompt_length: int | None = None,
    title: str | None = None,
    dpi: int = 100,
    what: str = "adapter",
) -> str:
    """Writes `routing_figure(...)` as a PNG; returns the path. The file is replaced only once the
    picture is complete."""
    fig = routing_figure(pieces, routing, adapter_names, prompt_length=prompt_length, title=title, what=what)
    path = os.fspath(path)
    with written_whole(path, "wb") as f:
        fig.savefig(f, dpi=dpi, format="png")
    return path


def routing_html(
    pieces: Sequence[str],
    routing: np.ndarray,  # [T, n_layers, n_proj]
    adapter_names: Sequence[str],
    *,
    prompt_length: int | None = None,
    title: str | None = None,
    what: str = "adapter",
) -> str:
    """A self-contained HTML page (inline CSS, no scripts or external files): every token in the
    colour of its dominant adapter, its per-adapter shares in a tooltip, and a legend. `title`
    defaults to "MeteoRA routing" ("MixLoRA routing" for what="expert"). Its styles apply only
    inside its `meteora-routing` block, so the page can also be shown inline (a notebook's
    `display(HTML(...))`) without restyling the host."""
    word, across, _, default_title = _words(what)
    title = title or default_title
    routing = _check(pieces, routing, adapter_names)
    L = len(adapter_names)
    shares = routing_shares(routing, L)
    dominant = dominant_adapter(routing, L)
    colors = adapter_colors(L)
    spans = []
    for t, piece in enumerate(pieces):
        if prompt_length is not None and t == prompt_length:
            spans.append('<span class="sep" title="answer starts here">&#9654;</span>')
        a = int(dominant[t])
        tip = ", ".join(f"{adapter_names[i]} {shares[t, i]:.0%}" for i in np.argsort(-shares[t]) if shares[t, i] > 0)
        style = f"background:{colors[a]}55;border-bottom:3px solid {colors[a]}" if a >= 0 else "background:#eee"
        text = html.escape(piece).replace("\n", "&#8629;<br>")
        spans.append(f'<span class="tok" style="{style}" title="{html.escape(tip or "not routed")}">{text}</span>')
    legend = "".join(
        f'<span class="key"><span class="swatch" style="background:{c}"></span>{html.escape(n)}</span>'
        for n, c in zip(adapter_names, colors)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
.meteora-routing {{ font-family: sans-serif; margin: 2em; }}
.meteora-routing .text {{ font-family: monospace; font-size: 15px; line-height: 2.1; white-space: pre-wrap; }}
.meteora-routing .tok {{ padding: 2px 0; border-radius: 2px; }}
.meteora-routing .sep {{ color: #c00; padding: 0 4px; }}
.meteora-routing .legend {{ margin: 1em 0; }}
.meteora-routing .key {{ margin-right: 1.2em; white-space: nowrap; }}
.meteora-routing .swatch {{ display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.3em;
  vertical-align: middle; }}
</style></head><body><div class="meteora-routing">
<h2>{html.escape(title)}</h2>
<p>Each token is coloured by its dominant {word}: the one picked most often as top-1 across all
{across} (hover for the shares).</p>
<div class="legend">{legend}</div>
<div class="text">{"".join(spans)}</div>
</div></body></html>
"""


def save_routing_html(path: str | os.PathLike, pieces, routing, adapter_names, **kwargs) -> str:
    """Writes `routing_html(...)` to `path`, whole or not at all; returns the path."""
    page = routing_html(pieces, routing, adapter_names, **kwargs)  # (bad input raises before any write)
    path = os.fspath(path)
    with written_whole(path) as f:
        f.write(page)
    return path


def save_routing_pictures(
    stem: str,
    pieces: Sequence[str],
    *,
    routing: np.ndarray | None = None,  # [T, n_layers, n_proj]: the gates' top-1 adapters
    adapter_names: Sequence[str] = (),
    expert_routing: np.ndarray | None = None,  # [T, n_layers]: the MixLoRA routers' top-1 experts
    num_experts: int = 0,
    prompt_length: int | None = None,
    title: str | None = None,  # of the adapters' pictures
) -> list[str]:
    """One sequence's pictures, PNG + HTML: `<stem>.*` of MeteoRA's adapters where the model has
    some, and `<stem>_experts.*` of MixLoRA's experts where it has those. Returns the paths."""
    def draw(path_stem, routing_, names, title_, what):
        options = dict(prompt_length=prompt_length, title=title_, what=what)
        return [save_routing_png(path_stem + ".png", pieces, routing_, names, **options),
                save_routing_html(path_stem + ".html", pieces, routing_, names, **options)]

    paths = []
    if routing is not None and len(adapter_names):
        paths += draw(stem, routing, adapter_names, title, "adapter")
    if expert_routing is not None and num_experts:  # one router per layer: a routing of one "projection"
        names = [f"expert {e}" for e in range(num_experts)]
        paths += draw(stem + EXPERTS_SUFFIX, np.asarray(expert_routing)[:, :, None], names, None, "expert")
    return paths


EXPERTS_SUFFIX = "_experts"  # `save_routing_pictures`' MixLoRA pictures: <stem>_experts.png / .html


def remove_earlier_routing_pictures(folder, prefix: str, kept: int, *, adapters: bool, experts: bool) -> list[str]:
    """`remove_earlier_pictures` for both kinds of `save_routing_pictures`: those numbered `kept`
    and past of a kind this run draws, and all of a kind it does not (another model's)."""
    return [path for suffix, drawn in (("", adapters), (EXPERTS_SUFFIX, experts))
            for path in remove_earlier_pictures(folder, prefix, kept if drawn else 0, suffix)]


def remove_earlier_pictures(folder: str | os.PathLike, prefix: str, kept: int, suffix: str = "") -> list[str]:
    """Deletes `<folder>/<prefix><n><suffix>.png` and `.html` for every number n >= kept: the
    pictures an earlier run drew past this run's (`prompt_007.png` of an earlier run of eight
    prompts, beside this run's five, would pass for one of them). Returns the removed paths, sorted."""
    if not os.path.isdir(folder):  # nothing drawn here yet
        return []
    pattern = re.compile(re.escape(prefix) + r"([0-9]+)" + re.escape(suffix) + r"\.(?:png|html)")
    removed = []
    for name in sorted(os.listdir(folder)):
        match = pattern.fullmatch(name)
        if match and int(match.group(1)) >= kept and os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed

"""Routing pictures: share/majority arithmetic by hand, a PNG of the stated size holding the adapter
colours, and an HTML page with every token in its dominant adapter's colour."""

from __future__ import annotations

import html
import os
import re
import warnings
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from meteora_jax import viz

NAMES = ["arith", "reverse", "shout"]
# 4 tokens x 2 layers x 3 projections of top-1 adapter picks (-1: not routed).
ROUTING = np.array(
    [
        [[0, 0, 1], [0, 2, 0]],  # adapter 0: 4/6
        [[1, 1, 1], [2, 2, 1]],  # adapter 1: 4/6
        [[2, 2, 0], [0, 2, 2]],  # adapter 2: 4/6
        [[1, 2, 0], [2, 1, 0]],  # a tie 2/2/2 -> lowest index 0
    ]
)


def test_shares_dominant_and_layer_majority_by_hand():
    shares = viz.routing_shares(ROUTING, 3)
    np.testing.assert_allclose(shares[0], [4 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(shares[1], [0, 4 / 6, 2 / 6])
    np.testing.assert_allclose(shares.sum(1), 1.0)
    np.testing.assert_array_equal(viz.dominant_adapter(ROUTING, 3), [0, 1, 2, 0])
    # layer 0 majorities: [0,0,1]->0, [1,1,1]->1, [2,2,0]->2, [1,2,0]->0 (tie); layer 1: 0, 2, 2, 0
    np.testing.assert_array_equal(viz.layer_majority(ROUTING, 3), [[0, 1, 2, 0], [0, 2, 2, 0]])
    unrouted = np.full((1, 2, 3), -1)
    assert viz.dominant_adapter(unrouted, 3)[0] == -1 and viz.routing_shares(unrouted, 3).sum() == 0


def test_png_has_the_stated_size_and_the_adapter_colours(tmp_path):
    pieces = ["<s>", "12", "+", "30="]
    path = viz.save_routing_png(tmp_path / "r.png", pieces, ROUTING, NAMES, prompt_length=3, dpi=80)
    img = Image.open(path)
    assert img.format == "PNG"
    legend_in = 0.4 + 0.07 * max(map(len, NAMES))  # the colour bar and legend column
    width_in = min(max(6.0, 0.28 * len(pieces) + 2.5), 60.0) + legend_in
    height_in = 2.0 + 0.3 * len(NAMES) + 0.25 * ROUTING.shape[1] + 1.0
    assert img.size == (round(width_in * 80), round(height_in * 80))
    pixels = {tuple(p[:3]) for p in np.asarray(img.convert("RGB")).reshape(-1, 3)}
    for color in viz.adapter_colors(3):  # the per-layer heatmap and the legend use all three
        rgb = tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))
        assert rgb in pixels, color


def test_both_heatmaps_put_a_token_at_the_same_x():
    """Column t of the shares map lies above column t of the per-layer map (the colour bar took
    its width from the top panel only, which shifted its columns left of their labels by up to
    one column per 40 tokens)."""
    rng = np.random.default_rng()
    for num_tokens in (4, 40, 700):
        routing = rng.integers(-1, 3, (num_tokens, 2, 3))
        fig = viz.routing_figure([f"t{i}" for i in range(num_tokens)], routing, NAMES, prompt_length=2)
        fig.canvas.draw()
        ax_share, ax_layer = fig.axes[0], fig.axes[2]
        assert ax_share.get_ylabel() == "" and ax_layer.get_title() == "majority adapter per layer"
        top, bottom = ax_share.get_position(), ax_layer.get_position()
        assert abs(top.x0 - bottom.x0) < 1e-9 and abs(top.x1 - bottom.x1) < 1e-9, (num_tokens, top, bottom)
        assert ax_share.get_xlim() == ax_layer.get_xlim()
        labels = ax_layer.get_xticks()
        assert len(labels) <= viz.MAX_TOKEN_LABELS  # 700 tokens: every 3rd labelled
        assert list(labels[:2]) == ([0, 1] if num_tokens <= viz.MAX_TOKEN_LABELS else [0, 3])


def test_adapter_colours_stay_apart_for_the_paper_configs():
    """28 adapters (llama2_13b / llama3_8b): every pair at least 50 apart in RGB (0-441); evenly
    spaced hues put adapters 9 and 10 37 apart, tab20's pairs at 20 adapters 25. The first 10 are
    tab10's."""
    import matplotlib

    rgb = np.array([[int(c[i : i + 2], 16) for i in (1, 3, 5)] for c in viz.adapter_colors(28)], float)
    gaps = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1)[np.triu_indices(28, 1)]
    assert gaps.min() >= 50, gaps.min()
    tab10 = np.array([matplotlib.colors.to_rgb(matplotlib.colormaps["tab10"](i)) for i in range(10)]) * 255
    assert np.abs(rgb[:10] - tab10).max() <= 1.5
    assert len(set(viz.adapter_colors(300))) == 300


def test_a_failed_picture_leaves_the_old_file(tmp_path):
    for save, name in ((viz.save_routing_html, "r.html"), (viz.save_routing_png, "r.png")):
        path = save(tmp_path / name, ["a", "b", "c", "d"], ROUTING, NAMES)
        before = open(path, "rb").read()
        with pytest.raises(ValueError, match="3 token pieces but routing covers 4"):
            save(path, ["a", "b", "c"], ROUTING, NAMES)
        assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["r.html", "r.png"]


class _Spans(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tokens, self._style = [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and attrs.get("class") == "tok":
            self._style = attrs["style"]
            self.tokens.append([self._style, ""])

    def handle_endtag(self, tag):
        self._style = None

    def handle_data(self, data):
        if self._style is not None:
            self.tokens[-1][1] += data


def test_html_colours_every_token_by_its_dominant_adapter(tmp_path):
    pieces = ["<s>", " a<b", " & c", "\n\"d\""]
    path = viz.save_routing_html(tmp_path / "r.html", pieces, ROUTING, NAMES, prompt_length=2)
    page = open(path, encoding="utf-8").read()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    parser = _Spans()
    parser.feed(page)
    assert len(parser.tokens) == len(pieces)
    colors = viz.adapter_colors(3)
    for (style, text), piece, dom in zip(parser.tokens, pieces, [0, 1, 2, 0]):
        assert text.replace("\u21b5", "") == piece.replace("\n", "")
        assert re.search(rf"border-bottom:3px solid {colors[dom]}", style)
    for name, color in zip(NAMES, colors):
        assert html.escape(name) in page and color in page
    # Styles only inside the page's own block: shown inline in a notebook, it restyles nothing else.
    rules = re.findall(r"^([^{}\n]+)\{", page.split("<style>")[1].split("</style>")[0], re.M)
    assert rules and all(rule.strip().startswith(".meteora-routing") for rule in rules), rules


def test_token_pieces_rebuild_the_text(tiny_tokenizer):
    text = "Question: what is 12 + 30? Answer: 42"
    ids = tiny_tokenizer(text)["input_ids"]  # with <s>
    pieces = viz.token_pieces(tiny_tokenizer, ids)
    assert len(pieces) == len(ids) and pieces[0] == "<s>"
    assert "".join(pieces) == tiny_tokenizer.decode(ids, skip_special_tokens=False)


def test_token_pieces_of_characters_split_across_tokens(tiny_tokenizer):
    """Byte-level BPE splits 'ï', CJK and emoji into byte tokens: the pieces still rebuild the
    text, each character whole in the token that completes it (they were U+FFFD boxes)."""
    text = "naïve 你好 🙂 ok"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = viz.token_pieces(tiny_tokenizer, ids)
    assert len(pieces) == len(ids) > len(text.split())
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert "" in pieces  # some tokens hold only part of a character
    assert any("你" in p for p in pieces) and any("🙂" in p for p in pieces)


def test_mismatched_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="3 token pieces but routing covers 4"):
        viz.routing_html(["a", "b", "c"], ROUTING, NAMES)
    with pytest.raises(ValueError, match="only 2 names"):
        viz.routing_html(["a", "b", "c", "d"], ROUTING, NAMES[:2])
    # Nothing to draw (a numpy reshape error, or "need at least one array to stack")
    for pieces, routing, names in (([], ROUTING[:0], NAMES), (["a"], np.full((1, 2, 3), -1), [])):
        for draw in (viz.routing_html, lambda *a: viz.save_routing_png(tmp_path / "r.png", *a)):
            with pytest.raises(ValueError, match=f"nothing to draw: {len(pieces)} tokens, {len(names)} adapter names"):
                draw(pieces, routing, names)


def test_labels_names_and_titles_drawn_as_written():
    """PNG text shows what it names: a pair of $ in an adapter name or the title stays text
    (matplotlib read it as math: "usd$_to_$eur" was a parse error), control characters are escaped
    (a \\r drew as a missing-glyph box), a piece of spaces is visible, and a long token is cut (a
    64-character one made tight_layout give up, clipping its label at the image edge)."""
    pieces = ["a\r\n", " ", "=" * 64, "$5_$10"]
    names = ["usd$_to_$eur", "b$", "c"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a missing glyph or a failed tight layout warns
        fig = viz.routing_figure(pieces, ROUTING, names, title="forced to usd$_to_$eur")
        fig.canvas.draw()
    ax_share, _, ax_layer, ax_key = fig.axes[:4]
    labels = [t.get_text() for t in ax_layer.get_xticklabels()]
    assert labels == ["a\\r\\n", "␣", "=" * 15 + "…", r"\$5_\$10"]
    plain = [n.replace("$", r"\$") for n in names]
    assert [t.get_text() for t in ax_share.get_yticklabels()] == plain
    assert [t.get_text() for t in ax_key.get_legend().get_texts()] == plain
    assert ax_share.get_title() == r"forced to usd\$_to_\$eur"


def test_remove_earlier_pictures(tmp_path):
    """Only `<prefix><ASCII number>.png/.html` at or past `kept` go; a folder not made yet is no error."""
    remove_earlier_pictures = viz.remove_earlier_pictures
    assert remove_earlier_pictures(tmp_path / "not_made", "prompt_", 0) == []
    names = ["c+3_00.png", "c+3_01.png", "c+3_01.html", "c+3_12.png", "c+3_١.png", "c+3_02.txt", "cc3_05.png",
             "d_01.png"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = remove_earlier_pictures(tmp_path, "c+3_", 1)  # "+": a regex character in a set name
    assert removed == [str(tmp_path / n) for n in ("c+3_01.html", "c+3_01.png", "c+3_12.png")]
    assert sorted(os.listdir(tmp_path)) == sorted(set(names) - {"c+3_01.html", "c+3_01.png", "c+3_12.png"})


def test_routing_pictures_of_adapters_and_of_experts(tmp_path):
    """save_routing_pictures draws `<stem>.*` of the adapters and `<stem>_experts.*` of MixLoRA's
    experts (one router per layer), each only where the model has them; the expert pictures say
    "expert" where the adapter ones say "adapter"."""
    pieces = ["<s>", " a", " b", " c"]
    experts = np.array([[0, 3], [1, 1], [3, 2], [-1, -1]])  # [T, n_layers] top-1 expert; -1: not routed
    both = viz.save_routing_pictures(str(tmp_path / "both"), pieces, routing=ROUTING, adapter_names=NAMES,
                                     expert_routing=experts, num_experts=4, prompt_length=2)
    assert [os.path.basename(p) for p in both] == ["both.png", "both.html", "both_experts.png", "both_experts.html"]
    assert viz.save_routing_pictures(str(tmp_path / "a"), pieces, routing=ROUTING, adapter_names=NAMES) == [
        str(tmp_path / "a.png"), str(tmp_path / "a.html")]
    assert viz.save_routing_pictures(str(tmp_path / "e"), pieces, routing=None, adapter_names=(),
                                     expert_routing=experts, num_experts=4) == [
        str(tmp_path / "e_experts.png"), str(tmp_path / "e_experts.html")]
    page = open(tmp_path / "e_experts.html", encoding="utf-8").read()
    assert "MixLoRA routing" in page and "dominant expert" in page and "across all\nlayers (" in page
    assert all(f"expert {e}" in page for e in range(4)) and "adapter" not in page
    colors = viz.adapter_colors(4)
    parser = _Spans()
    parser.feed(page)
    for (style, _), dom in zip(parser.tokens, [0, 1, 2]):  # ties (token 0: 0 and 3) go to the lower index
        assert f"border-bottom:3px solid {colors[dom]}" in style
    figure = viz.routing_figure(pieces, experts[:, :, None], [f"expert {e}" for e in range(4)], what="expert")
    assert [ax.get_title() for ax in figure.axes[:3:2]] == ["top-1 expert share across layers", "top-1 expert per layer"]
    with pytest.raises(ValueError, match="what='experts': choose one of"):
        viz.routing_html(pieces, ROUTING, NAMES, what="experts")


def test_remove_earlier_routing_pictures_of_both_kinds(tmp_path):
    """Past `kept` of a kind this run draws, all of a kind it does not draw (another model's)."""
    names = ["p_00.png", "p_01.html", "p_00_experts.png", "p_01_experts.html", "p_00_experts.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    removed = viz.remove_earlier_routing_pictures(tmp_path, "p_", 1, adapters=False, experts=True)
    assert removed == [str(tmp_path / n) for n in ("p_00.png", "p_01.html", "p_01_experts.html")]
    assert sorted(os.listdir(tmp_path)) == ["p_00_experts.png", "p_00_experts.txt"]

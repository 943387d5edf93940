"""Formulas in answers: what counts as one, how it is shown as code or image, how it is drawn."""

from __future__ import annotations

import io
import textwrap
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.media.formulas import (
    MAX_ALT_CHARS,
    Formula,
    FormulaRenderer,
    find_formulas,
    formulas_as_code,
    place_images,
)
from tests.helpers import run_python

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sources(text: str) -> list[tuple[str, bool]]:
    """What find_formulas sees in text: (source, display) pairs."""
    return [(formula.source, formula.display) for formula in find_formulas(text)]


# ---- finding formulas ------------------------------------------------------------------------


def test_double_dollars_are_a_display_formula_with_its_span() -> None:
    text = "So $$ x^2 + y^2 $$ holds."
    assert find_formulas(text) == [Formula("x^2 + y^2", True, 3, 18)]
    assert text[3:18] == "$$ x^2 + y^2 $$"


def test_square_bracket_delimiters_are_display_and_parentheses_inline() -> None:
    assert sources(r"\[ \frac{a}{b} \] and \(\alpha\)") == [
        (r"\frac{a}{b}", True),
        (r"\alpha", False),
    ]


def test_single_dollars_are_an_inline_formula() -> None:
    assert sources(r"Energy $E=mc^2$, squares $x^2$ and $\alpha$.") == [
        ("E=mc^2", False),
        ("x^2", False),
        (r"\alpha", False),
    ]


def test_display_formulas_span_lines_but_not_a_blank_line() -> None:
    assert sources("$$\na + b\n= c\n$$") == [("a + b\n= c", True)]
    assert sources("\\[\n a \\\\\n b\n\\]") == [("a \\\\\n b", True)]
    assert sources("$$ a\n\nb $$") == []
    assert sources("\\[ a\n  \nb \\]") == []


def test_inline_formulas_stay_on_one_line() -> None:
    assert sources("$a\nb$") == []
    assert sources("\\(a\nb\\)") == []


@pytest.mark.parametrize(
    "text",
    [
        "$5 and $6",
        "It costs $5, or $10 with tax",
        "between $3 and $4.50",
        "$3.50–$4",
        "$3.50-$4 per item",
        "from $20/$30 a month",
        "US$5/month or US$50/year",
        "$5 ($4 on sale)",
        "$1,000 and $2,000",
    ],
)
def test_prices_are_not_formulas(text: str) -> None:
    assert find_formulas(text) == []
    assert formulas_as_code(text) == text


@pytest.mark.parametrize("text", ["$5$", "$5.00$", "$1,000$", "$-3$"])
def test_a_number_between_dollars_is_not_a_formula(text: str) -> None:
    assert find_formulas(text) == []


def test_a_price_beside_a_formula_leaves_the_formula_found() -> None:
    assert sources("$10 or $x$") == [("x", False)]


def test_dollar_must_hug_its_content() -> None:
    assert sources("$ x$") == []
    assert sources("$x $") == []
    assert sources("$x$5") == []


def test_an_escaped_dollar_is_never_a_delimiter() -> None:
    assert sources(r"\$x\$") == []
    assert sources(r"\$5 and $y$") == [("y", False)]
    assert sources(r"$a \$ b$") == [(r"a \$ b", False)]
    assert sources(r"\\$x$") == [("x", False)], "an escaped backslash escapes nothing after it"
    assert sources(r"\\[x\\]") == []


def test_nothing_inside_code_is_a_formula() -> None:
    text = "Run `echo $HOME$` then\n```bash\necho $x$ $$y$$\n```\n~~~\n\\[z\\]\n~~~\n$w$"
    assert sources(text) == [("w", False)]


def test_nothing_inside_an_unclosed_fence_is_a_formula() -> None:
    assert sources("$a$\n```python\nprice = '$x$'\n$$y$$") == [("a", False)]


def test_a_fence_inside_a_list_item_is_code_too() -> None:
    assert sources("- step:\n  ```\n  $x$\n  ```\n- $y$") == [("y", False)]


def test_a_formula_does_not_reach_across_inline_code() -> None:
    assert sources("$a `code` b$") == []


def test_empty_formulas_are_not_formulas() -> None:
    assert sources("$$ $$") == []
    assert sources("\\[  \\] and \\(\\)") == []


def test_an_unclosed_formula_while_streaming_is_left_as_is() -> None:
    for text in ["Here: $$\\frac{a}{", "Here: \\[ x +", "Here: \\( x", "Here: $x^"]:
        assert find_formulas(text) == []
        assert formulas_as_code(text) == text


def test_formulas_are_scanned_left_to_right_without_overlap() -> None:
    assert sources("$a$$b$") == [("a", False), ("b", False)]
    assert sources("$$a$$$$b$$") == [("a", True), ("b", True)]
    assert sources("$a $b$") == [("b", False)]


# ---- showing formulas as code ----------------------------------------------------------------


def test_inline_formulas_are_shown_as_inline_code() -> None:
    assert formulas_as_code(r"Since $E=mc^2$ and \(a+b\), done") == (
        "Since `E=mc^2` and `a+b`, done"
    )


def test_an_inline_formula_with_backticks_gets_a_longer_fence() -> None:
    assert formulas_as_code("$a`b$") == "`` a`b ``"
    assert formulas_as_code("$a``b$") == "``` a``b ```"


def test_inline_code_for_a_formula_does_not_pair_with_a_stray_backtick() -> None:
    assert formulas_as_code("\\(x\\)`") == "``x`` `"
    assert formulas_as_code("`\\(x\\)") == "` ``x``"
    assert formulas_as_code("`a` and $x$") == "`a` and `x`", "a closed code span is no stray"


def test_display_formulas_are_shown_as_latex_blocks_on_their_own_lines() -> None:
    assert formulas_as_code("Thus $$x^2$$ holds.") == "Thus\n```latex\nx^2\n```\nholds."
    assert formulas_as_code("Thus\n\\[\n x^2\n\\]\nholds.") == "Thus\n```latex\nx^2\n```\nholds."
    assert formulas_as_code("$$a$$ $$b$$") == "```latex\na\n```\n```latex\nb\n```"


def test_a_display_formula_in_a_list_item_keeps_its_indentation() -> None:
    text = "- sum:\n  $$\n  a +\n  b\n  $$\n- next"
    assert formulas_as_code(text) == "- sum:\n  ```latex\n  a +\n  b\n  ```\n- next"


# ---- placing images --------------------------------------------------------------------------


def test_rendered_formulas_become_images_and_the_rest_code() -> None:
    text = (
        "Einstein: $E=mc^2$, and $\\notacommand$.\n$$\\int_0^1 x\\,dx$$\nDone $$\\frac{a}{b}$$ ok"
    )
    images = {"E=mc^2": "img_e", "\\int_0^1 x\\,dx": "img_int"}
    assert place_images(text, images) == (
        "Einstein: ![E=mc^2](img_e), and `\\notacommand`.\n"
        "\n"
        "![\\int_0^1 x\\,dx](img_int)\n"
        "\n"
        "Done\n"
        "```latex\n"
        "\\frac{a}{b}\n"
        "```\n"
        "ok"
    )


def test_a_display_image_mid_paragraph_gets_blank_lines_around_it() -> None:
    assert place_images("Then $$x$$ and on", {"x": "img_x"}) == "Then\n\n![x](img_x)\n\nand on"
    assert place_images("Then\n\n$$x$$\n\nmore", {"x": "img_x"}) == "Then\n\n![x](img_x)\n\nmore"


def test_place_images_without_images_is_formulas_as_code() -> None:
    text = "A $x$ and $$y$$ and \\(z\\)."
    assert place_images(text, {}) == formulas_as_code(text)


def test_alt_text_is_made_safe_for_markdown() -> None:
    text = "$$f(x) = [a,\n  b] < c$$"
    assert place_images(text, {"f(x) = [a,\n  b] < c": "img_f"}) == "![f x = a, b c](img_f)"
    assert place_images("$x \\\\$", {"x \\\\": "img_x"}) == "![x](img_x)"


def test_long_alt_text_is_capped_with_an_ellipsis() -> None:
    source = "x+" * 100 + "y"
    placed = place_images(f"${source}$", {source: "img_long"})
    alt = placed.removeprefix("![").removesuffix("](img_long)")
    assert len(alt) == MAX_ALT_CHARS
    assert alt.endswith("…")
    assert source.startswith(alt[:-1])


# ---- rendering -------------------------------------------------------------------------------


class CountingRenderer(FormulaRenderer):
    """A renderer that counts how often it really draws."""

    def __init__(self, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.draws = 0

    def _draw(self, formula: Formula) -> bytes | None:
        self.draws += 1
        return super()._draw(formula)


def png_size(png: bytes) -> tuple[int, int]:
    assert png.startswith(PNG_SIGNATURE)
    with Image.open(io.BytesIO(png)) as image:
        image.load()
        return image.size


def test_a_formula_renders_to_a_png() -> None:
    renderer = FormulaRenderer()
    inline = renderer.render(Formula(r"\frac{a}{b} + \sqrt{x^2}", False, 0, 0))
    display = renderer.render(Formula(r"\frac{a}{b} + \sqrt{x^2}", True, 0, 0))
    assert inline is not None
    assert display is not None
    inline_width, inline_height = png_size(inline)
    display_width, display_height = png_size(display)
    assert inline_width > 0
    assert inline_height > 0
    assert display_width > inline_width, "display formulas are drawn a little larger"
    assert display_height > inline_height


def test_a_multiline_display_formula_mathtext_can_read_as_one_line_renders() -> None:
    png = FormulaRenderer().render(Formula("a\n+ b", True, 0, 0))
    assert png is not None
    assert png.startswith(PNG_SIGNATURE)


@pytest.mark.parametrize(
    "source",
    [
        r"\begin{pmatrix} a \\ b \end{pmatrix}",
        r"\notacommand{x}",
        "a \\\\ b",
        r"\text{速度} = v",  # no font of mathtext's has Chinese: it would draw boxes
        "a $ b",
        "x" * 1001,
        "W" * 900,  # far too wide for a card
        "{" * 40 + "x" + "}" * 40,
    ],
)
def test_what_mathtext_cannot_draw_renders_to_none(source: str) -> None:
    assert FormulaRenderer().render(Formula(source, True, 0, 0)) is None


def test_a_failed_render_is_cached_and_not_retried() -> None:
    renderer = CountingRenderer()
    formula = Formula(r"\notacommand{x}", False, 0, 0)
    assert renderer.render(formula) is None
    assert renderer.render(formula) is None
    assert renderer.draws == 1
    assert renderer.cache_size == 1


def test_renders_are_cached_by_source_and_display() -> None:
    renderer = CountingRenderer()
    first = renderer.render(Formula("x^2", False, 0, 5))
    again = renderer.render(Formula("x^2", False, 10, 15))
    renderer.render(Formula("x^2", True, 0, 9))
    assert first is not None
    assert again == first
    assert renderer.draws == 2
    assert renderer.cache_size == 2


def test_the_cache_is_bounded() -> None:
    renderer = CountingRenderer(max_cached=2)
    for source in ["a", "b", "c"]:
        renderer.render(Formula(source, False, 0, 0))
    assert renderer.cache_size == 2
    renderer.render(Formula("a", False, 0, 0))
    assert renderer.draws == 4, "the least recently used formula was dropped"


def test_rendering_from_several_threads_gives_the_same_image() -> None:
    renderer = CountingRenderer()
    formula = Formula(r"\sum_{i=1}^n i = \frac{n(n+1)}{2}", True, 0, 0)
    results: list[bytes | None] = []
    start = threading.Barrier(4)

    def render() -> None:
        start.wait()
        results.append(renderer.render(formula))

    threads = [threading.Thread(target=render) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    assert results[0] is not None
    assert all(result == results[0] for result in results)
    assert renderer.draws == 1


def test_finding_and_rewriting_formulas_does_not_import_matplotlib() -> None:
    script = textwrap.dedent(
        r"""
        import sys
        from bot.media.formulas import (
            FormulaRenderer, find_formulas, formulas_as_code, place_images,
        )
        text = "Area $\pi r^2$ and $$\int_0^1 x\,dx$$ and \(a\)"
        assert len(find_formulas(text)) == 3
        formulas_as_code(text)
        place_images(text, {r"\pi r^2": "img_1"})
        FormulaRenderer()
        assert "matplotlib" not in sys.modules, sorted(sys.modules)
        """
    )
    result = run_python(script)
    assert result.returncode == 0, result.stderr


# ---- properties ------------------------------------------------------------------------------

PIECES = ["$", "$$", "\\", "\\$", "\\[", "\\]", "\\(", "\\)", "`", "```", "~~~", "\n", "\n\n"]
PIECES += [" ", "x", "5", ".", "^", "{", "}", "- ", "> "]
TEXTS = st.one_of(st.text(), st.lists(st.sampled_from(PIECES), max_size=40).map("".join))


@settings(max_examples=300, deadline=None)
@given(TEXTS)
def test_formulas_are_in_order_within_bounds_and_never_overlap(text: str) -> None:
    formulas = find_formulas(text)
    previous_end = 0
    for formula in formulas:
        assert previous_end <= formula.start < formula.end <= len(text)
        assert formula.source
        assert formula.source == formula.source.strip()
        assert formula.source in text[formula.start : formula.end]
        previous_end = formula.end
    shown = formulas_as_code(text)
    assert find_formulas(shown) == [], "shown as code, no formula is left"
    if not formulas:
        assert shown == text
        assert place_images(text, {"x": "img_x"}) == text

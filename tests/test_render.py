"""Safe rendering: what the model writes is shown, never obeyed, by Feishu's markdown and text."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.feishu.render import ZWSP, safe_markdown, safe_plain_text

#: A Feishu tag that is still live: what neither function may leave outside code.
LIVE_TAG = re.compile(r"<\s*/?\s*(?:at|person|a|link|number_tag)(?![A-Za-z0-9])", re.I)

FUZZ = settings(max_examples=200, deadline=None)

#: Pieces of text without code or links: tags, spacing, escapes, lists, surrogates.
PROSE = [
    "<",
    ">",
    "/",
    "at",
    "AT",
    "person",
    "link",
    "a",
    " ",
    "\n",
    "\t",
    "(",
    ")",
    "\\",
    ":",
    "|",
    "- ",
    "> ",
    "1. ",
    "    ",
    "javascript",
    "https",
    "lark://x",
    "img_v3_k",
    "id=all",
    'user_id="all"',
    "<at id=all></at>",
    "<javascript:y>",
    ZWSP,
    "\ud800",
]
#: ... and the pieces that make code and links, so that everything interacts.
MARKUP = ["[", "]", "![", "](", "`", "``", "```", "~~~", "[x](javascript:y)", "http://x"]
prose = st.lists(st.sampled_from(PROSE), max_size=40).map("".join)
markdownish = st.lists(st.sampled_from(PROSE + MARKUP), max_size=40).map("".join)
any_text = st.one_of(markdownish, st.text(st.characters(exclude_categories=())))


def test_at_all_in_model_output_is_not_a_mention() -> None:
    assert safe_markdown("Done! <at id=all></at>") == f"Done! <{ZWSP}at id=all><{ZWSP}/at>"


@pytest.mark.parametrize(
    "tag",
    [
        "<AT id=all></AT>",
        "<At ID=all>",
        "< at id=all>",
        "<at\n id=all>",
        "<at\tid=all>",
        "< / at>",
        '<at user_id="all">everyone</at>',
        '<at name="x" user_id="all"></at>',
        "<at ids=ou_1,ou_2></at>",
        "<at email=boss@example.com></at>",
        "<at_all>",
    ],
)
def test_mentions_are_neutralised_in_any_case_spacing_and_attribute_form(tag: str) -> None:
    rendered = safe_markdown(f"hi {tag} there")
    assert LIVE_TAG.search(rendered) is None
    assert rendered.replace(ZWSP, "") == f"hi {tag} there"  # still shown, literally


@pytest.mark.parametrize(
    "tag",
    [
        "<person id='ou_1' show_name=true show_avatar=true></person>",
        "<a href='lark://applink'>open</a>",
        "<link icon='chat' url='lark://x' pc_url=''>open</link>",
        "<number_tag url='lark://x'>1</number_tag>",
    ],
)
def test_tags_that_show_a_person_or_link_past_the_url_check_are_neutralised(tag: str) -> None:
    rendered = safe_markdown(tag)
    assert LIVE_TAG.search(rendered) is None
    assert rendered.replace(ZWSP, "") == tag


@pytest.mark.parametrize(
    "text", ["if a <b and b< c", "<atom> <abbr> <font color='red'>red</font>", "x<y", "<br>"]
)
def test_harmless_angle_brackets_and_tags_are_left_alone(text: str) -> None:
    assert safe_markdown(text) == text


@pytest.mark.parametrize(
    "block",
    [
        "```\n<at id=all></at>\n[x](javascript:alert(1))\n```",
        "```html\n<a href='lark://x'>x</a>\n```",
        '~~~python\n<at user_id="all"></at>\n~~~',
        "````md\n``inline``\n<at id=all>\n````",
        "  ```\n<person id=ou_1></person>\n  ```",
    ],
)
def test_fenced_code_blocks_are_untouched_byte_for_byte(block: str) -> None:
    text = f"Here:\n\n{block}\n\nand <at id=all> after"
    rendered = safe_markdown(text)
    assert block in rendered
    assert rendered.endswith(f"and <{ZWSP}at id=all> after")


def test_where_markdown_readers_could_disagree_about_code_the_text_is_neutralised() -> None:
    # CommonMark keeps the ``` line inside the ```` block; a lenient reader would close the
    # block there and render the mention. The mention is neutralised (invisibly) either way.
    rendered = safe_markdown("````\n```\n<at id=all>\n````")
    assert rendered == f"````\n```\n<{ZWSP}at id=all>\n````"


def test_an_unclosed_fence_runs_to_the_end_untouched() -> None:
    text = "streaming so far:\n```js\nel.innerHTML = '<at id=all></at>'"
    assert safe_markdown(text) == text


@pytest.mark.parametrize(
    "span", ["`<at id=all>`", "``a ` <at id=all> ``", "`[x](javascript:y)`", "```<at>```"]
)
def test_inline_code_is_untouched_byte_for_byte(span: str) -> None:
    rendered = safe_markdown(f"use {span} then <at id=all>")
    assert rendered == f"use {span} then <{ZWSP}at id=all>"


def test_escaped_backticks_do_not_make_code() -> None:
    assert safe_markdown(r"\`<at id=all>\`") == rf"\`<{ZWSP}at id=all>\`"


def test_code_spans_that_a_table_or_a_line_break_would_split_are_not_trusted() -> None:
    assert LIVE_TAG.search(safe_markdown("| `a | <at id=all>` |")) is None
    assert LIVE_TAG.search(safe_markdown("- `a\n- <at id=all>`")) is None


def test_a_fence_closed_inside_a_list_item_does_not_hide_what_follows() -> None:
    text = "- ```\n  code\n  ```\n<at id=all></at>"
    assert LIVE_TAG.search(safe_markdown(text)) is None


@pytest.mark.parametrize(
    "link",
    [
        "[docs](https://open.feishu.cn/document)",
        "[docs](http://example.com/a_(b))",
        "[docs](HTTPS://EXAMPLE.COM)",
        "[docs]( https://example.com)",
        '[docs](https://example.com "title")',
        "[docs](<https://example.com/a b>)",
        "![chart](https://example.com/chart.png)",
        "<https://example.com>",
    ],
)
def test_http_and_https_links_and_images_are_kept(link: str) -> None:
    assert safe_markdown(f"see {link}.") == f"see {link}."


@pytest.mark.parametrize(
    ("link", "shown"),
    [
        ("[label](javascript:alert(1))", f"label (javascript{ZWSP}:alert(1))"),
        ("[label](JavaScript:alert(1))", f"label (JavaScript{ZWSP}:alert(1))"),
        (
            "[open](lark://applink.feishu.cn/client/x)",
            f"open (lark{ZWSP}://applink.feishu.cn/client/x)",
        ),
        ("[file](file:///etc/passwd)", f"file (file{ZWSP}:///etc/passwd)"),
        ("[x](data:text/html,hi)", f"x (data{ZWSP}:text/html,hi)"),
        ("[x](<javascript:alert(1)>)", f"x (javascript{ZWSP}:alert(1))"),
        ("[x](word)", "x (word)"),
        ("![pic](javascript:alert(1))", f"pic (javascript{ZWSP}:alert(1))"),
    ],
)
def test_links_with_other_schemes_show_the_label_and_the_url_as_plain_text(
    link: str, shown: str
) -> None:
    assert safe_markdown(link) == shown
    assert safe_markdown(f"go {link} now") == f"go {shown} now"


def test_images_of_a_feishu_image_key_are_kept() -> None:
    text = "![image](img_v3_02ab_0d6d1a3b-1f2e-4c8b-a1f0-123456789abg)"
    assert safe_markdown(text) == text


def test_autolinks_with_other_schemes_are_defused() -> None:
    assert safe_markdown("<javascript:alert(1)>") == f"<{ZWSP}javascript{ZWSP}:alert(1)>"
    assert safe_markdown("<lark://x>") == f"<{ZWSP}lark{ZWSP}://x>"


def test_reference_definitions_with_other_schemes_no_longer_define_a_link() -> None:
    rendered = safe_markdown("[click][1]\n\n[1]: javascript:alert(1)")
    assert rendered == f"[click][1]\n\n[1]{ZWSP}: javascript:alert(1)"
    assert safe_markdown("[1]: https://ok.example") == "[1]: https://ok.example"


def test_a_link_whose_url_starts_inside_code_is_still_defused() -> None:
    rendered = safe_markdown("[a](javascript:`x)`")
    assert "](javascript:" not in rendered
    assert rendered.endswith("`x)`")


def test_a_mention_inside_a_kept_links_label_is_neutralised() -> None:
    text = "[<at id=all></at>](https://example.com)"
    assert safe_markdown(text) == f"[<{ZWSP}at id=all><{ZWSP}/at>](https://example.com)"


def test_links_exposed_by_defusing_an_inner_link_are_defused_too() -> None:
    rendered = safe_markdown("[[a](javascript:b)](lark://c)")
    assert "](javascript" not in rendered
    assert "](lark" not in rendered


def test_plain_text_neutralises_mentions_everywhere_even_in_backticks() -> None:
    text = '<at user_id="all"></at> and `<at user_id="all"></at>`'
    rendered = safe_plain_text(text)
    assert LIVE_TAG.search(rendered) is None
    assert rendered.replace(ZWSP, "") == text


def test_plain_text_leaves_links_and_other_text_alone() -> None:
    text = "[x](javascript:y) <javascript:y> a < b"
    assert safe_plain_text(text) == text


def test_every_prefix_of_a_streamed_answer_is_safe() -> None:
    answer = "Sure <at id=all></at>, see [here](lark://x) and <person id=ou_1></person>."
    for end in range(len(answer) + 1):
        rendered = safe_markdown(answer[:end])
        assert LIVE_TAG.search(rendered) is None
        assert "](lark:" not in rendered


@FUZZ
@given(any_text)
def test_safe_markdown_is_idempotent_and_never_raises(text: str) -> None:
    once = safe_markdown(text)
    assert safe_markdown(once) == once


@FUZZ
@given(any_text)
def test_safe_plain_text_is_idempotent_and_never_raises(text: str) -> None:
    once = safe_plain_text(text)
    assert safe_plain_text(once) == once
    assert LIVE_TAG.search(once) is None


@FUZZ
@given(prose)
def test_without_code_or_links_only_zero_width_spaces_are_added_and_no_tag_stays(
    text: str,
) -> None:
    rendered = safe_markdown(text)
    assert rendered.replace(ZWSP, "") == text.replace(ZWSP, "")
    assert LIVE_TAG.search(rendered) is None


code_line = st.text(
    st.characters(exclude_characters="`~\n", exclude_categories=()), max_size=30
) | st.sampled_from(["<at id=all></at>", "[x](javascript:y)", "<javascript:y>", ""])


@FUZZ
@given(markdownish, st.lists(code_line, max_size=5), markdownish)
def test_code_blocks_survive_any_surrounding_text_byte_for_byte(
    before: str, lines: list[str], after: str
) -> None:
    block = "```\n" + "\n".join(lines) + "\n```"
    # Blank lines around the block keep the surrounding text from reaching into it.
    rendered = safe_markdown(f"{before}\n\n{block}\n\n{after}")
    if before.count("```") == 0 and before.count("~~~") == 0:
        assert block in rendered

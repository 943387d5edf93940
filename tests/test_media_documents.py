"""Files become plain text for the model: text in any common encoding, source code and PDF."""

from __future__ import annotations

import codecs
import os

import pytest

from bot.errors import MediaError, MediaUnreadable
from bot.media.documents import (
    PDF_SUFFIX,
    TEXT_SUFFIXES,
    ExtractedText,
    describe_readable_types,
    extract_text,
    is_readable_file,
)
from tests.helpers import run_python
from tests.media_fixtures import make_encrypted_pdf, make_pdf, make_png

CHINESE = "会议纪要：第一季度销售额增长百分之十二。\n下一步：招聘两名工程师。"

# --- which files are read ------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "notes.txt",
        "README.md",
        "REPORT.PDF",
        "data.Csv",
        "config.yaml",
        "main.py",
        "App.tsx",
        "Makefile",
        "Dockerfile",
        "src/lib/util.rs",
        "C:\\Users\\me\\script.ps1",
    ],
)
def test_text_data_source_and_pdf_files_are_readable_whatever_the_case(name: str) -> None:
    assert is_readable_file(name)


@pytest.mark.parametrize(
    "name", ["setup.exe", "letter.docx", "sheet.xlsx", "photo.jpg", "archive.zip", "noextension"]
)
def test_binary_and_office_files_are_not_readable(name: str) -> None:
    assert not is_readable_file(name)


def test_suffix_list_is_lower_case_with_the_dot() -> None:
    assert all(suffix == suffix.lower() and suffix.startswith(".") for suffix in TEXT_SUFFIXES)
    assert {".txt", ".md", ".json", ".py", ".go", ".scss"} <= TEXT_SUFFIXES
    assert PDF_SUFFIX not in TEXT_SUFFIXES


def test_readable_types_are_described_in_a_short_phrase() -> None:
    description = describe_readable_types()

    assert ".txt" in description
    assert ".csv" in description
    assert "source code" in description
    assert "PDF" in description
    assert len(description) < 160


@pytest.mark.parametrize("name", ["setup.exe", "letter.docx"])
def test_unsupported_file_is_refused_with_the_types_that_are_supported(name: str) -> None:
    with pytest.raises(MediaError) as caught:
        extract_text(name, b"PK\x03\x04 whatever")

    message = str(caught.value)
    assert not isinstance(caught.value, MediaUnreadable)
    assert name.rsplit(".", 1)[1] in message
    assert describe_readable_types() in message


def test_unsupported_file_without_a_suffix_is_refused_politely() -> None:
    with pytest.raises(MediaError, match=r"^I can't read this kind of file\."):
        extract_text("blob", b"data")


# --- text files ------------------------------------------------------------------------------


def test_utf8_text_is_read_as_it_is() -> None:
    result = extract_text("notes.txt", "Café au lait ☕\nzweite Zeile\n".encode())

    assert result == ExtractedText("Café au lait ☕\nzweite Zeile", None)


def test_utf8_with_a_bom_loses_the_bom() -> None:
    result = extract_text("data.csv", codecs.BOM_UTF8 + "name,city\n张三,北京".encode())

    assert result.text == "name,city\n张三,北京"


def test_gb18030_chinese_text_is_decoded() -> None:
    result = extract_text("纪要.txt", CHINESE.encode("gb18030"))

    assert result.text == CHINESE


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-be", "utf-32"])
def test_utf16_and_utf32_with_a_bom_are_decoded(codec: str) -> None:
    data = CHINESE.encode(codec)
    if codec == "utf-16-be":
        data = codecs.BOM_UTF16_BE + data

    result = extract_text("notes.txt", data)

    assert result.text == CHINESE


def test_latin1_text_that_is_neither_utf8_nor_gb18030_falls_back_to_latin1() -> None:
    text = "Grüße aus Köln, ½ Preis für alle!"

    result = extract_text("note.txt", text.encode("latin-1"))

    assert result.text == text


def test_windows_and_old_mac_newlines_become_unix_newlines() -> None:
    result = extract_text("log.log", b"one\r\ntwo\rthree\n")

    assert result.text == "one\ntwo\nthree"


def test_trailing_whitespace_is_stripped_but_indentation_kept() -> None:
    result = extract_text("main.py", b"    def f():\n        return 1\n\n\n   ")

    assert result.text == "    def f():\n        return 1"


def test_stray_nul_characters_are_dropped() -> None:
    # Logs written by a crashing program often end in a few NULs.
    result = extract_text("app.log", b"started\n" * 100 + b"crashed\x00\x00\x00\n")

    assert "\x00" not in result.text
    assert result.text.endswith("started\ncrashed")


@pytest.mark.parametrize(
    "data",
    [
        b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff\x00\x00" * 100,
        os.urandom(20_000),
        make_png(200, 200),
    ],
    ids=["executable-with-nuls", "random-bytes", "png"],
)
def test_binary_bytes_under_a_text_name_are_refused(data: bytes) -> None:
    with pytest.raises(MediaUnreadable, match="does not look like text"):
        extract_text("notes.txt", data)


def test_empty_text_file_is_refused() -> None:
    with pytest.raises(MediaUnreadable, match="empty"):
        extract_text("notes.txt", b" \n\n")


# --- PDF -------------------------------------------------------------------------------------


def test_pdf_text_is_extracted_page_by_page() -> None:
    pdf = make_pdf(["First page text", "Second page (with brackets)\nand a second line"])

    result = extract_text("report.pdf", pdf)

    assert result.pages == 2
    assert result.text == ("First page text\n\nSecond page (with brackets)\nand a second line")


def test_pdf_is_read_only_up_to_max_pages_but_all_pages_are_counted() -> None:
    pdf = make_pdf([f"Page number {number}" for number in range(1, 6)])

    result = extract_text("long.pdf", pdf, max_pages=2)

    assert result.pages == 5
    assert result.text == "Page number 1\n\nPage number 2"


def test_password_protected_pdf_is_refused_saying_so() -> None:
    pdf = make_encrypted_pdf("Top secret figures", "hunter2")

    with pytest.raises(MediaUnreadable, match="password"):
        extract_text("secret.pdf", pdf)


def test_pdf_encrypted_with_an_empty_user_password_is_read() -> None:
    # Many PDFs are "encrypted" only to restrict printing or copying; they open for anyone.
    pdf = make_encrypted_pdf("Quarterly numbers", "")

    result = extract_text("restricted.pdf", pdf)

    assert result == ExtractedText("Quarterly numbers", 1)


@pytest.mark.parametrize(
    "data",
    [b"", b"%PDF-1.4\nthis is not really a pdf", make_pdf(["hello"])[:60], b"\x00" * 100],
    ids=["empty", "header-only", "truncated", "zeros"],
)
def test_broken_pdf_is_unreadable(data: bytes) -> None:
    with pytest.raises(MediaUnreadable, match="could not read this PDF"):
        extract_text("broken.pdf", data)


def test_pdf_with_no_text_is_refused_as_a_probable_scan() -> None:
    with pytest.raises(MediaUnreadable, match="may be a scan"):
        extract_text("scan.pdf", make_pdf(["", ""]))


def test_pages_without_text_are_skipped_in_the_join() -> None:
    result = extract_text("mixed.pdf", make_pdf(["Cover", "", "Chapter one"]))

    assert result == ExtractedText("Cover\n\nChapter one", 3)


# --- cost of importing -----------------------------------------------------------------------


def test_importing_the_media_modules_loads_no_media_library() -> None:
    script = (
        "import sys\n"
        "import bot.media.audio, bot.media.images, bot.media.documents\n"
        "print(sorted(name for name in ('av', 'PIL', 'pypdf') if name in sys.modules))\n"
    )

    result = run_python(script)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

"""Files users send, read as plain text for the model: text, data, source code and PDF.

Which files count as readable is decided by name alone (suffix, or a well-known name such as
``Makefile``), so the bot can refuse a ``.docx`` before downloading it. Text files come in
whatever encoding the sender's editor used: UTF-8 (with or without a BOM), UTF-16 or UTF-32
with a BOM, GB18030 (the usual Chinese Windows encoding) and, as a last resort, Latin-1; bytes
that look binary are refused rather than handed to the model as mojibake. PDFs are read with
pypdf, page by page; scans (pages that are only images) have no text and are refused.
"""

from __future__ import annotations

import codecs
import io
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import PurePosixPath

from bot.errors import MediaError, MediaUnreadable

_TEXT = (".txt", ".md", ".markdown", ".log")
_DATA = (
    ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml", ".toml", ".ini", ".cfg", ".xml",
    ".html", ".htm", ".sql",
)  # fmt: skip
_SOURCE = (
    ".py", ".js", ".ts", ".tsx", ".jsx", ".java", ".kt", ".go", ".rs", ".c", ".h", ".cpp",
    ".hpp", ".cc", ".cs", ".rb", ".php", ".swift", ".m", ".scala", ".sh", ".bash", ".zsh",
    ".ps1", ".r", ".lua", ".pl", ".dart", ".vue", ".css", ".scss",
)  # fmt: skip

#: file name suffixes whose text the bot reads (lower case, with the dot)
TEXT_SUFFIXES: frozenset[str] = frozenset(_TEXT + _DATA + _SOURCE)
#: names of suffix-less text files the bot reads (lower case)
TEXT_FILE_NAMES: frozenset[str] = frozenset(
    {
        "makefile", "dockerfile", "containerfile", "jenkinsfile", "vagrantfile", "gemfile",
        "rakefile", "procfile", "readme", "license", "changelog", ".gitignore", ".dockerignore",
        ".editorconfig",
    }
)  # fmt: skip
PDF_SUFFIX = ".pdf"

#: Byte order marks, longest first: the UTF-32 LE mark begins with the UTF-16 LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
#: How much of a file the binary sniffing looks at, and the shares of suspicious bytes above
#: which it is binary. Compressed or encrypted data has ~0.4 % NULs and ~20 % control bytes.
_SNIFF_BYTES = 64 * 1024
_MAX_NUL_SHARE = 0.01
_MAX_CONTROL_SHARE = 0.10
#: C0 controls other than tab, newlines, form feed, backspace and escape; DEL; C1 controls.
_CONTROL_BYTES = bytes(
    [*range(0x00, 0x08), 0x0B, *range(0x0E, 0x1B), *range(0x1C, 0x20), *range(0x7F, 0xA0)]
)
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")

_NOT_TEXT = "This file does not look like text, so I cannot read it."
_EMPTY = "This file is empty, so there is nothing for me to read."
_PDF_DAMAGED = "I could not read this PDF; it may be damaged. Please export it again and resend it."
_PDF_LOCKED = (
    "This PDF is password-protected, so I cannot read it. Please send a copy without a password."
)
_PDF_NO_TEXT = (
    "This PDF has no text I can read (it may be a scan or contain only images). "
    "Please send a version with selectable text."
)


@dataclass(frozen=True)
class ExtractedText:
    """The text of a file; ``pages`` is a PDF's total page count, None for text files."""

    text: str
    pages: int | None


def is_readable_file(name: str) -> bool:
    """Whether ``extract_text`` reads a file of this name (judged by its suffix or name)."""
    base = _base_name(name)
    suffix = PurePosixPath(base).suffix
    return suffix in TEXT_SUFFIXES or suffix == PDF_SUFFIX or base in TEXT_FILE_NAMES


def describe_readable_types() -> str:
    """The readable kinds of file as a short phrase for a chat reply."""
    return (
        "text (.txt, .md, .log), data (.csv, .json, .yaml, .xml), "
        "source code (.py, .js, .go, .java and more) and PDF files"
    )


def extract_text(name: str, data: bytes, *, max_pages: int = 200) -> ExtractedText:
    """Read the text of a file whose name passes ``is_readable_file``.

    A PDF is read up to its first ``max_pages`` pages; ``pages`` still reports all of them, so
    the caller can tell the user the rest was left out. Raises ``MediaError`` for a kind of
    file the bot does not read and ``MediaUnreadable`` for bytes that hold no readable text.
    """
    if not is_readable_file(name):
        raise MediaError(_unsupported(name))
    if PurePosixPath(_base_name(name)).suffix == PDF_SUFFIX:
        return _pdf_text(data, max_pages)
    text = _clean(_decode_text(data))
    if not text.strip():
        raise MediaUnreadable(_EMPTY)
    return ExtractedText(text, None)


def _decode_text(data: bytes) -> str:
    for bom, codec in _BOMS:
        if data.startswith(bom):
            return data.decode(codec, errors="replace")
    sample = data[:_SNIFF_BYTES]
    if sample.count(0) > len(sample) * _MAX_NUL_SHARE:
        raise MediaUnreadable(_NOT_TEXT)
    for codec in ("utf-8", "gb18030"):
        try:
            return data.decode(codec)
        except UnicodeDecodeError:
            continue
    # Latin-1 decodes any bytes at all, so it is only trusted on bytes that look like text.
    if len(sample) - len(sample.translate(None, _CONTROL_BYTES)) > len(sample) * _MAX_CONTROL_SHARE:
        raise MediaUnreadable(_NOT_TEXT)
    return data.decode("latin-1")


def _pdf_text(data: bytes, max_pages: int) -> ExtractedText:
    from pypdf import PasswordType, PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, PyPdfError

    # pypdf meets damaged files with almost any built-in exception, not only its own.
    damaged = (
        PyPdfError, DependencyError, ArithmeticError, AssertionError, AttributeError, EOFError,
        LookupError, NotImplementedError, OSError, RecursionError, TypeError, ValueError,
        struct.error, zlib.error,
    )  # fmt: skip
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and reader.decrypt("") == PasswordType.NOT_DECRYPTED:
            raise MediaUnreadable(_PDF_LOCKED)
        total = len(reader.pages)
        texts: list[str] = []
        for index in range(min(total, max_pages)):
            try:
                page_text = reader.pages[index].extract_text()
            except FileNotDecryptedError:
                raise
            except damaged:
                continue  # one broken page should not hide the text of the others
            if page_text.strip():
                texts.append(page_text.rstrip())
    except FileNotDecryptedError as exc:
        raise MediaUnreadable(_PDF_LOCKED) from exc
    except damaged as exc:
        raise MediaUnreadable(_PDF_DAMAGED) from exc
    text = _clean("\n\n".join(texts))
    if not text.strip():
        raise MediaUnreadable(_PDF_NO_TEXT)
    return ExtractedText(text, total)


def _clean(text: str) -> str:
    """Normalise newlines and drop what no model wants: NULs, lone surrogates, trailing space."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    return _LONE_SURROGATE.sub("", text).rstrip()


def _base_name(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1].strip().lower()


def _unsupported(name: str) -> str:
    suffix = PurePosixPath(_base_name(name)).suffix
    kind = f"{suffix} files" if suffix[1:].isalnum() and len(suffix) <= 10 else "this kind of file"
    return (
        f"I can't read {kind}. I can read {describe_readable_types()}; "
        "please save other documents as PDF or plain text first."
    )

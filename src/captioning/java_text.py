"""Text as Java sees it, for the PTB tokenizer's exact output: strings of UTF-16 code units,
Java's lower-casing (`String.toLowerCase`, which CoreNLP applies token by token) and its rules
for what a cased letter and a word are.
"""

import re
import unicodedata


def to_utf16_units(text: str) -> str:
    """Split characters outside the BMP into surrogate pairs, as Java strings hold them."""
    if text.isascii() or all(ord(c) < 0x10000 for c in text):
        return text
    out = []
    for c in text:
        cp = ord(c)
        if cp < 0x10000:
            out.append(c)
        else:
            out += (chr(0xD800 + ((cp - 0x10000) >> 10)), chr(0xDC00 + ((cp - 0x10000) & 0x3FF)))
    return "".join(out)


_SURROGATE = re.compile("[\ud800-\udfff]")


def from_utf16_units(token: str) -> str:
    if not _SURROGATE.search(token):
        return token
    joined = token.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    return _SURROGATE.sub("?", joined)  # Java's UTF-8 writer prints a lone surrogate as "?"


def java_lower(token: str) -> str:
    """Java's String.toLowerCase(Locale.ENGLISH); only the final-sigma rule differs from Python."""
    if "\u03a3" not in token:
        return token.lower()
    out = [c.lower() for c in token]
    for start, end in _java_word_spans(token):
        for i in range(start, end):
            if token[i] == "\u03a3":
                final = any(map(_java_cased, token[start:i])) and not any(
                    map(_java_cased, token[i + 1 : end])
                )
                out[i] = "\u03c2" if final else "\u03c3"
    return "".join(out)


def _java_cased(ch: str) -> bool:
    cp = ord(ch)
    return unicodedata.category(ch) in ("Lu", "Ll", "Lt") or any(
        a <= cp <= b
        for a, b in ((0x2B0, 0x2B8), (0x2C0, 0x2C1), (0x2E0, 0x2E4), (0x345, 0x345),
                     (0x37A, 0x37A), (0x1D2C, 0x1D61), (0x2160, 0x217F), (0x24B6, 0x24E9))
    )  # fmt: skip


def _java_word_kind(ch: str) -> str:
    cp = ord(ch)
    if cp == 0x3005 or 0x4E00 <= cp <= 0x9FA5 or 0xF900 <= cp <= 0xFA2D or 0x3041 <= cp <= 0x30FE:
        return "x"  # ideographs and kana are words of their own
    cat = unicodedata.category(ch)
    if cat in ("Mn", "Me", "Cf"):
        return "i"
    if cat[0] == "L" or cat in ("Mc", "Pc"):
        return "L"
    if cat[0] == "N":
        return "D"
    if ch in "\"'.":
        return "LD"  # joins letters to letters and digits to digits
    if cat == "Pd" or ch in "\u00ad\u2027":
        return "l"  # joins letters only
    if ch in ",\u066b":
        return "d"  # joins digits only
    return "x"


def _java_word_spans(token: str) -> list[tuple[int, int]]:
    """Word spans as Java's legacy word BreakIterator sees them (used for the final sigma)."""
    kinds = [_java_word_kind(c) for c in token]
    spans, i, n = [], 0, len(token)
    while i < n:
        if kinds[i] not in ("L", "D"):
            i += 1
            continue
        start, last, j = i, kinds[i], i + 1
        while j < n:
            k = kinds[j]
            joins = (
                k in ("LD", "l", "d")
                and j + 1 < n
                and kinds[j + 1] == last
                and (k == "LD" or (k == "l") == (last == "L"))
            )
            if k in ("L", "D"):
                last, j = k, j + 1
            elif k == "i" or joins:
                j += 1
            else:
                break
        spans.append((start, j))
        i = j
    return spans

"""PTB tokenisation exactly as coco-caption scores captions, in pure Python (no Java).

`tokenize` reproduces pycocoevalcap's `PTBTokenizer` (Stanford CoreNLP 3.4.1 PTBLexer run with
`-preserveLines -lowerCase`, then removal of its punctuation tokens). The lexer below is a
re-implementation of that JFlex grammar: maximal munch over an ordered rule list, trailing
contexts included in the match length, ties to the earlier rule. The vocabulary splits captions
with it, so generated words are the scorer's tokens; the metrics score its output.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .java_text import from_utf16_units, java_lower, to_utf16_units

__all__ = ["PUNCTUATIONS", "tokenize", "tokenize_caption"]

# pycocoevalcap's PTBTokenizer drops exactly these tokens. It compares them after Java has
# lowercased the line, so "-LRB-" never matches: "(" survives as "-lrb-", as in coco-caption.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
     "--", "...", ";"]
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# PTB tokenizer: the macros of PTBLexer.flex (CoreNLP 3.4.1) as Python regular expressions.
# JFlex's %caseless applies to literal strings but not to character classes, hence _ci() for
# literals and verbatim classes. Java sees UTF-16, so text is lexed as UTF-16 code units.
# ---------------------------------------------------------------------------------------------


def _ci(literal: str) -> str:
    """Regex matching `literal` case-insensitively the way JFlex %caseless does (ASCII here)."""
    out = []
    for ch in literal:
        lo, up = ch.lower(), ch.upper()
        out.append(f"[{lo}{up}]" if ch.isalpha() and lo != up else re.escape(ch))
    return "".join(out)


def _alts(*patterns: str) -> str:
    return "(?:" + "|".join(patterns) + ")"


def _cis(*literals: str) -> str:
    return _alts(*(_ci(w) for w in literals))


def _bmp_class(pred: Callable[[str], bool]) -> str:
    """Regex class body of the BMP code points (surrogates excluded) satisfying `pred`."""
    ranges: list[tuple[int, int]] = []
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF or not pred(chr(cp)):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    return "".join(f"\\u{a:04x}" if a == b else f"\\u{a:04x}-\\u{b:04x}" for a, b in ranges)


class _Rule(NamedTuple):
    name: str
    regex: re.Pattern[str]  # group 1: the token, group 2 (if any): trailing context
    action: str
    pushback: int


def _build_rules() -> list[_Rule]:
    """Compile the lexer rules in PTBLexer's priority order."""
    letters = _bmp_class(lambda c: unicodedata.category(c) in ("Lu", "Ll", "Lt", "Lm", "Lo"))
    digits = _bmp_class(lambda c: unicodedata.category(c) == "Nd")
    letter = f"[{letters}]"
    digit = f"[{digits}\\u07c0-\\u07c9]"
    letdig = f"[{letters}{digits}]"
    # combining marks etc. that PTBLexer accepts inside words although Java says "not a letter"
    word_extra = (
        "\\u00AD\\u0237-\\u024F\\u02C2-\\u02C5\\u02D2-\\u02DF\\u02E5-\\u02FF\\u0300-\\u036F"
        "\\u0370-\\u037D\\u0384\\u0385\\u03CF\\u03F6\\u03FC-\\u03FF\\u0483-\\u0487\\u04CF"
        "\\u04F6-\\u04FF\\u0510-\\u0525\\u055A-\\u055F\\u0591-\\u05BD\\u05BF\\u05C1\\u05C2"
        "\\u05C4\\u05C5\\u05C7\\u0615-\\u061A\\u063B-\\u063F\\u064B-\\u065E\\u0670\\u06D6-\\u06EF"
        "\\u06FA-\\u06FF\\u070F\\u0711\\u0730-\\u074F\\u0750-\\u077F\\u07A6-\\u07B1\\u07CA-\\u07F5"
        "\\u07FA\\u0900-\\u0903\\u093C\\u093E-\\u094E\\u0951-\\u0955\\u0962-\\u0963\\u0981-\\u0983"
        "\\u09BC-\\u09C4\\u09C7\\u09C8\\u09CB-\\u09CD\\u09D7\\u09E2\\u09E3\\u0A01-\\u0A03\\u0A3C"
        "\\u0A3E-\\u0A4F\\u0A81-\\u0A83\\u0ABC-\\u0ACF\\u0B82\\u0BBE-\\u0BC2\\u0BC6-\\u0BC8"
        "\\u0BCA-\\u0BCD\\u0C01-\\u0C03\\u0C3E-\\u0C56\\u0D3E-\\u0D44\\u0D46-\\u0D48\\u0E30-\\u0E3A"
        "\\u0E47-\\u0E4E\\u0EB1-\\u0EBC\\u0EC8-\\u0ECD"
    )
    splet = "&[aeiouAEIOU]" + _cis("acute", "grave", "uml") + ";"
    word_letter = f"(?:[{letters}{word_extra}]|{splet})"
    word_letdig = f"(?:[{letters}{digits}\\u07c0-\\u07c9{word_extra}]|{splet})"
    word = f"{word_letter}{word_letdig}*(?:[.!?]{word_letter}{word_letdig}*)*"
    space = "[ \\t\\u00a0\\u2000-\\u200a\\u3000]"
    spaces = space + "+"
    newline = "(?:\\r\\n|\\r|\\n|\\u2028|\\u2029|\\x0b|\\x0c|\\x85)"
    spacenl = f"(?:{space}|{newline})"
    sgml_name = "[A-Za-z][A-Za-z0-9_:.\\-]*"
    sgml = (
        f"<(?:[!?][A-Za-z\\-][^>\\r\\n]*|{sgml_name}(?:[ ]+{sgml_name}"
        f"(?:[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"))?)*[ ]*/?|/{sgml_name})[ ]*>"
    )
    sentend = f"{spacenl}(?:{spacenl}|[A-Z]|{sgml})"
    date = f"{digit}{{1,2}}[\\-/]{digit}{{1,2}}[\\-/]{digit}{{2,4}}"
    number = f"[\\-+]?(?:{digit}*(?:[.:,\\u00ad\\u066b\\u066c]{digit}+)+|{digit}+)"
    subsupnum = (
        "[\\u207a\\u207b\\u208a\\u208b]?"
        "(?:[\\u2070\\u00b9\\u00b2\\u00b3\\u2074-\\u2079]+|[\\u2080-\\u2089]+)"
    )
    frac = f"(?:{digit}{{1,4}}[- \\u00a0])?{digit}{{1,4}}(?:\\\\?/|\\u2044){digit}{{1,4}}"
    apos = "(?:['\\u0092\\u2019]|" + _ci("&apos;") + ")"
    aposetc = f"(?:{apos}|[`\\u0091\\u2018\\u201b])"
    hyphen = "[-_\\u058a\\u2010\\u2011]"
    spamp = _ci("&amp;")
    thing = f"(?:[dDoOlL]{aposetc}{letdig})?{letdig}+(?:{hyphen}(?:[dDoOlL]{aposetc}{letdig})?{letdig}+)*"  # noqa: E501
    thinga = f"[A-Z]+(?:(?:[+&]|{spamp})[A-Z]+)+"
    thing3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    # Python alternation is first-match, not longest: the longer special cases come first.
    acro_special = (
        _cis("Canada", "Sino", "Korean", "EU", "Japan", "non") + "-" + _ci("U.S")
        + "|" + _ci("U.S.-") + _cis("U.K", "U.S.S.R")
    )  # fmt: skip
    acro = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])*)"
    acro2 = f"(?:{acro_special}|[A-Za-z](?:\\.[A-Za-z])+)"
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\\u00ad]*(?:-(?:{acro2}\\.|[A-Za-z0-9\\u00ad]+))+"
    redaux = f"{apos}(?:[msdMSD]|{_cis('re', 've', 'll')})"
    sword = "[A-Za-z\\u00ad]*[A-MO-Za-mo-z]\\u00ad*"
    sredaux = f"[nN]{aposetc}[tT]"
    apoword = _alts(
        f"{apos}[nN]{apos}?", f"[lLdDjJ]{apos}", _ci("Dunkin") + apos, _ci("somethin") + apos,
        _ci("ol") + apos, apos + _ci("em"), f"[A-HJ-XZn]{aposetc}{letter}{{2}}{letter}*",
        f"{apos}[2-9]0[sS]", apos + _ci("til") + "[lL]?",
        f"{letter}{letter}*[aeiouyAEIOUY]{aposetc}[aeiouA-Z]{letter}*", apos + _ci("cause"),
        _ci("cont'd") + "\\.?", _ci("'twas"), _ci("nor'easter"), _ci("c'mon"), _ci("e'er"),
        _ci("s'mores"), _ci("ev'ry"), _ci("li'l"), _ci("nat'l"),
    )  # fmt: skip
    fullurl = _ci("http") + '[sS]?://[^ \\t\\n\\f\\r"<>|(){}]+[^ \\t\\n\\f\\r"<>|.!?(){},-]'
    # ",-_" inside the class is a range (0x2C-0x5F): JFlex reads it that way too.
    likelyurl = (
        "(?:(?:" + _ci("www") + "\\.(?:[^ \\t\\n\\f\\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4})|"
        "(?:(?:[^ \\t\\n\\f\\r\"`'<>|.!?(){},-_$]+\\.)+" + _cis("com", "net", "org", "edu")
        + "))(?:/[^ \\t\\n\\f\\r\"<>|()]+[^ \\t\\n\\f\\r\"<>|.!?(){},-])?"
    )  # fmt: skip
    email = (
        "(?:" + _ci("&lt;") + "|<)?[a-zA-Z0-9][^ \\t\\n\\f\\r\"<>|()\\u00a0{}]*@"
        "(?:[^ \\t\\n\\f\\r\"<>|(){}.\\u00a0]+\\.)*"
        "(?:[^ \\t\\n\\f\\r\"<>|(){}.\\u00a0]+)(?:" + _ci("&gt;") + "|>)?"
    )  # fmt: skip
    twitter = f"(?:@[a-zA-Z_][a-zA-Z_0-9]*|#{word_letter}+)"
    abmonth = _cis("Sept", "Jan", "Feb", "Mar", "Apr", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov",
                   "Dec")  # fmt: skip
    abdays = _cis("Tues", "Thurs", "Mon", "Tue", "Wed", "Thu", "Fri")
    abstate = _alts(
        _cis("Ala", "Ariz", "Calif", "Colo", "Conn", "Dak", "Fla", "Ga", "Ind", "Kans", "Kan",
             "Ky", "Md", "Mich", "Minn", "Mo", "Mont", "Neb", "Nev", "Okla", "Penn", "Tenn",
             "Va", "Vt", "Wisc", "Wis", "Wyo"),
        # states that are also common words only match with a capital first letter
        "A" + _ci("rk"), "D" + _ci("el"), "P" + _ci("a"), "L" + _ci("a"), "T" + _ci("ex"),
        "I" + _ci("ll"), "M" + _ci("ass"), "M" + _ci("iss"), "O" + _ci("re"), "W" + _ci("ash"),
    )  # fmt: skip
    abcomp = _alts(
        _cis("Inc", "Cos", "Co", "Corp", "Ltd", "Plc", "Bancorp", "Dept", "Bhd", "Assn", "Univ",
             "Intl", "Sys"),
        "[pP][pP]?[tT][yY][sS]?",
    )  # fmt: skip
    abnum = _cis("Ph", "tel", "est", "ext", "sq", "ft")
    abptit = _alts(_cis("Jr", "Sr", "Bros", "Blvd", "Rd", "Esq"), _cis("Ed", "Ph") + "\\.[dD]")
    abbrev1 = (
        _alts(abptit, abmonth, abdays, abstate, abcomp, abnum, _cis("etc", "al", "seq", "Bldg"))
        + "\\."
    )
    abbrev3 = _cis("ca", "figs", "fig", "prop", "nos", "no", "art", "pp", "op") + "\\."
    abtitle = _alts(
        _cis("Mrs", "Mr", "Ms", "Drs", "Dr", "Profs", "Prof", "Sens", "Sen", "Reps", "Rep",
             "Attys", "Atty", "Lt", "Col", "Gen", "Messrs", "Govs", "Gov", "Adm", "Rev", "Maj",
             "Sgt", "Cpl", "Pvt", "Mt", "Capt", "Ste", "St", "Ave", "Pres", "Lieut", "Hon",
             "Brig", "Comdr", "Cmdr", "Pfc", "Spc", "Supts", "Supt", "Det"),
        "M" + _ci("iss"),
    )  # fmt: skip
    abcomp2 = _alts(_cis("Invt", "Elec", "Natl"), "[mM][fFtT][gG]")
    abbrev4 = _alts(acro, abtitle, _cis("vs", "Alex", "Wm", "Jos", "Cie", "a.k.a", "cf", "TREAS"),
                    abcomp2, "[A-Za-z]")  # fmt: skip
    acronym_follow = _alts(
        *(w[0] + _ci(w[1:]) for w in (
            "About", "According", "Additionally", "After", "An", "A", "As", "At", "But",
            "Earlier", "He", "Her", "Here", "However", "If", "In", "It", "Last", "Many", "More",
            "Mr.", "Ms.", "Now", "Once", "One", "Other", "Our", "She", "Since", "So", "Some",
            "Such", "That", "Their", "The", "Then", "There", "These", "They", "This", "We",
            "When", "While", "What", "Yet", "You")),
        sgml,
    )  # fmt: skip
    phone = (
        "(?:(?:\\([0-9]{2,3}\\)[ \\u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[\\- \\u00a0])?"
        "[0-9]{2,4}[\\- \\u00a0])[0-9]{3,4}[\\- \\u00a0]?[0-9]{3,5}|"
        "(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5})"
    )
    quotes = (
        f"(?:{_ci('&apos;')}|''|[`\\u2018\\u2019\\u201a\\u201b\\u201c\\u201d\\u0091\\u0092"
        f"\\u0093\\u0094\\u201e\\u201f\\u2039\\u203a\\u00ab\\u00bb]{{1,2}}|{apos})"
    )
    dblquot = '(?:"|' + _ci("&quot;") + ")"
    tbspec = _alts(
        "-" + _cis("RRB", "LRB", "RCB", "LCB", "RSB", "LSB") + "-", _ci("C.D.s"), _ci("pro-"),
        _ci("anti-"), "[sS](?:&|" + spamp + ")[pP]-500", "[sS](?:&|" + spamp + ")" + _ci("Ls"),
        _ci("Cap") + apos + "[nN]", "[cC]" + apos + _ci("est"),
    )  # fmt: skip
    miscsymbol = (
        "[+%&~\\^|\\\\\\u00a6\\u00a7\\u00a8\\u00a9\\u00ac\\u00ae\\u00af\\u00b0-\\u00b3"
        "\\u00b4-\\u00ba\\u00d7\\u00f7\\u0387\\u05be\\u05c0\\u05c3\\u05c6\\u05f3\\u05f4"
        "\\u0600-\\u0603\\u0606-\\u060a\\u060c\\u0614\\u061b\\u061e\\u066a\\u066d\\u0703-\\u070d"
        "\\u07f6\\u07f7\\u07f8\\u0964\\u0965\\u0e4f\\u1fbd\\u2016\\u2017\\u2020-\\u2023"
        "\\u2030-\\u2038\\u203b\\u203e-\\u2042\\u2044\\u207a-\\u207f\\u208a-\\u208e\\u2100-\\u214f"
        "\\u2190-\\u21ff\\u2200-\\u2bff\\u3012\\u30fb\\uff01-\\uff0f\\uff1a-\\uff20"
        "\\uff3b-\\uff40\\uff5b-\\uff65]"
    )
    filename = f"{letdig}+(?:\\.{letdig}+)*\\." + _cis(
        "bat", "bmp", "class", "cgi", "cpp", "c", "dll", "docx", "doc", "exe", "gif", "gz", "html",
        "htm", "h", "jar", "java", "jpeg", "jpg", "mov", "mp3", "pdf", "php", "pl", "png", "ppt",
        "ps", "py", "sql", "tar", "txt", "wav", "xml", "x", "zip",
    )  # fmt: skip
    # "\\[" in the first alternative is a literal "[" (sic): the original grammar has that typo.
    asiansmiley = (
        "(?:[\\^x=~<>]\\.\\[\\^x=~<>]|[\\-\\^x=~<>']_[\\-\\^x=~<>']|"
        "\\([\\-\\^x=~<>'][_.]?[\\-\\^x=~<>']\\)|\\([\\^x=~<>']-[\\^x=~<>'`]\\))"
    )
    smiley = "[<>]?[:;=][\\-o\\*']?[()DPdpO\\\\{@|\\[\\]]"

    # (name, token regex, trailing context or None, action, chars pushed back after the match)
    table: list[tuple[str, str, str | None, str, int]] = [
        ("assim3", _alts(_ci("cannot"), "'" + _ci("twas")), None, "keep", 3),
        ("assim2", _alts(_cis("gonna", "gotta", "lemme", "gimme", "wanna"), "'" + _ci("tis")),
         None, "keep", 2),
        ("sgml", sgml, None, "nbsp", 0),
        ("spmdash", "(?:&" + _cis("MD", "mdash", "ndash") + ";|[\\u0096\\u0097\\u2013-\\u2015])",
         None, "=--", 0),
        ("spamp", spamp, None, "amp", 0),
        ("sppunc", "&(?:" + _cis("HT", "TL", "UR", "LR", "QC", "QL", "QR", "odq", "cdq")
         + "|#[0-9]+);", None, "keep", 0),
        ("word/redaux", word, redaux, "soft", 0),
        ("sword/sredaux", sword, sredaux, "soft", 0),
        ("word", word, None, "soft", 0),
        ("apoword", apoword, None, "keep", 0),
        ("apoword2", f"[yY]{apos}", letter, "keep", 0),
        ("fullurl", fullurl, None, "keep", 0),
        ("likelyurl", likelyurl, None, "keep", 0),
        ("email", email, None, "keep", 0),
        ("twitter", twitter, None, "keep", 0),
        ("redaux/", redaux, "[^A-Za-z]", "quote_right", 0),
        ("sredaux", sredaux, None, "quote_right", 0),
        ("date", date, None, "keep", 0),
        ("number", number, None, "soft", 0),
        ("subsupnum", subsupnum, None, "keep", 0),
        ("frac", frac, None, "nbsp", 0),
        ("frac2", "[\\u00bc\\u00bd\\u00be\\u2153-\\u215e]", None, "fraction", 0),
        ("tbspec", tbspec, None, "amp", 0),
        ("thing3", thing3, None, "keep", 0),
        ("dolsign", "(?:[A-Z]*\\$|#)", None, "keep", 0),
        ("dolsign2", "[\\u00a2\\u00a3\\u00a4\\u00a5\\u0080\\u20a0\\u20ac\\u060b\\u0e3f\\u20a4"
         "\\uffe0\\uffe1\\uffe5\\uffe6]", None, "currency", 0),
        ("acronym/", acro + "\\.", f"{spacenl}+{acronym_follow}{spacenl}", "acronym", 0),
        ("abbrev3/", abbrev3, f"{spacenl}?{digit}", "keep", 0),
        ("abbrev1/sentend", abbrev1, sentend, "period_again", 0),
        ("abbrev1/2", abbrev1, "[\\s\\S]{2}", "keep", 0),
        ("abbrev1", abbrev1, None, "period_again", 0),
        ("abbrev2", abbrev4 + "\\.", None, "keep", 0),
        ("abbrev4/", abbrev4, space, "keep", 0),
        ("acro/", acro, spacenl, "keep", 0),
        ("tbspec2/", f"{apos}[0-9][0-9]", spacenl, "keep", 0),
        ("filename/", filename, f"(?:{spacenl}|[.?!,])", "keep", 0),
        ("word./", word + "\\.", "[,;:\\u3001]", "soft", 0),
        ("phone", phone, None, "phone", 0),
        ("dblquot/", dblquot, "[A-Za-z0-9$]", "quote_left", 0),
        ("dblquot", dblquot, None, "quote_right", 0),
        ("del", "\\x7f", None, "skip", 0),
        ("smiley/", smiley, "[^A-Za-z0-9]", "parens", 0),
        ("asiansmiley", asiansmiley, None, "parens", 0),
        ("lt", "<|" + _ci("&lt;"), None, "=<", 0),
        ("gt", ">|" + _ci("&gt;"), None, "=>", 0),
        ("lcb", "\\{", None, "=-LCB-", 0),
        ("rcb", "\\}", None, "=-RCB-", 0),
        ("lsb", "\\[", None, "=-LSB-", 0),
        ("rsb", "\\]", None, "=-RSB-", 0),
        ("lrb", "\\(", None, "=-LRB-", 0),
        ("rrb", "\\)", None, "=-RRB-", 0),
        ("hyphens", "-+", None, "hyphens", 0),
        ("ldots", "(?:\\.{3,5}|(?:\\.[ \\u00a0]){2,4}\\.|[\\u0085\\u2026])", None, "=...", 0),
        ("fnmarks", "(?:@+|#+|_+)", None, "keep", 0),
        ("asts", "(?:\\*+|(?:\\\\\\*){1,3})", None, "keep", 0),
        ("insentp", "[,;:\\u3001]", None, "keep", 0),
        ("qmarks", "[?!]+", None, "keep", 0),
        ("period", "[.\\u00a1\\u00bf\\u037e\\u0589\\u061f\\u06d4\\u0700-\\u0702\\u07fa\\u3002]",
         None, "keep", 0),
        ("equals", "=", None, "keep", 0),
        ("slash", "/", None, "keep", 0),
        ("hthing./", hthing + "\\.", "[,;:\\u3001]", "soft", 0),
        ("hthing", hthing, None, "soft", 0),
        ("thing./", thing + "\\.", "[,;:\\u3001]", "keep", 0),
        ("thing", thing, None, "keep", 0),
        ("thinga./", thinga + "\\.", "[,;:\\u3001]", "amp", 0),
        ("thinga", thinga, None, "amp", 0),
        ("quote/", "'", "[A-Za-z][^ \\t\\n\\r\\u00a0]", "quote_left", 0),
        ("redaux", redaux, None, "quote_right", 0),
        ("quotes", quotes, None, "quote_right", 0),
        ("duckfeet", "<<|>>", None, "keep", 0),
        ("miscsymbol", miscsymbol, None, "keep", 0),
        ("space", f"(?:\\x00|{spaces}|[\\u200b\\u200e\\u200f\\ufeff])", None, "skip", 0),
        ("newline", newline, None, "skip", 0),
        ("nbsp", _ci("&nbsp;"), None, "skip", 0),
    ]  # fmt: skip
    rules = []
    for name, token, trail, action, pushback in table:
        pattern = f"({token})" + (f"({trail})" if trail else "")
        rules.append(_Rule(name, re.compile(pattern, re.DOTALL), action, pushback))
    return rules


def _first_chars(pattern: str) -> int:
    """Bit mask over the BMP of characters that can start a match (an over-approximation)."""
    try:
        from re import _constants as sc  # noqa: PLC0415
        from re import _parser as sp  # noqa: PLC0415
    except ImportError:  # Python 3.10
        import sre_constants as sc  # noqa: PLC0415
        import sre_parse as sp  # noqa: PLC0415

    full = (1 << 0x10000) - 1
    repeats = {sc.MAX_REPEAT, sc.MIN_REPEAT, getattr(sc, "POSSESSIVE_REPEAT", sc.MAX_REPEAT)}

    def seq(items: Iterable[tuple[Any, Any]]) -> tuple[int, bool]:
        acc = 0
        for op, av in items:
            mask, nullable = one(op, av)
            acc |= mask
            if not nullable:
                return acc, False
        return acc, True

    def one(op: Any, av: Any) -> tuple[int, bool]:
        if op is sc.LITERAL:
            return 1 << av, False
        if op is sc.IN:
            mask, negate = 0, False
            for iop, iav in av:
                if iop is sc.LITERAL:
                    mask |= 1 << iav
                elif iop is sc.RANGE:
                    mask |= ((1 << (iav[1] - iav[0] + 1)) - 1) << iav[0]
                elif iop is sc.NEGATE:
                    negate = True
                else:
                    mask = full
            return (full ^ mask if negate else mask), False
        if op is sc.BRANCH:
            acc, nullable = 0, False
            for branch in av[1]:
                mask, branch_nullable = seq(branch)
                acc, nullable = acc | mask, nullable or branch_nullable
            return acc, nullable
        if op is sc.SUBPATTERN:
            return seq(av[3])
        if op in repeats:
            mask, nullable = seq(av[2])
            return mask, nullable or av[0] == 0
        if op in (sc.ASSERT, sc.ASSERT_NOT, sc.AT):
            return 0, True
        return full, op is not sc.NOT_LITERAL and op is not sc.ANY

    try:
        return seq(sp.parse(pattern, re.DOTALL))[0]
    except Exception:  # noqa: BLE001 - private API changed: fall back to trying every rule
        return full


class _Lexer:
    """Maximal-munch lexer over PTBLexer's rules, with a per-character candidate cache."""

    def __init__(self) -> None:
        self.rules = _build_rules()
        self.firsts = [_first_chars(r.regex.pattern) for r in self.rules]
        self.by_char: dict[str, tuple[_Rule, ...]] = {}
        self.ascii_run = re.compile("[A-Za-z]+")
        self.space_run = re.compile("[ \\t\\u00a0\\u2000-\\u200a\\u3000]+")

    def candidates(self, ch: str) -> tuple[_Rule, ...]:
        cands = self.by_char.get(ch)
        if cands is None:
            bit = 1 << ord(ch)
            cands = tuple(
                r for r, first in zip(self.rules, self.firsts, strict=True) if first & bit
            )
            self.by_char[ch] = cands
        return cands

    def lex(self, text: str, end: int) -> list[str]:
        """Tokens of `text[:end]` (UTF-16 code units) as PTBLexer returns them, not lowercased.

        `text[end:]` is the context that follows: rules may look at it, but it is not lexed.
        """
        tokens: list[str] = []
        pos, n = 0, len(text)
        while pos < end:
            ch = text[pos]
            if ch == " ":  # only the whitespace rule can start at an ASCII space
                pos = self.space_run.match(text, pos).end()
                continue
            if "a" <= ch <= "z" or "A" <= ch <= "Z":
                stop = self.ascii_run.match(text, pos).end()
                # A run of ASCII letters ending at a space or newline is one word: every longer
                # rule needs an apostrophe, period, hyphen, digit or similar inside the run,
                # and rules with trailing context return the same run. Only the split
                # assimilations ("cannot" -> "can not") differ.
                if stop < n and text[stop] in " \n":
                    run = text[pos:stop]
                    cut = _ASSIMILATIONS.get(run.lower(), 0)
                    tokens.extend((run[:-cut], run[-cut:]) if cut else (run,))
                    pos = stop
                    continue
            best, best_len, best_match = None, 0, None
            for rule in self.candidates(ch):
                m = rule.regex.match(text, pos)
                # JFlex counts trailing context in the match length; ties go to the earlier rule
                if m is not None and m.end() - pos > best_len:
                    best, best_len, best_match = rule, m.end() - pos, m
            if best is None:  # untokenizable character: PTBTokenizer deletes it
                pos += 1
                continue
            token = best_match.group(1)
            if best.pushback:
                token = token[: -best.pushback]
            pos += len(token)
            out = _apply_action(best.action, token)
            if best.action == "acronym" and len(token) == 2:
                out = token[0]  # "I." before "The": the period is a token of its own
                pos -= 1
            elif best.action in ("acronym", "period_again"):
                pos -= 1  # the abbreviation keeps its period and the period is returned again
            if out is not None:
                tokens.append(out)
        return tokens


_ASSIMILATIONS = {"cannot": 3, "gonna": 2, "gotta": 2, "lemme": 2, "gimme": 2, "wanna": 2}


def _latex_quotes(token: str, left: bool) -> str:
    if left:
        token = token.replace("&apos;", "`").replace("'", "`")
        token = token.replace('"', "``").replace("&quot;", "``")
    else:
        token = token.replace("&apos;", "'").replace('"', "''").replace("&quot;", "''")
    token = re.sub("[\u0091\u2018\u201b\u2039]", "`", token)
    token = re.sub("[\u0092\u2019\u203a]", "'", token)
    token = re.sub("[\u0093\u201c\u00ab]", "``", token)
    return re.sub("[\u0094\u201d\u00bb]", "''", token)


def _apply_action(action: str, token: str) -> str | None:
    """The text PTBLexer emits for `token` (None: nothing emitted)."""
    if action == "keep" or action in ("acronym", "period_again"):
        return token
    if action == "skip":
        return None
    if action.startswith("="):
        return action[1:]
    if action == "soft":  # soft hyphens are dropped; a token of only soft hyphens becomes "-"
        return token.replace("\u00ad", "") or "-"
    if action == "quote_left":
        return _latex_quotes(token, left=True)
    if action == "quote_right":
        return _latex_quotes(token, left=False)
    if action == "nbsp":
        return token.replace(" ", "\u00a0")
    if action == "amp":
        return re.sub("(?i:&amp;)", "&", token)
    if action == "fraction":
        return token.translate(
            {0xBC: "1/4", 0xBD: "1/2", 0xBE: "3/4", 0x2153: "1/3", 0x2154: "2/3"}
        )
    if action == "currency":
        token = token.replace("\u00a2", "cents").replace("\u00a3", "#")
        return re.sub("[\u0080\u00a4\u20a0\u20ac]", "$", token)
    if action == "phone":
        return token.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-")
    if action == "parens":
        return token.replace("(", "-LRB-").replace(")", "-RRB-")
    if action == "hyphens":
        return "--" if 3 <= len(token) <= 4 else token
    raise AssertionError(action)


@functools.lru_cache(maxsize=1)
def _lexer() -> _Lexer:
    return _Lexer()  # built on first use: compiling the Unicode classes takes ~0.2 s


_NEXT_LINE = "\nA "


@functools.lru_cache(maxsize=1 << 17)
def tokenize_caption(text: str) -> str:
    """The caption as pycocoevalcap's PTBTokenizer returns it: tokens joined by single spaces.

    BLEU, CIDEr and METEOR split this on whitespace and ROUGE-L on " ", as coco-caption does;
    tokens can hold a no-break space (e.g. "1\\xa01/2"), so the joined string is the exact
    form to score.
    """
    if not isinstance(text, str):
        raise TypeError(f"caption must be a str, got {type(text).__name__}")
    # PTBTokenizer reads each caption as a line followed by the next caption of its batch, and
    # a few rules look past the line end. We assume the next caption starts with "A " (two
    # thirds of Flickr8k captions start with "A", "An" or "The"), which decides two rare cases
    # at a caption's end: a single-letter initial ("vitamin C.") loses its period, and "fig.",
    # "no.", "ca." (abbreviations used before numbers) lose theirs, as when the next caption
    # does not start with a digit. Other line breaks (\r, U+2028, ...) are spaces here;
    # pycocoevalcap would shift every later caption onto the wrong image.
    units = to_utf16_units(text.replace("\n", " "))
    tokens = _lexer().lex(units + _NEXT_LINE, len(units))
    line = " ".join(java_lower(from_utf16_units(t)) for t in tokens)
    # pycocoevalcap: line.rstrip().split(" "), drop the punctuation tokens, join with " "
    return " ".join(w for w in line.rstrip().split(" ") if w not in PUNCTUATIONS)


def tokenize(text: str) -> list[str]:
    """Tokens of a caption exactly as coco-caption's PTBTokenizer makes them (pure Python)."""
    caption = tokenize_caption(text)
    return caption.split(" ") if caption else []

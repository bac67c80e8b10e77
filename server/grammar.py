"""Check a GBNF grammar before it reaches llama.cpp.

llama.cpp parses a grammar when a request's sampler is built, on the engine thread, and a bad
one takes the whole process down: an undefined rule, a missing root or a syntax error gives a
NULL sampler (a segfault when it is used), a reversed repetition (``{3,1}``) loops forever, and
a grammar no token can satisfy (``"\\x00"``, ``[z-a]``) aborts on the first sampled token.

``check_gbnf`` parses the grammar the way llama.cpp's parser does (``llama-grammar.cpp``: the
same tokens, escapes and errors) and then checks what llama.cpp would crash or hang on:

- every referenced rule is defined (once), and ``root`` is;
- no left recursion, counting rules that can match the empty string (llama.cpp recurses
  without end on it);
- repetitions ``{m,n}`` with ``m <= n <= 2000`` (llama.cpp's own cap), groups nested at most
  1000 deep (llama.cpp's recursive parser overflows its stack on ~30000);
- every character (in a literal or a class) is a real one: no NUL, no surrogate, nothing above
  U+10FFFF, and every class can match at least one of them;
- size: bytes, rules and symbols (repetitions expanded) within the ``server.limits`` caps.

``json_schema_grammar`` converts a ``response_format`` JSON schema with llama-cpp-python's
converter and checks the result the same way (``{"enum": []}`` converts to an empty rule).
Both raise ``GrammarError`` (a ``ValueError``) with a message naming the line and column.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

MAX_REPETITION = 2000  # llama.cpp refuses more ("exceeds sane defaults")
MAX_NESTING = 1000  # nested groups: llama.cpp's recursive parser overflows its stack (~30000)
_LAST_CHAR = 0x10FFFD  # U+10FFFE/F are noncharacters no token can produce
_SURROGATES = (0xD800, 0xDFFF)


class GrammarError(ValueError):
    pass


@dataclass(frozen=True)
class GrammarLimits:
    """The caps of ``server.limits`` (the settings tree holds the defaults: ``default()``)."""

    max_bytes: int
    max_rules: int
    max_symbols: int

    @classmethod
    def from_settings(cls, limits) -> GrammarLimits:
        return cls(limits.grammar_max_bytes, limits.grammar_max_rules, limits.grammar_max_symbols)

    @classmethod
    def default(cls) -> GrammarLimits:
        from docqa.settings import RequestLimits

        return cls.from_settings(RequestLimits())

    def but(self, **kw) -> GrammarLimits:
        return dataclasses.replace(self, **kw)


@dataclass
class Grammar:
    """What was checked: rule name -> alternatives, each a list of symbols: ``None`` for a
    terminal (one character), a rule name for a reference."""

    rules: dict[str, list[list[str | None]]] = field(default_factory=dict)
    symbols: int = 0  # after repetitions are expanded


def _is_word(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "-")


def _valid_char(cp: int) -> bool:
    return 0 < cp <= _LAST_CHAR and not (_SURROGATES[0] <= cp <= _SURROGATES[1])


def _class_matches_something(ranges: list[tuple[int, int]], negated: bool) -> bool:
    """Does some valid character fall in (or, negated, outside) ``ranges``?"""
    valid = [(1, _SURROGATES[0] - 1), (_SURROGATES[1] + 1, _LAST_CHAR)]
    if not negated:
        return any(max(lo, a) <= min(hi, b) for lo, hi in ranges for a, b in valid)
    for a, b in valid:  # is [a, b] fully covered by the union of ranges?
        pos = a
        for lo, hi in sorted(ranges):
            if lo > pos:
                break
            pos = max(pos, hi + 1)
            if pos > b:
                break
        if pos <= b:
            return True
    return False


class _Parser:
    def __init__(self, src: str, limits: GrammarLimits):
        self.src = src
        self.limits = limits
        self.g = Grammar()
        self.defined: list[str] = []
        self.refs: dict[str, int] = {}  # referenced rule -> position of its first use
        self.n_sub = 0
        self.depth = 0

    # -- positions and errors ---------------------------------------------------------
    def err(self, pos: int, msg: str) -> GrammarError:
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return GrammarError(f"{msg} at line {line}, column {col}")

    def at(self, pos: int) -> str:
        return self.src[pos] if pos < len(self.src) else ""

    def space(self, pos: int, newline_ok: bool) -> int:
        while True:
            c = self.at(pos)
            if c in (" ", "\t") or (newline_ok and c in ("\r", "\n")):
                pos += 1
            elif c == "#":
                while self.at(pos) not in ("", "\r", "\n"):
                    pos += 1
            else:
                return pos

    def name(self, pos: int) -> int:
        end = pos
        while _is_word(self.at(end)):
            end += 1
        if end == pos:
            raise self.err(pos, "expecting a rule name")
        return end

    def integer(self, pos: int) -> tuple[int, int]:
        end = pos
        while self.at(end).isascii() and self.at(end).isdigit():
            end += 1
        if end == pos:
            raise self.err(pos, "expecting an integer")
        return int(self.src[pos:end]), end

    def char(self, pos: int) -> tuple[int, int]:
        c = self.at(pos)
        if c == "":
            raise self.err(pos, "unexpected end of input")
        if c != "\\":
            return ord(c), pos + 1
        e = self.at(pos + 1)
        if e in ("x", "u", "U"):
            n = {"x": 2, "u": 4, "U": 8}[e]
            digits = self.src[pos + 2 : pos + 2 + n]
            if len(digits) != n or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.err(pos, f"expecting {n} hex digits after \\{e}")
            return int(digits, 16), pos + 2 + n
        simple = {"t": 9, "r": 13, "n": 10, "\\": 92, '"': 34, "[": 91, "]": 93}
        if e in simple:
            return simple[e], pos + 2
        raise self.err(pos, f"unknown escape '\\{e}'")

    def checked_char(self, pos: int) -> tuple[int, int]:
        cp, end = self.char(pos)
        if not _valid_char(cp):
            what = "NUL" if cp == 0 else f"U+{cp:04X}"
            raise self.err(pos, f"character {what} cannot be generated")
        return cp, end

    # -- grammar ----------------------------------------------------------------------
    def parse(self) -> Grammar:
        if len(self.src.encode("utf-8", "surrogatepass")) > self.limits.max_bytes:
            raise GrammarError(f"grammar is longer than {self.limits.max_bytes} bytes")
        if "\x00" in self.src:  # llama.cpp reads a C string: it would see only the part before
            raise self.err(self.src.index("\x00"), "NUL character in the grammar")
        pos = self.space(0, True)
        while pos < len(self.src):
            pos = self.rule(pos)
        if "root" not in self.g.rules:
            raise GrammarError("grammar has no 'root' rule")
        for name, where in self.refs.items():
            if name not in self.g.rules:
                raise self.err(where, f"undefined rule '{name}'")
        self._check_left_recursion()
        return self.g

    def rule(self, pos: int) -> int:
        end = self.name(pos)
        name = self.src[pos:end]
        if name in self.g.rules:
            raise self.err(pos, f"rule '{name}' is defined twice")
        pos = self.space(end, False)
        if self.src[pos : pos + 3] != "::=":
            raise self.err(pos, "expecting ::=")
        self.g.rules[name] = []  # reserved now: a sub-rule may be added while parsing it
        self._count_rule(pos)
        pos = self.space(pos + 3, True)
        pos, alts = self.alternates(pos, name, False)
        self.g.rules[name] = alts
        c = self.at(pos)
        if c == "\r":
            pos += 2 if self.at(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c:
            raise self.err(pos, "expecting newline or end")
        return self.space(pos, True)

    def _count_rule(self, pos: int) -> None:
        if len(self.g.rules) > self.limits.max_rules:
            raise self.err(pos, f"grammar has more than {self.limits.max_rules} rules")

    def _add_symbols(self, n: int, pos: int) -> None:
        self.g.symbols += n
        if self.g.symbols > self.limits.max_symbols:
            raise self.err(
                pos,
                f"grammar has more than {self.limits.max_symbols} symbols once its "
                "repetitions are expanded",
            )

    def sub_rule(self, base: str, alts: list[list[str | None]], pos: int) -> str:
        self.n_sub += 1
        name = f"{base}#{self.n_sub}"  # '#' cannot appear in a user's rule name
        self.g.rules[name] = alts
        self._count_rule(pos)
        return name

    def alternates(self, pos: int, name: str, nested: bool) -> tuple[int, list]:
        pos, seq = self.sequence(pos, name, nested)
        alts = [seq]
        while self.at(pos) == "|":
            pos = self.space(pos + 1, True)
            pos, seq = self.sequence(pos, name, nested)
            alts.append(seq)
        return pos, alts

    def sequence(self, pos: int, name: str, nested: bool) -> tuple[int, list[str | None]]:
        seq: list[str | None] = []
        last: tuple[int, int] | None = None  # (start in seq, symbol count) of the last item
        while True:
            c = self.at(pos)
            start = len(seq)
            if c == '"':
                pos += 1
                while self.at(pos) != '"':
                    if self.at(pos) == "":
                        raise self.err(pos, "unexpected end of input in a literal")
                    _, pos = self.checked_char(pos)
                    seq.append(None)
                pos = self.space(pos + 1, nested)
            elif c == "[":
                first = pos
                pos += 1
                negated = self.at(pos) == "^"
                if negated:
                    pos += 1
                ranges = []
                while self.at(pos) != "]":
                    if self.at(pos) == "":
                        raise self.err(pos, "unexpected end of input in a character class")
                    lo, pos = self.char(pos)
                    hi = lo
                    if self.at(pos) == "-" and self.at(pos + 1) != "]":
                        if self.at(pos + 1) == "":
                            raise self.err(pos, "unexpected end of input in a character class")
                        hi, pos = self.char(pos + 1)
                        if hi < lo:
                            raise self.err(first, "character range is reversed")
                    ranges.append((lo, hi))
                if not _class_matches_something(ranges, negated):
                    raise self.err(first, "character class matches no character")
                seq.append(None)
                pos = self.space(pos + 1, nested)
            elif _is_word(c):
                end = self.name(pos)
                ref = self.src[pos:end]
                self.refs.setdefault(ref, pos)
                seq.append(ref)
                pos = self.space(end, nested)
            elif c == "(":
                self.depth += 1
                if self.depth > MAX_NESTING:
                    raise self.err(pos, f"groups nested more than {MAX_NESTING} deep")
                pos = self.space(pos + 1, True)
                pos, alts = self.alternates(pos, name, True)
                if self.at(pos) != ")":
                    raise self.err(pos, "expecting ')'")
                seq.append(self.sub_rule(name, alts, pos))
                self.depth -= 1
                pos = self.space(pos + 1, nested)
            elif c == ".":
                seq.append(None)
                pos = self.space(pos + 1, nested)
            elif c == "<":
                raise self.err(pos, "token references (<...>) are not supported")
            elif c in ("*", "+", "?", "{"):
                if last is None:
                    raise self.err(pos, f"expecting an item before '{c}'")
                if c == "{":
                    p = self.space(pos + 1, nested)
                    lo, p = self.integer(p)
                    p = self.space(p, nested)
                    hi: int | None = lo
                    if self.at(p) == ",":
                        p = self.space(p + 1, nested)
                        hi = None
                        if self.at(p).isascii() and self.at(p).isdigit():
                            hi, p = self.integer(p)
                            p = self.space(p, nested)
                    if self.at(p) != "}":
                        raise self.err(p, "expecting '}'")
                    if hi is not None and hi < lo:
                        raise self.err(pos, f"repetition {{{lo},{hi}}} has min > max")
                    if max(lo, hi or 0) > MAX_REPETITION:
                        raise self.err(pos, f"repetition count above {MAX_REPETITION}")
                    end = p + 1
                else:
                    lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                    end = pos + 1
                self._repeat(seq, last[0], lo, hi, name, pos)
                last = (last[0], len(seq) - last[0])  # as llama.cpp: X** repeats X*
                pos = self.space(end, nested)
                continue
            else:
                return pos, seq
            last = (start, len(seq) - start)
            self._add_symbols(len(seq) - start, pos)

    def _repeat(self, seq, start: int, lo: int, hi: int | None, name: str, pos: int) -> None:
        """Replace the last item X (``seq[start:]``) by X{lo,hi}: for the checks, ``lo`` copies
        of X then an optional X (bounded) or an X* rule (unbounded), as llama.cpp builds it."""
        item = seq[start:]
        del seq[start:]
        copies = lo + ((hi - lo) if hi is not None else 1)
        self._add_symbols(len(item) * max(copies - 1, 0), pos)
        seq.extend(item * min(lo, 1))  # more copies change neither nullability nor reach
        if hi is None:
            star = self.sub_rule(name, [], pos)
            self.g.rules[star] = [[*item, star], []]
            seq.append(star)
        elif hi > lo:
            seq.append(self.sub_rule(name, [list(item), []], pos))

    # -- left recursion -----------------------------------------------------------------
    def _check_left_recursion(self) -> None:
        rules = self.g.rules
        nullable = {n for n, alts in rules.items() if any(not a for a in alts)}
        changed = True
        while changed:
            changed = False
            for n, alts in rules.items():
                if n not in nullable and any(
                    all(s is not None and s in nullable for s in a) for a in alts
                ):
                    nullable.add(n)
                    changed = True
        # leftmost references: rule -> rules reachable at its start
        first: dict[str, set[str]] = {n: set() for n in rules}
        for n, alts in rules.items():
            for a in alts:
                for s in a:
                    if s is None:
                        break
                    first[n].add(s)
                    if s not in nullable:
                        break
        state: dict[str, int] = {}  # 1 = on the path, 2 = done

        def visit(n: str, path: list[str]) -> None:
            state[n] = 1
            for m in first[n]:
                if state.get(m) == 1:
                    cycle: list[str] = []
                    for x in path[path.index(m) :] + [m]:
                        if not cycle or cycle[-1] != _public(x):
                            cycle.append(_public(x))
                    raise GrammarError("left recursion: " + " -> ".join(cycle))
                if m not in state:
                    visit(m, path + [m])
            state[n] = 2

        for n in rules:
            if n not in state:
                visit(n, [n])


def _public(name: str) -> str:
    return name.split("#", 1)[0]


def check_gbnf(text: str, limits: GrammarLimits | None = None) -> Grammar:
    """Parse and check ``text``; raise ``GrammarError`` if llama.cpp could not use it safely."""
    import sys

    if not isinstance(text, str):
        raise GrammarError("grammar must be a string")
    old = sys.getrecursionlimit()  # nested groups and long reference chains recurse
    try:
        sys.setrecursionlimit(max(old, 20_000))
        return _Parser(text, limits or GrammarLimits.default()).parse()
    except RecursionError as exc:
        raise GrammarError("grammar is nested too deeply") from exc
    finally:
        sys.setrecursionlimit(old)


def json_schema_grammar(schema: dict | bool, limits: GrammarLimits | None = None) -> str:
    """The GBNF grammar of a JSON schema (llama-cpp-python's converter), checked."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    limits = limits or GrammarLimits.default()
    text = json.dumps(schema, sort_keys=True)
    if len(text) > limits.max_bytes:
        raise GrammarError(f"JSON schema is longer than {limits.max_bytes} bytes")
    try:
        gbnf = json_schema_to_gbnf(text)
    except RecursionError as exc:
        raise GrammarError("JSON schema is nested too deeply") from exc
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds
        detail = str(exc) or type(exc).__name__
        raise GrammarError(f"unsupported JSON schema: {detail}") from exc
    for line in gbnf.splitlines():
        name, sep, body = line.partition("::=")
        if sep and not body.strip():  # e.g. {"enum": []}, {"anyOf": []}
            raise GrammarError(
                f"JSON schema matches no value (its part '{name.strip()}' is empty, "
                "e.g. an empty enum or anyOf)"
            )
    try:
        check_gbnf(gbnf, limits)
    except GrammarError as exc:
        raise GrammarError(f"JSON schema gives an unusable grammar: {exc}") from exc
    return gbnf

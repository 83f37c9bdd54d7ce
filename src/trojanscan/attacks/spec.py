"""Attack specs: one-line strings naming an attack and its settings.

Syntax::

    none | clean                               no attack (parse_attack returns None)
    NAME                                       defaults, e.g. ``wanet``
    NAME:KEY=VALUE,KEY=VALUE,...               e.g. ``badnets:size=4,location=top-left,target=0``
    multi:NAME(KEY=VALUE,...)+NAME(...)+...    several triggers, e.g.
        ``multi:badnets(size=3,location=top-left,target=1)+badnets(location=bottom-right,target=5)``
    NAME(...)+NAME(...)                        the same without the ``multi:`` prefix

Values: integers (``4``), floats (``0.2``, ``1e-3``), ``none``, ``true``/``false``,
tuples in parentheses (``location=(2,3)``, ``source=(1,2)``) and bare words (``white``,
``bottom-right``, a file path without ``, ( ) +``). Names: see :data:`ATTACKS`
(``all_to_all`` and ``source_specific`` are accepted as aliases); ``badnets:mode=all2all``
means ``all2all`` (``mode=all2one`` is plain BadNets). Settings not given keep their
defaults; ``attack.spec`` writes every setting, so ``parse_attack(a.spec) == a``.
Unknown names, unknown keys and bad values raise a ParameterError naming the key, the
allowed values and what was received.
"""

from __future__ import annotations

import re
from typing import Any

from ..exceptions import ParameterError, bad_param
from .all_to_all import AllToAll
from .badnets import BadNets
from .base import Attack
from .blend import Blend
from .multi import Multi
from .sig import SIG
from .source_specific import SourceSpecific
from .wanet import WaNet

#: spec name -> attack class (adding an attack: one module, one line here)
ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (BadNets, AllToAll, Blend, SIG, WaNet, SourceSpecific, Multi)
}
ALIASES: dict[str, str] = {"all_to_all": "all2all", "source_specific": "source"}
NO_ATTACK = ("none", "clean")

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")
_STOP = ",()+"
#: longest spec and deepest tuple nesting accepted (a spec is one line typed by a person or
#: read from an untrusted sidecar: bounded so that parsing cannot exhaust the stack)
MAX_SPEC_CHARS = 2000
MAX_DEPTH = 4


class _Parser:
    """Recursive-descent parser over one spec string."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.i = 0
        self.depth = 0

    # -- lexing ---------------------------------------------------------------
    def error(self, expected: str) -> ParameterError:
        got = self.text[self.i:] or "the end"
        return ParameterError(
            f"invalid attack spec {self.text!r}: expected {expected} at position {self.i}, "
            f"got {got!r} (syntax: NAME[:KEY=VALUE,...] or multi:NAME(KEY=VALUE,...)+...)"
        )

    def skip_ws(self) -> None:
        while self.i < len(self.text) and self.text[self.i].isspace():
            self.i += 1

    def peek(self) -> str:
        self.skip_ws()
        return self.text[self.i] if self.i < len(self.text) else ""

    def eat(self, char: str) -> bool:
        if self.peek() == char:
            self.i += 1
            return True
        return False

    def expect(self, char: str) -> None:
        if not self.eat(char):
            raise self.error(repr(char))

    def at_end(self) -> bool:
        return self.peek() == ""

    def name(self, what: str = "an attack name") -> str:
        self.skip_ws()
        m = _NAME.match(self.text, self.i)
        if not m:
            raise self.error(what)
        self.i = m.end()
        return m.group(0)

    # -- grammar --------------------------------------------------------------
    def top(self) -> Attack:
        start = self.i
        name = self.name()
        if name == "multi" and self.eat(":"):
            attack = self.calls()
            if not isinstance(attack, Multi):
                attack = Multi(attacks=(attack,))
        elif self.eat(":"):
            attack = build(name, {} if self.at_end() else self.kvlist())
        else:
            self.i = start
            attack = self.calls()
        if not self.at_end():
            raise self.error("',' or the end of the spec")
        return attack

    def calls(self) -> Attack:
        subs = [self.call()]
        while self.eat("+"):
            subs.append(self.call())
        return subs[0] if len(subs) == 1 else Multi(attacks=tuple(subs))

    def call(self) -> Attack:
        name = self.name()
        if name == "multi":
            raise bad_param("multi.attacks", "attacks other than multi (no nesting)", name)
        kv: dict[str, Any] = {}
        if self.eat("(") and not self.eat(")"):
            kv = self.kvlist()
            self.expect(")")
        return build(name, kv)

    def kvlist(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            key = self.name("a setting name (KEY=VALUE)")
            self.expect("=")
            if key in out:
                raise bad_param("attack spec", "each setting at most once", key)
            out[key] = self.value()
            if not self.eat(","):
                return out

    def value(self) -> Any:
        if self.eat("("):
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error(f"a value (tuples nest at most {MAX_DEPTH} deep)")
            items = [self.value()]
            while self.eat(","):
                items.append(self.value())
            self.expect(")")
            self.depth -= 1
            return tuple(items)
        self.skip_ws()
        j = self.i
        while j < len(self.text) and self.text[j] not in _STOP:
            j += 1
        word = self.text[self.i:j].strip()
        if not word:
            raise self.error("a value")
        self.i = j
        return convert(word)


def convert(word: str) -> Any:
    """A bare spec value as int, float, None, bool or str."""
    low = word.lower()
    if _INT.fullmatch(word):
        return int(word)
    if _FLOAT.fullmatch(word):
        return float(word)
    if low == "none":
        return None
    if low in ("true", "false"):
        return low == "true"
    return word


def resolve_name(name: str) -> type[Attack]:
    """The class registered under ``name`` (or an alias), else a ParameterError."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in ATTACKS:
        raise bad_param("attack", [*ATTACKS, *ALIASES, *NO_ATTACK], name)
    return ATTACKS[key]


def build(name: str, settings: dict[str, Any]) -> Attack:
    """Instantiate attack ``name`` from parsed settings, checking the keys."""
    cls = resolve_name(name)
    settings = dict(settings)
    if cls is BadNets and "mode" in settings:
        mode = settings.pop("mode")
        if mode == "all2all":
            cls = AllToAll
        elif mode != "all2one":
            raise bad_param("badnets.mode", ["all2one", "all2all"], mode)
    if cls is Multi:
        raise bad_param("multi", "the form multi:NAME(KEY=VALUE,...)+NAME(...)",
                        f"{name}:{settings}")
    allowed = cls.param_names()
    for key in settings:
        if key not in allowed:
            raise bad_param(f"{cls.name} setting", allowed, key)
    try:
        return cls(**settings)
    except ParameterError:
        raise
    except (TypeError, ValueError, OverflowError) as exc:
        # a value of the wrong kind that the attack's own checks did not name
        shown = ", ".join(f"{k}={v!r}" for k, v in settings.items())[:200]
        raise ParameterError(f"invalid {cls.name} settings ({shown}): {exc}") from exc


def parse_attack(spec: str | None) -> Attack | None:
    """Parse an attack spec (module docstring); ``none``/``clean``/None give None."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        raise bad_param("attack spec", "a string such as 'badnets:target=0'", spec)
    if spec.strip().lower() in NO_ATTACK:
        return None
    if not spec.strip():
        raise bad_param("attack spec", "an attack such as 'badnets:target=0' or 'none'", spec)
    if len(spec) > MAX_SPEC_CHARS:
        raise bad_param("attack spec", f"at most {MAX_SPEC_CHARS} characters",
                        f"{len(spec)} characters")
    return _Parser(spec).top()


def format_attack(attack: Attack | None) -> str:
    """The spec of ``attack`` (``"none"`` for None); inverse of :func:`parse_attack`."""
    return "none" if attack is None else attack.spec


def available_attacks() -> list[str]:
    """Registered attack names."""
    return list(ATTACKS)

"""The sentence forms every fact of the symbolic teacher is stated in (counts, regions, relations),
built from :mod:`llava_lite.facts`, so a test can parse the text back and check it against the boxes."""

from __future__ import annotations

from collections import Counter

from .. import facts
from ..facts import Obj, article, count_phrase


def counted(objs: list[Obj]) -> Counter:
    return Counter(o.kind for o in objs)


def there_are(n: int, noun: str) -> str:
    return f"there {'is' if n == 1 else 'are'} {count_phrase(n, noun)}"


def the(o: Obj | str) -> str:
    return f"the {o if isinstance(o, str) else o.name}"


def is_at(o: Obj) -> str:
    return f"{the(o)} is {facts.region_phrase(o)}"


def is_rel(a: Obj, rel: str, b: Obj) -> str:
    return f"{the(a)} is {facts.RELATION_PHRASES[rel]} {the(b)}"


def listing(objs: list[Obj]) -> str:
    """``a red circle, two blue squares and a person``: every object, grouped by name."""
    names = Counter(o.name for o in objs)
    parts = [article(n) if k == 1 else count_phrase(k, n) for n, k in names.items()]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def cap(s: str) -> str:
    return s[0].upper() + s[1:]

"""Generators for the demo model's multi-domain corpus.

Six domains with clearly different surface forms, so a fine-grained MoE trained on them routes
each domain to its own experts:

| domain   | example                                            |
|----------|----------------------------------------------------|
| `arith`  | `37+48=85`, `12*7=84`, `5+19+60=84`                |
| `kv`     | `id=4821 name=alba city=oslo age=33` + `get 4821 city: oslo` |
| `code`   | small Python-like functions                        |
| `prose`  | sentences from a small generated grammar          |
| `cipher` | `plain: the cat => cipher: wkh fdw` (Caesar shift 3) |
| `sort`   | `sort: 42 7 19 -> 7 19 42`                         |

Every text is built from *units* (an equation, a sentence, a function, ...) that carry a key.
A fixed hash of the key splits the unit space into a pretraining part and a held-out part
(`is_held_out`), so held-out task and evaluation sets are disjoint from the pretraining corpus by
construction, whatever the seeds. Everything comes from seeded `random.Random` streams (string
seeds are hashed with SHA-512 by Python, independent of `PYTHONHASHSEED`) and reads no files.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable, Iterator

__all__ = [
    "DOMAINS",
    "HELD_OUT_BUCKETS",
    "caesar",
    "corpus_stream",
    "domain_rng",
    "generate_document",
    "is_held_out",
]

DOMAINS: tuple[str, ...] = ("arith", "kv", "code", "prose", "cipher", "sort")

HELD_OUT_BUCKETS = 8
"""One key in `HELD_OUT_BUCKETS` (by CRC-32) belongs to the held-out part."""

Unit = tuple[str, str]
"""A generated unit: (key deciding its partition, text)."""


def is_held_out(key: str) -> bool:
    """Whether a unit key belongs to the held-out partition (stable across machines)."""
    return zlib.crc32(key.encode("utf-8")) % HELD_OUT_BUCKETS == 0


def domain_rng(seed: int, stream: str) -> random.Random:
    """A deterministic RNG for one named stream (e.g. `"corpus"`, `"arith:test"`)."""
    return random.Random(f"moe-runtime-demo:{seed}:{stream}")


def caesar(text: str, shift: int = 3) -> str:
    """Caesar-shift the lowercase letters of `text` (the `cipher` domain's "translation")."""
    return "".join(chr((ord(c) - 97 + shift) % 26 + 97) if "a" <= c <= "z" else c for c in text)


# Word lists -------------------------------------------------------------------------------------


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


_ADJ = _words(
    "old quiet small bright dark cold warm green red silver tall narrow gentle heavy quick slow "
    "empty golden distant hidden wild calm ancient soft"
)
_NOUN = _words(
    "fisherman harbor river forest village mountain garden teacher child merchant boat bridge "
    "lantern window road market island farmer tower valley storm letter singer wolf"
)
_VERB = _words(
    "walked waited looked listened returned wandered rested worked sang spoke turned paused "
    "climbed hurried smiled"
)
_PREP = _words("to toward near beside across behind under along past into")
_TIME = _words("before dawn|after the rain|at night|in the morning|by evening|during the winter|at noon", "|")
_CONJ = _words("while because although after until")
_TRANS = _words("found carried painted watched followed opened remembered built sold lost")

_NAMES = _words(
    "alba bruno carla dario elsa fabio greta hugo ines jonas kira luca mara nico olga pavel "
    "rosa sven tina ugo vera walt xena yuri zora"
)
_CITIES = _words(
    "oslo lima rome kyiv bern riga doha nice lyon turin porto cork perth quito dakar hanoi "
    "sofia tunis malmo basel"
)
_JOBS = _words("baker nurse pilot clerk miner tailor judge chef smith poet")

_CIPHER_WORDS = _words(
    "the cat dog sun moon star tree fish bird king queen gold ring door house road rain wind "
    "fire snow book lamp ship sea hill stone wolf bear apple bread milk salt song time night day "
    "red blue green black white small big old new fast slow cold warm open close run walk eat "
    "sing read write give take find keep"
)

_IDENT = _words("items values data nums rows words scores prices counts parts")
_FUNC = _words("total scale clip count merge shift pick norm limit flip")
_VAR = _words("x y n k v acc out res tmp val")


# Units per domain -------------------------------------------------------------------------------


def _number(rng: random.Random) -> int:
    """A number with 1-3 digits, shorter ones as likely as longer ones."""
    digits = rng.choice((1, 2, 2, 3, 3))
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits)


def arith_addition(rng: random.Random) -> Unit:
    """The `arith` task form: `a+b=c` with 2-3 digit operands."""
    a, b = rng.randrange(10, 1000), rng.randrange(10, 1000)
    return f"{a}+{b}", f"{a}+{b}={a + b}"


def _arith_unit(rng: random.Random) -> Unit:
    form = rng.randrange(6)
    if form <= 1:
        return arith_addition(rng)
    if form == 2:
        a, b = _number(rng), _number(rng)
        a, b = max(a, b), min(a, b)
        return f"{a}-{b}", f"{a}-{b}={a - b}"
    if form == 3:
        a, b = rng.randrange(2, 100), rng.randrange(2, 10)
        return f"{a}*{b}", f"{a}*{b}={a * b}"
    if form == 4:
        a, b, c = _number(rng), _number(rng), _number(rng)
        return f"{a}+{b}+{c}", f"{a}+{b}+{c}={a + b + c}"
    a, b = _number(rng), _number(rng)
    return f"{a}+{b}", f"{a}+{b}={a + b}"


def kv_record(rng: random.Random, rid: int) -> dict[str, str]:
    """One key-value record with id `rid`."""
    return {
        "id": str(rid),
        "name": rng.choice(_NAMES),
        "city": rng.choice(_CITIES),
        "age": str(rng.randrange(18, 90)),
        "job": rng.choice(_JOBS),
    }


def kv_lookup(rng: random.Random, n_records: int) -> tuple[str, str]:
    """Records followed by `get <id> <field>:`; returns (prompt, answer without leading space)."""
    ids = rng.sample(range(1000, 10000), n_records)
    records = [kv_record(rng, rid) for rid in ids]
    lines = [" ".join(f"{k}={v}" for k, v in r.items()) for r in records]
    target = rng.choice(records)
    field = rng.choice(("name", "city", "age", "job"))
    return "\n".join(lines) + f"\nget {target['id']} {field}:", target[field]


def _kv_unit(rng: random.Random) -> Unit:
    n = rng.randrange(2, 6)
    prompt, answer = kv_lookup(rng, n)
    text = f"{prompt} {answer}"
    if rng.random() < 0.5:
        # A second question about the same records.
        lines = prompt.split("\n")[:-1]
        rec = dict(kv.split("=") for kv in rng.choice(lines).split(" "))
        field = rng.choice(("name", "city", "age", "job"))
        text += f"\nget {rec['id']} {field}: {rec[field]}"
    return text, text


def code_unit(rng: random.Random) -> Unit:
    """One small Python-like function in one of four forms (sum, filter, map, min)."""
    func = f"{rng.choice(_FUNC)}_{rng.choice(_IDENT)}"
    arg = rng.choice(_IDENT)
    v, acc = rng.sample(_VAR, 2)
    k = rng.randrange(1, 10)
    op = rng.choice(("+", "-", "*"))
    form = rng.randrange(4)
    if form == 0:
        body = [
            f"    {acc} = 0",
            f"    for {v} in {arg}:",
            f"        {acc} = {acc} + {v} {op} {k}",
            f"    return {acc}",
        ]
    elif form == 1:
        body = [
            f"    {acc} = []",
            f"    for {v} in {arg}:",
            f"        if {v} > {k}:",
            f"            {acc}.append({v})",
            f"    return {acc}",
        ]
    elif form == 2:
        body = [f"    return [{v} {op} {k} for {v} in {arg}]"]
    else:
        body = [
            f"    if len({arg}) == 0:",
            "        return None",
            f"    {acc} = {arg}[0]",
            f"    for {v} in {arg}:",
            f"        if {v} < {acc}:",
            f"            {acc} = {v}",
            f"    return {acc}",
        ]
    text = "\n".join([f"def {func}({arg}):", *body])
    return text, text


def _sentence(rng: random.Random) -> str:
    subj = f"the {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    if rng.random() < 0.5:
        core = f"{subj} {rng.choice(_VERB)} {rng.choice(_PREP)} the {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    else:
        core = f"{subj} {rng.choice(_TRANS)} a {rng.choice(_ADJ)} {rng.choice(_NOUN)}"
    if rng.random() < 0.4:
        core += f" {rng.choice(_TIME)}"
    if rng.random() < 0.3:
        core += f" {rng.choice(_CONJ)} the {rng.choice(_NOUN)} {rng.choice(_VERB)}"
    return core[0].upper() + core[1:] + "."


def _prose_unit(rng: random.Random) -> Unit:
    text = _sentence(rng)
    return text, text


def cipher_phrase(rng: random.Random) -> tuple[str, str]:
    """A plain phrase of 1-4 words and its Caesar cipher."""
    plain = " ".join(rng.choice(_CIPHER_WORDS) for _ in range(rng.choice((1, 2, 2, 3, 3, 4))))
    return plain, caesar(plain)


def _cipher_unit(rng: random.Random) -> Unit:
    plain, ciphered = cipher_phrase(rng)
    return plain, f"plain: {plain} => cipher: {ciphered}"


def sort_list(rng: random.Random) -> list[int]:
    """A list of 3-7 numbers below 100 for the `sort` domain."""
    return [rng.randrange(100) for _ in range(rng.randrange(3, 8))]


def _sort_unit(rng: random.Random) -> Unit:
    xs = sort_list(rng)
    key = " ".join(map(str, xs))
    return key, f"sort: {key} -> {' '.join(map(str, sorted(xs)))}"


_UNITS: dict[str, Callable[[random.Random], Unit]] = {
    "arith": _arith_unit,
    "kv": _kv_unit,
    "code": code_unit,
    "prose": _prose_unit,
    "cipher": _cipher_unit,
    "sort": _sort_unit,
}

# (min units, max units, separator) per document.
_LAYOUT: dict[str, tuple[int, int, str]] = {
    "arith": (4, 10, "\n"),
    "kv": (1, 2, "\n\n"),
    "code": (1, 3, "\n\n"),
    "prose": (3, 7, " "),
    "cipher": (3, 7, "\n"),
    "sort": (3, 7, "\n"),
}


def draw_unit(domain: str, rng: random.Random, *, held_out: bool) -> Unit:
    """Draw units of `domain` until one falls into the requested partition."""
    unit = _UNITS[domain]
    while True:
        key, text = unit(rng)
        if is_held_out(f"{domain}:{key}") == held_out:
            return key, text


def generate_document(domain: str, rng: random.Random, *, held_out: bool = False) -> str:
    """One document of `domain`: a few units joined by the domain's separator."""
    lo, hi, sep = _LAYOUT[domain]
    n = rng.randint(lo, hi)
    return sep.join(draw_unit(domain, rng, held_out=held_out)[1] for _ in range(n))


def corpus_stream(seed: int) -> Iterator[tuple[str, str]]:
    """The endless pretraining stream of `(domain, document)`, domains drawn uniformly."""
    rng = domain_rng(seed, "corpus")
    while True:
        domain = rng.choice(DOMAINS)
        yield domain, generate_document(domain, rng, held_out=False)

"""Embedded demo corpus: WikiText-shaped articles about a generated fictional world.

The `demo` profile and the test suite need real-looking text without the network. This module
builds a small world (countries, cities, rivers, people, battles) from a seed and writes articles
about it in the exact layout of the official wiki.*.raw files:

     = Veltria =
     (blank " " line)
     Veltria is a kingdom in the north of the Amber Coast . Its capital is Orsk .
     (blank " " line)
     = = History = =
     ...

Punctuation is space-separated and numbers use WikiText's ` @,@ ` / ` @.@ ` / ` @-@ ` escapes.
Every article states its facts consistently, and the country articles repeat them in other words
further down, so a tiny LM has something learnable (facts, agreement, layout) within a few hundred
steps and long-context tests have real dependencies. `facts(seed)` lists the facts as
question prefixes with answer and distractors, for needle-in-a-haystack and recall tests.

Deterministic byte for byte: everything comes from `random.Random` seeded with strings (stable
across processes and PYTHONHASHSEED) and from lists/dicts, never from set iteration order.

    python -m data.demo OUT_DIR [--seed 0] [--size-mb 4]     # writes {train,validation,test}.txt
    python -m data.demo --facts [--seed 0]                    # prints the facts as JSON lines
"""
from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

from data import SPLITS

# Validation and test are each this share of the train size (WikiText-103's are ~0.2%, but a demo
# needs enough held-out tokens for a stable loss), with a floor so tiny corpora still evaluate.
HELDOUT_FRACTION = 0.06
HELDOUT_MIN_BYTES = 48_000


@dataclass(frozen=True)
class Fact:
    """One recorded fact. `prompt + " " + answer` is how the corpus states it (WikiText spacing):
    `prompt`="The capital of Veltria is", `answer`="Orsk"; `distractors` are wrong answers of the same
    kind (other capitals), for multiple-choice scoring by log-likelihood."""
    subject: str
    relation: str
    prompt: str
    answer: str
    distractors: tuple[str, ...]

    @property
    def sentence(self) -> str:
        return f"{self.prompt} {self.answer} ."


# --------------------------------------------------------------------------------------- names
_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gr", "h", "k", "kr", "l", "m", "n", "p", "pr", "r", "s",
           "sh", "st", "t", "th", "tr", "v", "w", "z", "ar", "el", "or", "ul", "ith", "es"]
_VOWELS = ["a", "e", "i", "o", "u", "a", "e", "o", "ae", "ia", "ou", "ei", "y"]
_CODAS = ["", "", "", "n", "r", "l", "s", "th", "k", "m", "nd", "rn", "st", "sk", "v", "x"]
_COUNTRY_SUFFIX = ["ia", "a", "land", "mark", "ora", "esh", "aria", "istan", "ovia", "en"]
_ADJ_SUFFIX = ["ian", "ic", "ish", "ese", "i", "an"]

_GOVERNMENTS = ["kingdom", "republic", "principality", "federation", "grand duchy", "confederation",
                "theocracy", "commonwealth"]
_REGIONS = ["the Amber Coast", "the Northern Reach", "the Salt Plains", "the Iron Mountains",
            "the Eastern Marches", "the Sunken Isles", "the Great Basin", "the Western Shelf"]
_DIRECTIONS = ["north", "south", "east", "west", "north @-@ east", "south @-@ west", "centre", "interior"]
_EXPORTS = ["copper", "wool", "salt", "timber", "amber", "tin", "olive oil", "horses", "glass", "silk",
            "iron", "wine", "barley", "marble", "dyes", "paper", "cattle", "silver", "furs", "spices"]
_CLIMATES = ["temperate", "arid", "humid", "alpine", "maritime", "continental", "subtropical", "cold"]
_PROFESSIONS = ["poet", "general", "astronomer", "architect", "composer", "painter", "physician",
                "admiral", "philosopher", "mathematician", "historian", "engineer", "sculptor", "botanist"]
_WORK_NOUNS = ["Tides", "Lanterns", "Winter", "Stones", "Harvest", "Orchards", "Bells", "Crown",
               "Rivers", "Towers", "Mirrors", "Gardens", "Ashes", "Compass", "Shepherd", "Voyage"]
_ADJECTIVES = ["large", "small", "ancient", "prosperous", "fortified", "remote", "wealthy", "coastal",
               "busy", "quiet", "famous", "important", "northern", "southern", "rival", "loyal"]
_NOUNS = ["market", "harbour", "bridge", "temple", "university", "fortress", "library", "canal",
          "cathedral", "garrison", "observatory", "mint", "theatre", "guild", "monastery", "palace"]
_VERBS = ["built", "rebuilt", "expanded", "destroyed", "founded", "restored", "enlarged", "fortified",
          "abandoned", "renamed", "captured", "defended"]
_GROUPS = ["merchants", "farmers", "soldiers", "monks", "scholars", "sailors", "miners", "weavers",
           "nobles", "pilgrims", "craftsmen", "settlers"]


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


class _Names:
    """Unique capitalised names from syllables (membership set used for lookups only)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.used: set[str] = set()

    def make(self, lo: int = 2, hi: int = 3, suffix: list[str] | None = None) -> str:
        while True:
            n = self.rng.randint(lo, hi)
            s = "".join(_syllable(self.rng) for _ in range(n))
            if suffix:
                s += self.rng.choice(suffix)
            s = s.capitalize()
            if 4 <= len(s) <= 12 and s not in self.used:
                self.used.add(s)
                return s


# --------------------------------------------------------------------------------------- world
@dataclass
class _Country:
    name: str
    adj: str
    government: str
    region: str
    capital: str
    cities: list[str]
    river: str
    mountain: str
    currency: str
    export: str
    climate: str
    founded: int
    founder: str
    population: int


@dataclass
class _Person:
    name: str
    country: int
    birthplace: str
    born: int
    died: int
    profession: str
    work: str


@dataclass
class _Battle:
    place: str
    year: int
    side_a: int
    side_b: int
    winner: int
    commander: str


@dataclass
class _World:
    countries: list[_Country]
    people: list[_Person]
    battles: list[_Battle]
    city_country: dict[str, int]


N_COUNTRIES = 24
N_PEOPLE = 72
N_BATTLES = 30


@lru_cache(maxsize=8)
def _world(seed: int) -> _World:
    rng = random.Random(f"groundthink-demo-world-{seed}")
    names = _Names(rng)
    countries: list[_Country] = []
    city_country: dict[str, int] = {}
    for i in range(N_COUNTRIES):
        base = names.make(1, 2)
        name = (base + rng.choice(_COUNTRY_SUFFIX)).capitalize()
        names.used.add(name)
        adj = base + rng.choice(_ADJ_SUFFIX)
        capital = names.make()
        cities = [names.make() for _ in range(4)]
        for c in [capital] + cities:
            city_country[c] = i
        countries.append(_Country(
            name=name, adj=adj, government=rng.choice(_GOVERNMENTS), region=rng.choice(_REGIONS),
            capital=capital, cities=cities, river=names.make(2, 2), mountain="Mount " + names.make(2, 2),
            currency=names.make(1, 2).lower(), export=rng.choice(_EXPORTS), climate=rng.choice(_CLIMATES),
            founded=rng.randint(700, 1500), founder=f"{names.make(1, 2)} {names.make(2, 3)}",
            population=rng.randint(40, 9000) * 1000 + rng.randint(0, 999),
        ))
    people = []
    for _ in range(N_PEOPLE):
        ci = rng.randrange(N_COUNTRIES)
        c = countries[ci]
        born = rng.randint(1450, 1900)
        people.append(_Person(
            name=f"{names.make(1, 2)} {names.make(2, 3)}", country=ci,
            birthplace=rng.choice([c.capital] + c.cities), born=born, died=born + rng.randint(28, 91),
            profession=rng.choice(_PROFESSIONS),
            work=f"The {rng.choice(_WORK_NOUNS)} of {rng.choice(c.cities + [c.capital])}",
        ))
    battles = []
    for _ in range(N_BATTLES):
        a, b = rng.sample(range(N_COUNTRIES), 2)
        place = rng.choice(countries[b].cities)
        winner = rng.choice([a, b])
        battles.append(_Battle(place=place, year=rng.randint(1100, 1890), side_a=a, side_b=b, winner=winner,
                               commander=f"{names.make(1, 2)} {names.make(2, 3)}"))
    return _World(countries, people, battles, city_country)


def facts(seed: int = 0) -> list[Fact]:
    """The facts of this seed's world. Every article about a subject states its facts in the canonical
    `Fact.sentence` form (and never contradicts them); a 3 MB train split states >= 90% of them.
    Deterministic; 4 per country (capital, river, currency, export) + 1 per person (birthplace)."""
    w = _world(seed)
    rng = random.Random(f"groundthink-demo-facts-{seed}")
    out: list[Fact] = []

    def others(values: list[str], answer: str) -> tuple[str, ...]:
        pool = [v for v in dict.fromkeys(values) if v != answer]
        return tuple(rng.sample(pool, 3))

    capitals = [c.capital for c in w.countries]
    rivers = [c.river for c in w.countries]
    currencies = [c.currency for c in w.countries]
    exports = [c.export for c in w.countries]
    for c in w.countries:
        out.append(Fact(c.name, "capital", f"The capital of {c.name} is", c.capital, others(capitals, c.capital)))
        out.append(Fact(c.name, "river", f"The longest river of {c.name} is the", c.river, others(rivers, c.river)))
        out.append(Fact(c.name, "currency", f"The currency of {c.name} is the", c.currency,
                        others(currencies, c.currency)))
        out.append(Fact(c.name, "export", f"The chief export of {c.name} is", c.export, others(exports, c.export)))
    births = [p.birthplace for p in w.people]
    for p in w.people:
        out.append(Fact(p.name, "birthplace", f"{p.name} was born in", p.birthplace, others(births, p.birthplace)))
    return out


# ------------------------------------------------------------------------------ text helpers
def _num(n: int) -> str:
    """WikiText number escape: 1234567 -> '1 @,@ 234 @,@ 567'."""
    return f"{n:,}".replace(",", " @,@ ")


def _a(word: str) -> str:
    """English indefinite article: 'a city', 'an ancient city'."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def _dec(x: float) -> str:
    return f"{x:.1f}".replace(".", " @.@ ")


class _Writer:
    """Builds one article; sentences get WikiText spacing and lines end with ' \\n' like wiki.*.raw."""

    def __init__(self, rng: random.Random, w: _World):
        self.rng = rng
        self.w = w
        self.lines: list[str] = []

    def title(self, t: str) -> None:
        self.lines += [f" = {t} = \n", " \n"]

    def section(self, t: str, level: int = 2) -> None:
        bars = " ".join(["="] * level)
        self.end_section()
        self.lines += [f" {bars} {t} {bars} \n", " \n"]

    def para(self, sentences: list[str]) -> None:
        self.lines.append(" " + " ".join(sentences) + " \n")

    def end_section(self) -> None:
        if self.lines and self.lines[-1] != " \n":  # headings are framed by exactly one blank line
            self.lines.append(" \n")

    def text(self) -> str:
        return "".join(self.lines)

    # small generators shared by article kinds -------------------------------------------------
    def village(self) -> str:
        # One-off place names give the corpus a long tail of rare words, like real Wikipedia.
        return "".join(_syllable(self.rng) for _ in range(self.rng.randint(2, 3))).capitalize()

    def filler(self, c: _Country, place: str, years: tuple[int, int] | None = None) -> str:
        r = self.rng
        k = r.randrange(14)
        year = r.randint(*(years or (c.founded, 1900)))
        if k == 0:
            return f"In {year} , the {r.choice(_NOUNS)} of {place} was {r.choice(_VERBS)} by {r.choice(_GROUPS)} from {r.choice(c.cities)} ."
        if k == 1:
            return f"The {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} near {self.village()} was {r.choice(_VERBS)} in {year} ."
        if k == 2:
            return f"By {year} about {_num(r.randint(2, 900) * 100)} {r.choice(_GROUPS)} lived in {place} ."
        if k == 3:
            return f"Trade in {r.choice(_EXPORTS)} and {c.export} made {place} {r.choice(_ADJECTIVES)} during the {r.randint(12, 19)}th century ."
        if k == 4:
            dest = r.choice([x for x in c.cities if x != place])
            return f"{_a(r.choice(_ADJECTIVES)).capitalize()} {r.choice(_NOUNS)} stands on the road from {place} to {dest} ."
        if k == 5:
            return f"The {r.choice(_GROUPS)} of {self.village()} paid a tax of {r.randint(2, 90)} {c.currency} each year ."
        if k == 6:
            return f"The road to {self.village()} is {_dec(r.uniform(2, 80))} kilometres ( {_dec(r.uniform(1, 50))} mi ) long ."
        if k == 7:
            return f"The {r.choice(_NOUNS)} was {r.choice(_VERBS)} again in {year} after a fire ."
        if k == 8:
            return (f"During the winter of {year} the {r.choice(_GROUPS)} of {place} sent {_num(r.randint(2, 400) * 10)} "
                    f"loads of {c.export} down the {c.river} .")
        if k == 9:
            return f"The {c.adj} council met in the {r.choice(_NOUNS)} of {place} from {year} until {year + r.randint(2, 60)} ."
        if k == 10:
            return (f"Records from {year} describe {_a(r.choice(_ADJECTIVES))} {r.choice(_NOUNS)} , "
                    f"{_a(r.choice(_NOUNS))} and {r.randint(2, 40)} houses at {self.village()} .")
        if k == 11:
            return f"In the census of {year} , {place} had {_num(r.randint(5, 2000) * 10)} inhabitants ."
        if k == 12:
            return f"The {r.choice(_GROUPS)} of {place} were famous for their {r.choice(_EXPORTS)} and their {r.choice(_NOUNS)} ."
        return f"{place} is known for its {r.choice(_ADJECTIVES)} {r.choice(_NOUNS)} and its {r.choice(_NOUNS)} ."


def _canon(f: Fact) -> str:
    return f.sentence


def _country_article(wr: _Writer, ci: int, fx: dict) -> None:
    w, r = wr.w, wr.rng
    c = w.countries[ci]
    wr.title(c.name)
    intro = [f"{c.name} is {_a(c.government)} in the {r.choice(_DIRECTIONS)} of {c.region} .",
             _canon(fx[(c.name, 'capital')]),
             f"It was founded in {c.founded} by {c.founder} , and has a population of about {_num(c.population)} ."]
    if r.random() < 0.5:
        intro.append(f"The {c.adj} people are known for {c.export} and {r.choice(_EXPORTS)} .")
    wr.para(intro)
    wr.end_section()

    wr.section("History")
    hist = [f"{c.founder} founded {c.name} in {c.founded} and made {c.capital} its seat ."]
    hist += [wr.filler(c, r.choice(c.cities + [c.capital])) for _ in range(r.randint(3, 7))]
    wr.para(hist)
    for _ in range(r.randint(2, 5)):
        wr.para([wr.filler(c, r.choice(c.cities + [c.capital])) for _ in range(r.randint(5, 10))])
    for b in w.battles:
        if ci in (b.side_a, b.side_b) and r.random() < 0.7:
            other = w.countries[b.side_b if ci == b.side_a else b.side_a]
            result = "won" if b.winner == ci else "lost"
            wr.para([f"In {b.year} {c.name} fought {other.name} at the Battle of {b.place} , which it {result} .",
                     f"The {c.adj} forces were led by {b.commander} ." if b.winner == ci else
                     f"The victory of {w.countries[b.winner].name} was a turning point for the region ."])
    wr.end_section()

    wr.section("Geography")
    geo = [_canon(fx[(c.name, "river")]),
           f"The {c.river} rises on {c.mountain} and flows through {r.choice(c.cities)} .",
           f"The climate is {c.climate} , with {r.choice(['mild', 'cold', 'wet', 'dry', 'long'])} winters ."]
    geo += [f"Other cities include {', '.join(c.cities[:3]).replace(',', ' ,')} and {c.cities[3]} ."]
    wr.para(geo)
    if r.random() < 0.5:
        wr.section("Rivers", level=3)
        wr.para([f"Besides the {c.river} , small streams run from {c.mountain} to {wr.village()} ."])
        wr.end_section()
    wr.end_section()

    wr.section("Cities")  # one paragraph per city, as WikiText's long sections (~3 KB) have
    for city in [c.capital] + c.cities:
        lead = (f"{city} is the capital of {c.name} ." if city == c.capital else
                f"{city} lies {r.randint(5, 400)} kilometres from {c.capital} .")
        wr.para([lead] + [wr.filler(c, city) for _ in range(r.randint(3, 7))])

    wr.section("Economy")
    eco = [_canon(fx[(c.name, 'export')]), _canon(fx[(c.name, 'currency')]),
           f"Most {c.export} leaves through the harbour of {r.choice(c.cities)} ."]
    eco += [wr.filler(c, r.choice(c.cities)) for _ in range(r.randint(3, 6))]
    wr.para(eco)
    wr.para([wr.filler(c, r.choice(c.cities)) for _ in range(r.randint(4, 8))])
    wr.end_section()

    wr.section("Culture")
    natives = [p for p in w.people if p.country == ci]
    cul = [f"The {c.adj} language is spoken in {c.capital} and in the villages around {c.mountain} ."]
    for p in natives[:4]:
        cul.append(f"The {p.profession} {p.name} , author of {p.work} , was born in {p.birthplace} .")
    # Long-range repeat: the article's first facts again, far from where they were first stated.
    cul.append(f"Visitors to {c.capital} , the capital of {c.name} , can buy {c.export} for a few {c.currency} .")
    wr.para(cul)
    wr.end_section()


def _city_article(wr: _Writer, city: str, fx: dict) -> None:
    w, r = wr.w, wr.rng
    ci = w.city_country[city]
    c = w.countries[ci]
    wr.title(city)
    if city == c.capital:
        first = [f"{city} is the capital and largest city of {c.name} .", _canon(fx[(c.name, 'capital')])]
    else:
        first = [f"{city} is {_a(r.choice(_ADJECTIVES))} city in the {r.choice(_DIRECTIONS)} of {c.name} ."]
    first.append(f"It lies on the {c.river} , {r.randint(3, 300)} kilometres from {c.mountain} .")
    wr.para(first)
    wr.end_section()
    wr.section("History")
    for _ in range(r.randint(2, 5)):
        wr.para([wr.filler(c, city) for _ in range(r.randint(5, 10))])
    for b in w.battles:
        if b.place == city:
            wr.para([f"The Battle of {city} was fought here in {b.year} between {w.countries[b.side_a].name} "
                     f"and {c.name if b.side_b == ci else w.countries[b.side_b].name} ."])
    wr.end_section()
    natives = [p for p in w.people if p.birthplace == city]
    if natives:
        wr.section("Notable people")
        wr.para([_canon(fx[(p.name, 'birthplace')]) + f" {p.name} became {_a(p.profession)} ." for p in natives])
        wr.end_section()


def _person_article(wr: _Writer, pi: int, fx: dict) -> None:
    w, r = wr.w, wr.rng
    p = w.people[pi]
    c = w.countries[p.country]
    wr.title(p.name)
    wr.para([f"{p.name} ( {p.born} – {p.died} ) was {_a(c.adj)} {p.profession} , best known for {p.work} ."])
    wr.end_section()
    wr.section("Early life")
    wr.para([_canon(fx[(p.name, 'birthplace')]),
             f"{p.name.split()[0]} grew up in {p.birthplace} , a city of {c.name} on the {c.river} .",
             f"At the age of {r.randint(9, 25)} {p.name.split()[0]} moved to {r.choice([c.capital] + c.cities)} ."])
    wr.end_section()
    wr.section("Career")
    car = [f"In {p.born + r.randint(20, 27)} {p.name.split()[-1]} completed {p.work} ."]
    car += [wr.filler(c, p.birthplace, (p.born, p.died)) for _ in range(r.randint(3, 6))]
    wr.para(car)
    for _ in range(r.randint(1, 3)):
        wr.para([wr.filler(c, r.choice(c.cities), (p.born, p.died)) for _ in range(r.randint(4, 8))])
    wr.end_section()
    wr.section("Death and legacy")
    wr.para([f"{p.name} died in {p.died} in {r.choice([c.capital] + c.cities)} .",
             f"{_a(r.choice(_NOUNS)).capitalize()} in {p.birthplace} bears the name of {p.name.split()[-1]} ."])
    wr.end_section()


def _battle_article(wr: _Writer, bi: int, fx: dict) -> None:
    w, r = wr.w, wr.rng
    b = w.battles[bi]
    a, d, win = w.countries[b.side_a], w.countries[b.side_b], w.countries[b.winner]
    wr.title(f"Battle of {b.place} ( {b.year} )")
    wr.para([f"The Battle of {b.place} was fought in {b.year} between {a.name} and {d.name} .",
             f"It ended in a victory for {win.name} under {b.commander} ."])
    wr.end_section()
    wr.section("Background")
    wr.para([f"{b.place} lies in {d.name} , whose capital is {d.capital} .",
             *[wr.filler(d, b.place, (b.year - 40, b.year)) for _ in range(r.randint(3, 6))]])
    wr.end_section()
    wr.section("Battle")
    wr.para([f"About {_num(r.randint(3, 60) * 1000)} {a.adj} soldiers crossed the {d.river} .",
             f"The fighting lasted {r.randint(1, 9)} days ."]
            + [wr.filler(d, b.place, (b.year, b.year)) for _ in range(r.randint(2, 5))])
    wr.end_section()
    wr.section("Aftermath")
    wr.para([f"After the battle {win.name} took {r.choice(_EXPORTS)} and {win.export} as tribute ."]
            + [wr.filler(win, r.choice(win.cities), (b.year, b.year + 30)) for _ in range(r.randint(3, 6))])
    wr.end_section()


def iter_articles(seed: int, split: str) -> Iterator[str]:
    """Endless deterministic stream of articles for one split (each split its own random stream)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: expected one of {SPLITS}")
    w = _world(seed)
    fx = {(f.subject, f.relation): f for f in facts(seed)}
    rng = random.Random(f"groundthink-demo-{seed}-{split}")
    all_cities = list(w.city_country)
    while True:
        wr = _Writer(rng, w)
        k = rng.random()
        if k < 0.35:
            _country_article(wr, rng.randrange(len(w.countries)), fx)
        elif k < 0.6:
            _city_article(wr, rng.choice(all_cities), fx)
        elif k < 0.85:
            _person_article(wr, rng.randrange(len(w.people)), fx)
        else:
            _battle_article(wr, rng.randrange(len(w.battles)), fx)
        yield wr.text()


def split_sizes(size_mb: float) -> dict[str, int]:
    """Target bytes per split: `size_mb` MB of train, held-out splits HELDOUT_FRACTION of it."""
    if not size_mb > 0:
        raise ValueError(f"demo size_mb must be > 0, got {size_mb}")
    train = int(size_mb * 1_000_000)
    held = max(HELDOUT_MIN_BYTES, int(train * HELDOUT_FRACTION))
    return {"train": train, "validation": held, "test": held}


def write_split(path: Path, seed: int, split: str, target_bytes: int) -> dict:
    """Write whole articles until at least `target_bytes`; returns {"bytes", "documents", "lines"}."""
    n_bytes = n_docs = n_lines = 0
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write(" \n")  # wiki.*.raw files open with a blank line before the first title
        n_bytes, n_lines = 2, 1
        for art in iter_articles(seed, split):
            f.write(art)
            n_bytes += len(art.encode("utf-8"))
            n_lines += art.count("\n")
            n_docs += 1
            if n_bytes >= target_bytes:
                break
    os.replace(tmp, path)
    return {"bytes": n_bytes, "documents": n_docs, "lines": n_lines}


def write_corpus(out_dir: Path, seed: int = 0, size_mb: float = 4.0) -> dict:
    """Write {split}.txt for every split into out_dir; returns per-split stats."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {s: write_split(out_dir / f"{s}.txt", seed, s, n) for s, n in split_sizes(size_mb).items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", nargs="?", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--size-mb", type=float, default=4.0)
    ap.add_argument("--facts", action="store_true", help="print the facts as JSON lines and exit")
    args = ap.parse_args(argv)
    if args.facts:
        for f in facts(args.seed):
            print(json.dumps(asdict(f)))
        return
    if args.out_dir is None:
        ap.error("OUT_DIR is required unless --facts is given")
    print(json.dumps(write_corpus(args.out_dir, args.seed, args.size_mb), indent=1))


if __name__ == "__main__":
    main()

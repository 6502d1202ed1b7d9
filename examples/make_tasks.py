"""Writes the example task suite of issue 7: JSONL task folders regenerated exactly from a seed.

    python examples/make_tasks.py --out data/tasks --seed 0            # 2,000 train / 200 test each
    python examples/make_tasks.py --out /tmp/t --train-size 50 --test-size 10 --tasks arithmetic

Layout (DESIGN.md section 6), plus two manifests at the root:

    <out>/<task>/train.jsonl, <out>/<task>/test.jsonl   {"prompt": str, "response": str} per line
    <out>/tasks.json     task -> {"metric", "description", "source", "train", "test"}
    <out>/metrics.json   task -> metric (the form `scripts/evaluate.py --metrics` reads)

Metric names are those of `meteora_jax.evaluate.METRICS` ("accuracy" is exact match,
"accuracy_contains", "rougeL", "bleu").

Six tasks draw on real data shipped inside PyPI packages (pycountry, periodictable, num2words,
babel, pint); four are procedural. Every task has its own instruction wording and a fixed answer
template that a model cannot guess without training on it. The test split is drawn first from
its own random stream, then the train split, rejecting any prompt already drawn: the two splits
never share a prompt, and the test split does not depend on --train-size. Data-backed tasks
depend on the package versions (recorded in tasks.json as "source").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata

Sampler = Callable[[random.Random], tuple[str, str]]


@dataclass(frozen=True)
class Task:
    name: str
    metric: str
    description: str
    source: str  # "procedural" or the PyPI package(s) the data comes from
    build: Callable[[], Sampler]  # loads the data (lazily: only selected tasks import their package)


def _clean(text: str) -> str:
    # CLDR/pint output uses no-break and narrow no-break spaces: keep answers to plain spaces.
    return text.replace("\u00a0", " ").replace("\u202f", " ").strip()


def _version(package: str) -> str:
    try:
        return f"{package}=={metadata.version(package)}"
    except metadata.PackageNotFoundError:
        return package


# ----------------------------------------------------------------------------------------------
# Tasks from real data shipped in PyPI packages


def _country_codes() -> Sampler:
    import pycountry

    countries = sorted(
        (getattr(c, "common_name", None) or c.name, c.alpha_3) for c in pycountry.countries
    )
    countries = [(n, code) for n, code in countries if ";" not in n]

    def sample(rng):
        picks = rng.sample(countries, rng.randint(2, 4))
        prompt = "Country codes (ISO 3166-1 alpha-3) for: " + "; ".join(n for n, _ in picks)
        return prompt, " | ".join(code for _, code in picks)

    return sample


def _element_lookup() -> Sampler:
    import periodictable

    elements = [(e.symbol, e.name, e.number) for e in periodictable.elements if 1 <= e.number <= 118]

    def sample(rng):
        picks = rng.sample(elements, rng.randint(2, 3))
        prompt = "Identify the chemical elements with symbols " + ", ".join(s for s, _, _ in picks) + "."
        return prompt, "; ".join(f"{name} ({z})" for _, name, z in picks)

    return sample


def _number_words_fr() -> Sampler:
    from num2words import num2words

    def sample(rng):
        n = rng.randint(1, 9999)
        return f"Écris ce nombre en toutes lettres : {n}", num2words(n, lang="fr")

    return sample


_LOCALES = ("en_US", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL")


def _locale_dates() -> Sampler:
    from babel.dates import format_date

    first, days = datetime.date(1950, 1, 1), 100 * 365

    def sample(rng):
        day = first + datetime.timedelta(days=rng.randrange(days))
        locale = rng.choice(_LOCALES)
        prompt = f"Render the date {day.isoformat()} in the long format of locale {locale}."
        return prompt, _clean(format_date(day, format="long", locale=locale))

    return sample


def _subdivision_text() -> Sampler:
    import pycountry

    def country_name(code):
        c = pycountry.countries.get(alpha_2=code)
        return getattr(c, "common_name", None) or c.name

    by_code = {s.code: s for s in pycountry.subdivisions}
    records = []
    for code in sorted(by_code):
        s = by_code[code]
        parent = by_code.get(s.parent_code) if s.parent_code else None
        records.append((s.code, s.name, s.type, country_name(s.country_code), parent.name if parent else None))

    def sample(rng):
        code, name, kind, country, parent = rng.choice(records)
        fields = [f"code={code}", f"name={name}", f"type={kind}", f"country={country}"]
        if parent:
            fields.append(f"parent={parent}")
        prompt = "Turn this ISO 3166-2 record into one sentence.\n" + " | ".join(fields)
        kind = kind.lower()
        article = "an" if kind[0] in "aeiou" else "a"
        where = f"{parent}, {country}" if parent else country
        return prompt, f"{name} is {article} {kind} of {where}, with subdivision code {code}."

    return sample


_PREFIXES = ("", "kilo", "mega", "giga", "milli", "micro", "nano", "centi", "pico", "tera")
_UNITS = (
    "meter", "gram", "second", "joule", "watt", "newton", "pascal", "volt", "ampere", "ohm", "hertz",
    "liter", "mole", "coulomb", "farad", "henry", "tesla", "weber", "becquerel", "gray", "sievert",
    "byte", "bit", "electron_volt", "calorie", "siemens", "lumen", "lux",
)
_PER = ("second", "millisecond", "minute", "hour", "day", "meter", "centimeter", "kilometer", "liter",
        "milliliter", "gram", "kilogram", "mole", "kelvin")


def _unit_symbols() -> Sampler:
    import pint

    registry = pint.UnitRegistry()

    def symbol(expr):
        return _clean(f"{registry.Unit(expr):~P}")

    def sample(rng):
        top = rng.choice(_PREFIXES) + rng.choice(_UNITS)
        if rng.random() < 0.25:
            words, expr = top, top
        else:
            per = rng.choice(_PER)
            words, expr = f"{top} per {per}", f"{top} / {per}"
        return f"Abbreviate the unit: {words.replace('_', ' ')}", symbol(expr)

    return sample


# ----------------------------------------------------------------------------------------------
# Procedural tasks


def _arithmetic() -> Sampler:
    def sample(rng):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if rng.random() < 0.5:
            return f"What is {a} plus {b}?", f"Answer: {a + b}"
        return f"What is {a} minus {b}?", f"Answer: {a - b}"

    return sample


def _sort_numbers() -> Sampler:
    def sample(rng):
        xs = rng.sample(range(100), rng.randint(4, 6))
        return "Sort ascending: " + ", ".join(map(str, xs)), " < ".join(map(str, sorted(xs)))

    return sample


_WORDS = (
    "apple", "river", "stone", "cloud", "tiger", "bread", "glass", "horse", "light", "table",
    "green", "music", "paper", "chair", "ocean", "plant", "train", "smile", "dream", "house",
    "night", "money", "water", "field", "sugar", "storm", "heart", "world", "honey", "lemon",
    "clock", "eagle", "grape", "knife", "mouse", "north", "pearl", "queen", "radio", "sheep",
    "tooth", "voice", "whale", "youth", "zebra", "flame", "brick", "coral", "dance", "frost",
    "cat", "dog", "sun", "moon", "star", "tree", "bird", "fish", "book", "door", "road", "rain",
    "snow", "wind", "fire", "gold", "milk", "salt", "ship", "king", "lake", "hill", "rose", "wolf",
)


def _reverse_words() -> Sampler:
    def sample(rng):
        words = rng.sample(_WORDS, rng.randint(3, 6))
        return "Reverse the order of these words: " + " ".join(words), " / ".join(reversed(words))

    return sample


_ROMAN = ((1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"),
          (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I"))


def to_roman(n: int) -> str:
    """1..3999 in standard subtractive Roman notation (greedy over the values above)."""
    digits = []
    for value, numeral in _ROMAN:
        count, n = divmod(n, value)
        digits.append(numeral * count)
    return "".join(digits)


def _roman_numerals() -> Sampler:
    def sample(rng):
        n = rng.randint(1, 3999)
        return f"Convert {n} to Roman numerals.", f"{n} = {to_roman(n)}"

    return sample


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("country_codes", "accuracy", "country names -> ISO 3166-1 alpha-3 codes joined by ' | '",
             "pycountry", _country_codes),
        Task("element_lookup", "accuracy", "element symbols -> 'name (atomic number)' joined by '; '",
             "periodictable", _element_lookup),
        Task("number_words_fr", "accuracy", "integer 1-9999 -> French words (num2words)", "num2words",
             _number_words_fr),
        Task("locale_dates", "accuracy", "ISO date + locale -> CLDR long date format (babel)", "babel",
             _locale_dates),
        Task("subdivision_text", "rougeL", "ISO 3166-2 record -> one templated sentence", "pycountry",
             _subdivision_text),
        Task("unit_symbols", "accuracy", "unit name in words -> SI/pint symbol, e.g. 'km/h'", "pint",
             _unit_symbols),
        Task("arithmetic", "accuracy", "two-digit addition/subtraction -> 'Answer: N'", "procedural",
             _arithmetic),
        Task("sort_numbers", "accuracy", "4-6 integers -> ascending, joined by ' < '", "procedural",
             _sort_numbers),
        Task("reverse_words", "accuracy", "3-6 words -> reversed order, joined by ' / '", "procedural",
             _reverse_words),
        Task("roman_numerals", "accuracy", "integer 1-3999 -> 'N = Roman numeral'", "procedural",
             _roman_numerals),
    )
}


# ----------------------------------------------------------------------------------------------
# Splits and files


# A pool is taken as exhausted after this many draws in a row without a new prompt (at ~150 us a draw
# for the slowest task, a few seconds); a pool with unseen prompts left at rate p passes this test
# with probability (1 - p) ** MAX_MISSES.
MAX_MISSES = 20_000


class PoolExhausted(ValueError):
    """A task has fewer distinct prompts than a split asks for."""


def draw_unique(sample: Sampler, rng: random.Random, n: int, exclude: set[str], bar=None) -> list[dict]:
    """`n` records with prompts distinct from each other and from `exclude` (which is updated);
    PoolExhausted if MAX_MISSES draws in a row find no new prompt. `bar` (tqdm) counts the records."""
    records, misses = [], 0
    while len(records) < n:
        prompt, response = sample(rng)
        if prompt in exclude:
            misses += 1
            if misses == MAX_MISSES:
                raise PoolExhausted(f"only {len(records)} distinct prompts of {n} ({MAX_MISSES} draws in a row "
                                 f"found no new one)")
            continue
        misses = 0
        exclude.add(prompt)
        records.append({"prompt": prompt, "response": response})
        if bar is not None:
            bar.update(1)
    return records


def make_task(task: Task, seed: int, train_size: int, test_size: int, bar=None) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} for one task, a pure function of (task, seed, sizes);
    PoolExhausted naming the task and split when it has too few distinct prompts for the sizes."""
    sample = task.build()
    seen: set[str] = set()
    splits = {}
    # Separate string-seeded streams (seeded through SHA-512, independent of PYTHONHASHSEED); test first,
    # so that it does not depend on the train size.
    for split, size in (("test", test_size), ("train", train_size)):
        try:
            splits[split] = draw_unique(sample, random.Random(f"{seed}/{task.name}/{split}"), size, seen, bar)
        except PoolExhausted as e:  # (a sampler's own error keeps its traceback)
            raise PoolExhausted(f"task {task.name!r}, {split} split: {e}; ask for fewer with --{split}-size") from None
    return {"train": splits["train"], "test": splits["test"]}


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_tasks(out: str, names: list[str], seed: int, train_size: int, test_size: int) -> dict:
    """Writes the selected tasks and the manifests; returns the tasks.json content. Every task is
    drawn before anything is written, so a task that cannot be drawn leaves `out` as it was."""
    from tqdm.auto import tqdm

    drawn = {}
    with tqdm(total=len(names) * (train_size + test_size), desc="drawing", unit="record", dynamic_ncols=True) as bar:
        for name in names:
            bar.set_postfix_str(name)
            drawn[name] = make_task(TASKS[name], seed, train_size, test_size, bar)
    manifest = {}
    for name, splits in drawn.items():
        task = TASKS[name]
        os.makedirs(os.path.join(out, name), exist_ok=True)
        for split, records in splits.items():
            _write_jsonl(os.path.join(out, name, f"{split}.jsonl"), records)
        source = task.source if task.source == "procedural" else _version(task.source)
        manifest[name] = {
            "metric": task.metric,
            "description": task.description,
            "source": source,
            "train": len(splits["train"]),
            "test": len(splits["test"]),
        }
        print(f"{name:18s} {source:24s} {task.metric:9s} train {len(splits['train'])} test {len(splits['test'])}")
    with open(os.path.join(out, "tasks.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump({k: v["metric"] for k, v in manifest.items()}, f, indent=2)
        f.write("\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])  # a whole sentence
    p.add_argument("--out", required=True, help="root folder of the task folders")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=2000, help="train samples per task (default 2000)")
    p.add_argument("--test-size", type=int, default=200, help="test samples per task (default 200)")
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of: {','.join(TASKS)}")
    args = p.parse_args(argv)
    names = list(TASKS) if not args.tasks else [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {list(TASKS)}")
    if args.train_size < 1 or args.test_size < 1:
        p.error("--train-size and --test-size must be positive")
    try:
        write_tasks(args.out, names, args.seed, args.train_size, args.test_size)
    except PoolExhausted as e:
        p.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())

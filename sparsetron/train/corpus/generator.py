"""A deterministic generator of varied, English-like documents with learnable structure.

Every function takes a ``random.Random`` and is a pure function of its state, so a seed reproduces the text
exactly (CPython's ``Random`` streams for ``choice``/``randint``/``sample``/``shuffle`` are stable across
versions). The documents are chosen to give a small model several kinds of structure to learn quickly:
spelling and grammar of a fixed vocabulary, characters that recur throughout one document (in-context
copying), weekdays and dates that advance in order, and sums and totals that are arithmetically correct.

Filler sentences (:func:`filler_sentences`) are free of digits, so synthetic tasks can hide numbers in them.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

NAMES = (
    "Ada", "Basil", "Clara", "Dorian", "Edith", "Felix", "Greta", "Hugo", "Iris", "Jasper", "Kira", "Leon",
    "Mabel", "Nolan", "Opal", "Percy", "Quinn", "Rosa", "Silas", "Tess", "Ulric", "Vera", "Walter", "Wren",
    "Yusuf", "Zelda", "Amos", "Bess", "Cyrus", "Della", "Ezra", "Flora",
)  # fmt: skip
PLACES = (
    "the mill", "the harbour", "the old bridge", "the orchard", "the market", "the lighthouse", "the chapel",
    "the meadow", "the bakery", "the quarry", "the station", "the river bank", "the school house",
    "the forge", "the library", "the inn", "the garden wall", "the ferry landing", "the hill farm",
    "the print shop",
)  # fmt: skip
ANIMALS = (
    ("fox", "foxes"), ("goose", "geese"), ("pony", "ponies"), ("heron", "herons"), ("cat", "cats"),
    ("hound", "hounds"), ("sheep", "sheep"), ("owl", "owls"), ("hare", "hares"), ("crow", "crows"),
    ("goat", "goats"), ("mouse", "mice"),
)  # fmt: skip
THINGS = (
    ("lantern", "lanterns"), ("basket", "baskets"), ("kettle", "kettles"), ("ladder", "ladders"),
    ("letter", "letters"), ("map", "maps"), ("compass", "compasses"), ("blanket", "blankets"),
    ("barrel", "barrels"), ("rope", "ropes"), ("candle", "candles"), ("key", "keys"), ("box", "boxes"),
    ("bell", "bells"), ("wheel", "wheels"), ("knife", "knives"), ("cup", "cups"), ("book", "books"),
    ("coat", "coats"), ("boat", "boats"),
)  # fmt: skip
ADJECTIVES = (
    "old", "small", "heavy", "bright", "quiet", "broken", "golden", "narrow", "crooked", "silver", "wooden",
    "tall", "gentle", "curious", "patient", "clever", "muddy", "faded", "warm", "empty", "strange", "sturdy",
)  # fmt: skip
COLOURS = ("red", "blue", "green", "grey", "brown", "white", "black", "yellow")
TRANSITIVE = (
    "found", "carried", "mended", "painted", "sold", "hid", "watched", "counted", "cleaned", "borrowed",
    "opened", "lost", "dropped", "lifted", "wrapped", "polished", "filled", "followed",
)  # fmt: skip
INTRANSITIVE = (
    "waited", "laughed", "slept", "wandered", "sang", "worked", "rested", "listened", "hurried", "whistled",
    "sighed", "smiled",
)  # fmt: skip
ADVERBS = (
    "slowly", "quietly", "happily", "carefully", "suddenly", "patiently", "softly", "gladly", "bravely",
    "eagerly",
)  # fmt: skip
TIMES = (
    "In the morning", "At noon", "Before dawn", "After supper", "Late in the evening", "On the next day",
    "Some time later", "At first light", "Near midnight", "Just after breakfast",
)  # fmt: skip
WEATHER = (
    "clear and cold", "grey with a light rain", "warm and still", "windy from the west", "foggy until noon",
    "bright and dry", "wet and stormy", "mild with high clouds", "frosty at dawn", "hot and heavy",
)  # fmt: skip
FEELINGS = ("glad", "tired", "worried", "proud", "surprised", "hungry", "calm", "restless")
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
DISHES = (
    "barley soup", "apple pie", "oat bread", "plum jam", "fish stew", "honey cake", "pea porridge",
    "onion tart", "berry pudding", "corn fritters",
)  # fmt: skip
INGREDIENTS = (
    ("cups", "flour"), ("cups", "milk"), ("spoons", "honey"), ("spoons", "salt"), ("cups", "oats"),
    ("pounds", "apples"), ("cups", "water"), ("spoons", "butter"), ("cups", "barley"), ("pounds", "onions"),
    ("cups", "berries"), ("spoons", "sugar"),
)  # fmt: skip
KITCHEN_STEPS = (
    "Wash the {i} and set it aside.", "Stir the {i} into the pot.", "Mix the {i} in a wide bowl.",
    "Warm the {i} over a low fire.", "Fold in the {i} a little at a time.", "Sift the {i} twice.",
    "Let the {i} rest for a while.", "Pour the {i} into a buttered dish.",
)  # fmt: skip
UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """English words for 0 ≤ n < 1000, e.g. ``number_words(342) == "three hundred and forty-two"``."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words handles 0..999, got {n}")
    if n < 20:
        return UNITS[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + UNITS[n % 10])
    rest = n % 100
    return UNITS[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))


def with_article(phrase: str) -> str:
    """``"apple" -> "an apple"``, ``"pear" -> "a pear"`` (by the first letter, enough for this vocabulary)."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _noun_phrase(rng: random.Random) -> str:
    singular, _ = rng.choice(THINGS)
    return f"{rng.choice(ADJECTIVES)} {singular}"


def _cast_sentence(rng: random.Random, hero: str, friend: str, home: str, pet: str) -> str:
    """One sentence of a story about ``hero`` and ``friend``, who live near ``home`` and keep a ``pet``."""
    pets = dict(ANIMALS)[pet]
    count = rng.randint(2, 12)
    templates = (
        lambda: (
            f"{rng.choice(TIMES)}, {hero} {rng.choice(TRANSITIVE)} {with_article(_noun_phrase(rng))} near {home}."
        ),
        lambda: f"{hero} and {friend} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)}.",
        lambda: f'"Good day, {friend}," said {hero}. "Have you seen the {_noun_phrase(rng)}?"',
        lambda: f'"No," said {friend}, "but I saw {number_words(count)} {pets} by {rng.choice(PLACES)}."',
        lambda: (
            f"The {pet} {rng.choice(INTRANSITIVE)} {rng.choice(ADVERBS)} while {hero} {rng.choice(TRANSITIVE)} the {_noun_phrase(rng)}."
        ),
        lambda: f"It was {rng.choice(WEATHER)}, so {hero} stayed at {home}.",
        lambda: f"{friend} {rng.choice(TRANSITIVE)} the {_noun_phrase(rng)} and gave it to {hero}.",
        lambda: f"{hero} felt {rng.choice(FEELINGS)}, and {friend} felt {rng.choice(FEELINGS)}.",
        lambda: f"Nobody at {home} knew why the {rng.choice(COLOURS)} {rng.choice(THINGS)[0]} had gone.",
        lambda: f"{friend} {rng.choice(INTRANSITIVE)}, and the {pet} {rng.choice(INTRANSITIVE)} too.",
    )
    return rng.choice(templates)()


def filler_sentences(rng: random.Random) -> Iterator[str]:
    """An endless stream of varied story sentences (no digits) with a fresh cast every few sentences."""
    while True:
        hero, friend = rng.sample(NAMES, 2)
        home, pet = rng.choice(PLACES), rng.choice(ANIMALS)[0]
        for _ in range(rng.randint(3, 8)):
            yield _cast_sentence(rng, hero, friend, home, pet)


def story(rng: random.Random) -> str:
    """A titled story whose few characters, home and pet recur in every paragraph."""
    hero, friend = rng.sample(NAMES, 2)
    home, pet = rng.choice(PLACES), rng.choice(ANIMALS)[0]
    title = f"The {rng.choice(ADJECTIVES).title()} {rng.choice(THINGS)[0].title()}"
    paragraphs = [
        " ".join(_cast_sentence(rng, hero, friend, home, pet) for _ in range(rng.randint(3, 7)))
        for _ in range(rng.randint(3, 7))
    ]
    ending = f"And so {hero} and {friend} went home to {home}, and the {pet} followed them."
    return "\n\n".join([title, *paragraphs, ending])


def letter(rng: random.Random) -> str:
    """A letter from one character to another, with a greeting, news and a signature."""
    writer, reader, other = rng.sample(NAMES, 3)
    place = rng.choice(PLACES)
    lines = (
        lambda: f"The weather here has been {rng.choice(WEATHER)}.",
        lambda: (
            f"Last {rng.choice(WEEKDAYS)} I {rng.choice(TRANSITIVE)} {with_article(_noun_phrase(rng))} at {rng.choice(PLACES)}."
        ),
        lambda: f"{other} sends greetings and says the {rng.choice(ANIMALS)[0]} is well.",
        lambda: f"We have been {rng.choice(FEELINGS)} since you left {place}.",
        lambda: f"I will write again in {number_words(rng.randint(2, 20))} days.",
        lambda: f"Do you still keep the {_noun_phrase(rng)} I gave you?",
    )
    paragraphs = [" ".join(rng.choice(lines)() for _ in range(3)) for _ in range(rng.randint(2, 4))]
    paragraphs[0] = "I hope this letter finds you well. " + paragraphs[0]
    return "\n\n".join(
        [f"Dear {reader},", *paragraphs, f"Please give my regards to {other}.", f"Yours truly,\n{writer}"]
    )


def recipe(rng: random.Random) -> str:
    """A recipe: a list of ingredients with amounts, then numbered steps that use those ingredients."""
    dish = rng.choice(DISHES)
    chosen = rng.sample(INGREDIENTS, rng.randint(3, 6))
    needs = [f"- {number_words(rng.randint(1, 6))} {unit} of {name}" for unit, name in chosen]
    steps = [
        f"Step {number}. " + rng.choice(KITCHEN_STEPS).format(i=name)
        for number, (_, name) in enumerate(chosen, 1)
    ]
    minutes = rng.choice((20, 30, 40, 45, 60))
    steps.append(f"Step {len(chosen) + 1}. Bake for {minutes} minutes and serve it warm.")
    serves = rng.randint(2, 8)
    return "\n\n".join(
        [
            f"How to Make {dish.title()}",
            "You will need:\n" + "\n".join(needs),
            "\n".join(steps),
            f"Serves {serves}.",
        ]
    )


def journal(rng: random.Random) -> str:
    """A weather journal whose entries walk through consecutive weekdays and dates of one month."""
    keeper = rng.choice(NAMES)
    month = rng.choice(MONTHS)
    weekday = rng.randrange(7)
    first = rng.randint(1, 10)
    entries = []
    for day in range(first, first + rng.randint(6, 18)):
        name = WEEKDAYS[(weekday + day - first) % 7]
        entries.append(
            f"{name}, {month} {day}. The weather was {rng.choice(WEATHER)}. "
            f"{keeper} {rng.choice(TRANSITIVE)} the {_noun_phrase(rng)} and felt {rng.choice(FEELINGS)}."
        )
    return "\n\n".join([f"The Journal of {keeper}, {month}", *entries])


def lesson(rng: random.Random) -> str:
    """An arithmetic lesson: correct sums, products and counts, in words and in figures."""
    number = rng.randint(1, 99)
    lines = []
    for _ in range(rng.randint(8, 16)):
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        kind = rng.randrange(3)
        if kind == 0:
            lines.append(f"{number_words(a).capitalize()} plus {number_words(b)} is {number_words(a + b)}.")
        elif kind == 1:
            lines.append(f"{a} + {b} = {a + b}, and {a} x {b} = {a * b}.")
        else:
            singular, plural = rng.choice(ANIMALS)
            noun = singular if a == 1 else plural
            lines.append(
                f"If you have {number_words(a)} {noun} and find {number_words(b)} more, you have {a + b}."
            )
    return "\n".join([f"Lesson {number}: Sums and Products", "", *lines])


def ledger(rng: random.Random) -> str:
    """A shop ledger: each line's total is quantity × price, and the last line sums the totals."""
    place = rng.choice(PLACES)
    weekday = rng.randrange(7)
    lines, grand = [], 0
    for day in range(rng.randint(4, 10)):
        singular, plural = rng.choice(THINGS)
        count, price = rng.randint(1, 9), rng.randint(2, 40)
        grand += count * price
        noun = singular if count == 1 else plural
        lines.append(
            f"{WEEKDAYS[(weekday + day) % 7]}: sold {count} {noun} at {price} cents each, {count * price} cents in all."
        )
    return "\n".join([f"Ledger kept at {place}", "", *lines, "", f"Total for the week: {grand} cents."])


GENRES: tuple[Callable[[random.Random], str], ...] = (story, story, letter, recipe, journal, lesson, ledger)


def generate_documents(seed: int, total_chars: int) -> list[str]:
    """Documents of mixed genres drawn with ``random.Random(seed)`` until they hold ≥ ``total_chars`` characters."""
    rng = random.Random(seed)
    documents, size = [], 0
    while size < total_chars:
        document = rng.choice(GENRES)(rng)
        documents.append(document)
        size += len(document)
    return documents

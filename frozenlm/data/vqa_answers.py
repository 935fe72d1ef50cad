"""VQA answer normalisation, exactly as the VQA challenge's evaluation script does it (`processPunctuation`,
`processDigitArticle`), and METER's answer vocabulary built with METER's `normalize_word` (the same two
steps without the script's stripping of the text first)."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

ANSWER_TYPES = ("yes/no", "number", "other")
NUMBER_WORDS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
NUMBER_WORDS["none"] = "0"
ARTICLES = {"a", "an", "the"}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
# The script's period pattern: its "(?!<=\d)" is a look-ahead, so any period not followed by a digit goes.
PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _contractions() -> dict[str, str]:
    """The script's table: an answer word written without one of its apostrophes -> the contraction.
    Words with one apostrophe appear only in the forms the script lists ("hed" yes, "shed" and "wed" no)."""
    single = (
        "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
        "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
        "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
        "there're there's they'd they'll they're they've wasn't we've weren't what'll what're what's what've when's "
        "where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all you'd "
        "you'll you're you've 'twas"
    ).split()
    table = {word.replace("'", ""): word for word in single}
    several = (
        "couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've somebody'd've someone'd've "
        "something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll you'd've 'ow's'at y'all'd've"
    ).split()
    for word in several:  # each form missing exactly one of the apostrophes
        for i in [i for i, c in enumerate(word) if c == "'"]:
            table[word[:i] + word[i + 1 :]] = word
    table["somebody'd"] = "somebodyd"  # sic
    return table


CONTRACTIONS = _contractions()


def normalize_punctuation(text: str) -> str:
    """The script's `processPunctuation`: punctuation next to a space (or any, in a text with a comma between
    digits) is deleted, otherwise replaced by a space; periods not before a digit are deleted."""
    out = text
    drop = DIGIT_COMMA.search(text) is not None
    for mark in PUNCTUATION:
        out = out.replace(mark, "" if drop or f"{mark} " in text or f" {mark}" in text else " ")
    return PERIOD.sub("", out, count=re.UNICODE)  # sic: the script passes re.UNICODE (32) as the count


def normalize_words(text: str) -> str:
    """The script's `processDigitArticle`: lower case, number words to digits, articles dropped,
    contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(text: str) -> str:
    """A predicted answer as the evaluation compares it (also how the answer vocabulary is built here)."""
    return normalize_words(normalize_punctuation(text.replace("\n", " ").replace("\t", " ").strip()))


def normalize_word(text: str) -> str:
    """METER's `normalize_word` (zdou0830/METER `meter/utils/glossary.py` line 168), which builds its answer
    vocabulary: `normalize_punctuation` then `normalize_words` on the text as given (unlike
    `normalize_answer`, no newline replacement or strip first). Its tables (punctuation, number words,
    articles, contractions) are the evaluation script's; its final `replace(",", "")` finds no comma left."""
    return normalize_words(normalize_punctuation(text)).replace(",", "")


def answer_vocabulary(main_answers: Iterable[str], min_count: int) -> list[str]:
    """METER's answer vocabulary (`meter/utils/write_vqa.py` `make_arrow`): each question's
    `multiple_choice_answer` through `normalize_word`, kept when at least `min_count` questions
    give it (METER: 9 over train2014 + val2014, 3,129 answers). Ordered most frequent first, ties
    alphabetical (METER keeps first appearance: the order only numbers the head's outputs)."""
    counts = Counter(normalize_word(answer) for answer in main_answers)
    return sorted((a for a, n in counts.items() if n >= min_count), key=lambda a: (-counts[a], a))


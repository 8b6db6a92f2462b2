"""Write grade-school word problems in the GSM8K format, as a .jsonl file.

    python benchmarks/make_gsm8k_like.py --n 500 --seed 0 --out data/gsm8k_like.jsonl

SYNTHETIC: these problems are generated from a few templates here, not GSM8K itself. Nothing
can be downloaded from the Hugging Face Hub on the machines this project is built and tested
on, so this is the honest way to have a local file in GSM8K's exact format (a ``question``,
and an ``answer`` whose worked solution ends in ``#### N``) for tests and the README's
offline example of recipes/grpo_gsm8k.yaml. The problems are easier and far less varied than
GSM8K's; numbers from runs on this file say nothing about GSM8K accuracy.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jack"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "cards"]


def _shopping(r: random.Random) -> tuple[str, str, int]:
    n, item, a, b, c = r.choice(NAMES), r.choice(ITEMS), r.randint(2, 30), r.randint(2, 9), r.randint(2, 12)
    q = f"{n} has {a} {item}. {n} buys {b} bags with {c} {item} in each bag. How many {item} does {n} have now?"
    bought, total = b * c, a + b * c
    return q, f"{n} buys {b} * {c} = <<{b}*{c}={bought}>>{bought} {item}.\n" \
              f"Now {n} has {a} + {bought} = <<{a}+{bought}={total}>>{total} {item}.", total


def _wages(r: random.Random) -> tuple[str, str, int]:
    n, a, b, c = r.choice(NAMES), r.randint(8, 25), r.randint(2, 8), r.randint(2, 6)
    earned = a * b * c
    d = r.randint(1, earned - 1)
    q = f"{n} earns ${a} an hour and works {b} hours a day for {c} days, then spends ${d}. " \
        f"How many dollars does {n} have left?"
    day = a * b
    return q, f"{n} earns {a} * {b} = <<{a}*{b}={day}>>{day} dollars a day.\n" \
              f"In {c} days that is {day} * {c} = <<{day}*{c}={earned}>>{earned} dollars.\n" \
              f"After spending {d}, {n} has {earned} - {d} = <<{earned}-{d}={earned - d}>>{earned - d} dollars left.", \
        earned - d


def _boxes(r: random.Random) -> tuple[str, str, int]:
    b, boxes, c = r.randint(3, 12), r.randint(2, 15), r.randint(2, 9)
    a = b * boxes
    q = f"A baker makes {a} muffins and packs them in boxes of {b}. Each box sells for ${c}. " \
        "How many dollars does the baker get for all the boxes?"
    return q, f"The baker fills {a} / {b} = <<{a}/{b}={boxes}>>{boxes} boxes.\n" \
              f"They sell for {boxes} * {c} = <<{boxes}*{c}={boxes * c}>>{boxes * c} dollars.", boxes * c


def _percent(r: random.Random) -> tuple[str, str, int]:
    a, p = 20 * r.randint(1, 10), r.choice([10, 20, 25, 40, 50, 60, 75])
    girls = a * p // 100
    q = f"There are {a} students in a school club. {p}% of them are girls. How many boys are in the club?"
    return q, f"There are {a} * {p} / 100 = <<{a}*{p}/100={girls}>>{girls} girls.\n" \
              f"So there are {a} - {girls} = <<{a}-{girls}={a - girls}>>{a - girls} boys.", a - girls


def _distance(r: random.Random) -> tuple[str, str, int]:
    a, b, c, d = r.randint(20, 70), r.randint(1, 5), r.randint(20, 70), r.randint(1, 5)
    q = f"A car drives at {a} miles per hour for {b} hours, then at {c} miles per hour for {d} hours. " \
        "How many miles does it drive in total?"
    first, second = a * b, c * d
    return q, f"First it drives {a} * {b} = <<{a}*{b}={first}>>{first} miles.\n" \
              f"Then it drives {c} * {d} = <<{c}*{d}={second}>>{second} miles.\n" \
              f"In total {first} + {second} = <<{first}+{second}={first + second}>>{first + second} miles.", \
        first + second


TEMPLATES = [_shopping, _wages, _boxes, _percent, _distance]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """``n`` problems as GSM8K rows: ``{"question": ..., "answer": "<solution>\\n#### N"}``."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        question, solution, result = r.choice(TEMPLATES)(r)
        rows.append({"question": question, "answer": f"{solution}\n#### {result}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="data/gsm8k_like.jsonl")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in make_rows(args.n, args.seed)))
    print(f"wrote {args.n} synthetic GSM8K-format problems to {out}")


if __name__ == "__main__":
    main()

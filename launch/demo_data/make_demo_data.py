"""Write the demo's synthetic instruction task: add two numbers below 100 (``launch/demo_data/*.jsonl``).

Why addition: the answer is checkable by exact match, a random-init model cannot guess it (chance is ~1/199), and a
small transformer learns it from a few thousand samples, so the demo shows a real before -> after accuracy rise.
Held-out pairs never appear in training (in either order), so the eval measures addition, not memorised pairs.

Digits are written one per token (``"3 7"``) because byte-level BPE would otherwise merge frequent digit pairs into
single tokens, turning addition into a 100 x 100 lookup table that a few thousand samples cannot fill.

Run ``python launch/demo_data/make_demo_data.py`` to regenerate; the output is deterministic (seeded), so the
committed files and a fresh run are byte-identical.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_TRAIN = 3000
N_EVAL = 200


def spell(n: int) -> str:
    """Write ``n`` with its digits separated by spaces, e.g. ``107 -> "1 0 7"`` (one token per digit)."""
    return " ".join(str(n))


def sample(a: int, b: int) -> dict:
    """One ``messages`` record asking for ``a + b``."""
    return {
        "messages": [
            {"role": "user", "content": f"Add: {spell(a)} + {spell(b)}"},
            {"role": "assistant", "content": spell(a + b)},
        ]
    }


def answer_of(record: dict) -> str:
    """The reference answer of a record (the last assistant turn), what exact match compares against."""
    return record["messages"][-1]["content"]


def make_splits(seed: int = SEED, n_train: int = N_TRAIN, n_eval: int = N_EVAL) -> tuple[list[dict], list[dict]]:
    """Draw disjoint train / eval sets of unordered pairs ``{a, b}`` with ``0 <= a, b < 100``."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(100) for b in range(a, 100)]  # unordered, 5050 pairs
    rng.shuffle(pairs)
    if n_train + n_eval > len(pairs):
        raise ValueError(f"n_train + n_eval = {n_train + n_eval} exceeds the {len(pairs)} distinct pairs")
    eval_pairs = pairs[:n_eval]
    train_pairs = pairs[n_eval : n_eval + n_train]

    def oriented(pair_list: list[tuple[int, int]]) -> list[dict]:
        # Random order of the operands, so the model sees both a + b and b + a.
        return [sample(*(p if rng.random() < 0.5 else p[::-1])) for p in pair_list]

    return oriented(train_pairs), oriented(eval_pairs)


def write_jsonl(path: Path, records: list[dict]) -> None:
    """Write one JSON object per line (UTF-8, ``\\n`` line ends)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    """CLI: write ``train.jsonl`` and ``eval.jsonl`` into ``--out-dir`` (default: this folder)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", type=Path, default=HERE)
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    train, evals = make_splits(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out_dir / "train.jsonl", train)
    write_jsonl(args.out_dir / "eval.jsonl", evals)
    print(f"wrote {len(train)} train and {len(evals)} eval records to {args.out_dir}")


if __name__ == "__main__":
    main()

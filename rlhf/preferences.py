"""Preference pairs for reward models: rows of ``prompt, chosen, rejected``. ``task: arith``
generates them (near misses, and pairs built from the base policy's own samples); a file task
reads them from a .jsonl / .csv / .parquet file."""
from __future__ import annotations

import random

import torch

from rewards.arith import last_integer
from rlhf.errors import UserError
from rlhf.tasks import ARITH_TEMPLATE, fresh_problems, load_rows, split_held_out

SAMPLED_SHARE = 0.25  # arith: share of pairs built from the base policy's own samples (the rest: near misses)


def arith_pairs(n: int, seed: int, exclude: set | None = None) -> list[dict]:
    """Preference pairs for the addition task: the right sum is preferred to a plausible wrong
    one (off by one, by ten, digits swapped, or off by 2-9), each written as a bare number or as
    ``a + b = s`` independently of the other. With ``exclude`` (held-out pairs) no problem in it
    is used and no problem is used twice."""
    rng, rows = random.Random(seed), []
    exclude = set(exclude) if exclude is not None else None
    if exclude is not None and n > 90 * 90 - len(exclude):
        raise UserError(f"only {90 * 90 - len(exclude)} fresh addition problems exist; ask for fewer")
    while len(rows) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if exclude is not None:
            if (a, b) in exclude:
                continue
            exclude.add((a, b))
        rejected = _written(a, b, _near_miss(a + b, rng), rng)
        rows.append({"prompt": [{"role": "user", "content": ARITH_TEMPLATE.format(a=a, b=b)}],
                     "chosen": _written(a, b, a + b, rng), "rejected": rejected, "a": a, "b": b,
                     "kind": "near_miss"})
    return rows


def _near_miss(s: int, rng: random.Random) -> int:
    wrong = rng.choice([s + 1, s - 1, s + 10, s - 10, int(str(s)[::-1]), s + rng.randint(2, 9)])
    return s + 1 if wrong == s else wrong


def _written(a: int, b: int, value: int, rng: random.Random) -> str:
    return str(value) if rng.random() < 0.7 else f"{a} + {b} = {value}"


@torch.no_grad()
def sampled_arith_pairs(rm, problems: list[tuple[int, int]], seed: int, max_new_tokens: int,
                        temperature: float, batch: int = 64) -> list[dict]:
    """Pairs the way RLHF builds them, from the policy's own samples: one completion per problem
    sampled from the base LM (the policy GRPO starts from; plain temperature sampling, no top-k),
    judged by ``arith_correct``. A wrong sample (most of them) is the rejected completion
    against the right answer, bare or as ``a + b = s``; a right one is the chosen completion
    against a near-miss wrong answer."""
    tok, rng, rows = rm.tokenizer, random.Random(f"{seed}/sampled-pairs"), []
    torch.manual_seed(seed)
    side, tok.padding_side = tok.padding_side, "left"
    try:
        for i in range(0, len(problems), batch):
            chunk = problems[i:i + batch]
            prompts = [[{"role": "user", "content": ARITH_TEMPLATE.format(a=a, b=b)}] for a, b in chunk]
            texts = [tok.apply_chat_template(q, tokenize=False, add_generation_prompt=True) for q in prompts]
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(rm.device)
            with rm.model.disable_adapter():
                out = rm.model.generate(**enc, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                        max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
            samples = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            for (a, b), q, sample in zip(chunk, prompts, samples):
                if last_integer(sample) == a + b:
                    chosen, rejected = sample, _written(a, b, _near_miss(a + b, rng), rng)
                else:
                    chosen, rejected = _written(a, b, a + b, rng), sample
                rows.append({"prompt": q, "chosen": chosen, "rejected": rejected, "a": a, "b": b,
                             "kind": "sampled"})
    finally:
        tok.padding_side = side
    return rows


def preference_rows(cfg, rm, n_eval: int | None = None, train: bool = True
                    ) -> tuple[list[dict], list[dict]]:
    """(training, held-out) preference pairs of a reward-model recipe (``train=False``: the
    held-out ones only, the same as a training run made). ``task: arith``: a mix, the same in
    both sets, of ``SAMPLED_SHARE`` pairs built from the base policy's samples and near-miss
    pairs; held-out pairs use problems no training pair uses. A file: its rows (prompt,
    chosen, rejected), split like any file task (``eval_task``, else 10% of the file)."""
    n_eval = n_eval or cfg.eval_problems
    if cfg.task == "arith":
        n_train = cfg.steps * cfg.prompts_per_step
        n_sampled, n_eval_sampled = round(SAMPLED_SHARE * n_train), round(SAMPLED_SHARE * n_eval)
        near = arith_pairs(n_train - n_sampled, cfg.seed)
        seen = {(r["a"], r["b"]) for r in near}
        sampled = fresh_problems(n_sampled, f"{cfg.seed}/sampled", exclude=set())
        held_near = arith_pairs(n_eval - n_eval_sampled, cfg.eval_seed, exclude=seen | set(sampled))
        held_sampled = fresh_problems(n_eval_sampled, f"{cfg.eval_seed}/sampled",
                                      exclude=seen | set(sampled) | {(r["a"], r["b"]) for r in held_near})
        def pairs(problems, seed):
            return sampled_arith_pairs(rm, problems, seed, cfg.max_new_tokens, cfg.temperature)

        held_out = held_near + pairs(held_sampled, cfg.eval_seed)
        if not train:
            return [], held_out
        rows = near + pairs(sampled, cfg.seed)
        random.Random(cfg.seed).shuffle(rows)  # each step mixes both kinds
        return rows, held_out
    rows = load_rows(cfg.task)
    missing = {"prompt", "chosen", "rejected"} - set(rows[0])
    if missing:
        raise UserError(f"preference file {cfg.task!r} lacks columns {sorted(missing)}; it needs "
                        "prompt, chosen and rejected")
    train, held_out = split_held_out(rows, random.Random(cfg.seed), cfg.eval_task)
    return train, held_out[:n_eval]


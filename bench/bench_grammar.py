"""What the reasoning's grammars cost on the decode thread: building each request's grammar, and
the `allowed()` call every decode step makes, for the grammars a request can be decoded under.

    python3 bench/bench_grammar.py --checkpoint CKPT [--data data/ml-100k/loo] [--users 200]

The service builds one grammar per reasoning request (`R2ec.title_lists`, model/constrained.py)
and the decoder calls its `allowed(ids)` once per generated token, on the thread that runs the
model, so its cost adds to every step. No model forward is needed to time that: for each of the
first `--users` test users this replays the tokens of the text the shipped model writes under
the grammars (the data-built rationale, model/rationale.py `rationale_parts`: every claim holds,
so it is what greedy decoding under them produces up to the model's choice among true options)
through a fresh grammar, one `allowed` call per token, as the decoder makes them. Grammars:
- `rated list`: "Rated highest:" over the window's highest-rated titles alone (no item facts);
- `all claims` (as served): + "Likes" over the genres that hold (at most `MAX_LIKED`), the decades
  after ", mostly", the drift after "Lately more";
- `all claims, no cap`: the same with every genre that holds offered (`MAX_LIKED` lifted).
Each is run on the users' rated histories and on the same histories without ratings (as a
request may come: every genre weighs the same, so many tie). Prints, per grammar, the mean build
time per request, the mean and 99th-percentile `allowed` time per token, the mean and the
largest per text, and the "Likes" grammar's phrase count (`phrases`: mean and largest).
Compare within one run only.
"""

from __future__ import annotations

import argparse
import statistics
import time

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument("--users", type=int, default=200, help="first N test users")
    args = parser.parse_args()

    import dataclasses

    from model.checkpoint import load_checkpoint
    from model.constrained import PhraseChoice, TitleLists
    from model.rationale import LIKES, MAX_LIKED, catalog_facts, history_facts, rationale_parts
    from model.samples import sample_histories

    ckpt = load_checkpoint(args.checkpoint)
    model, window = ckpt.model, ckpt.model.prompts.max_history
    dataset = load_prepared(args.data)
    facts = catalog_facts(dataset.items.to_dict("records"))
    rows = dataset.split("test").iloc[: args.users]
    rated = sample_histories(rows, dataset.item_titles())
    unrated = [[dataclasses.replace(e, rating=None) for e in h] for h in rated]
    model.token_strings()  # built once per process (~1 s), not per request
    print(f"{len(rated)} test users, a window of {window}, MAX_LIKED {MAX_LIKED}")
    print(
        "| grammar | history | build ms / request | allowed µs / token (mean, p99) | ms / text (mean, max) |",
        end="",
    )
    print(" phrases |")
    print("|---|---|---|---|---|---|")
    for name, with_facts, cap in (
        ("rated list", False, MAX_LIKED),
        ("all claims (served)", True, MAX_LIKED),
        ("all claims, no cap", True, 10**6),
    ):
        for label, histories in (("rated", rated), ("unrated", unrated)):
            window_facts = history_facts(histories, facts)
            build, steps, texts, phrases = [], [], [], []
            for h, f, r in zip(histories, window_facts, rows.itertuples(index=False), strict=True):
                ratings = r.history_ratings if label == "rated" else None
                text = rationale_parts(
                    r.history_item_ids, ratings, r.target_item_id, facts, max_history=window, hindsight=False
                )[0]
                ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
                t = time.perf_counter()
                (grammar,) = model.title_lists([h], facts=[f] if with_facts else None, max_liked=cap)
                build.append(time.perf_counter() - t)
                parts = grammar.lists if isinstance(grammar, TitleLists) else [grammar]
                phrases += [
                    len(g.phrases) for g in parts if isinstance(g, PhraseChoice) and g.trigger == LIKES
                ]
                per_text = 0.0
                for k in range(len(ids) + 1):  # the call before each token, and the one after the last
                    t = time.perf_counter()
                    grammar.allowed(ids[:k])
                    dt = time.perf_counter() - t
                    steps.append(dt)
                    per_text += dt
                texts.append(per_text)
            p99 = sorted(steps)[int(0.99 * (len(steps) - 1))]
            shown = f"{statistics.mean(phrases):.0f} (max {max(phrases)})" if phrases else "-"
            print(
                f"| {name} | {label} | {1e3 * statistics.mean(build):.2f} | "
                f"{1e6 * statistics.mean(steps):.0f}, {1e6 * p99:.0f} | "
                f"{1e3 * statistics.mean(texts):.1f}, {1e3 * max(texts):.1f} | {shown} |"
            )


if __name__ == "__main__":
    main()

"""Could the LM choose among the co-watch hints better than rec_head ranks them? A diagnostic
for issue 11's open question (texts that carry what one forward pass cannot compute).

    python3 bench/bench_hint_choice.py --checkpoint CKPT [--data data/ml-100k/loo] [--users 200]

For test users whose target is among the prompt's co-watch hints (model/cowatch.py), the hints
are ranked four ways and the target's place among them is scored (hit@1, MRR):
- `co-watch order`: the order the prompt lists them in (co-watch strength);
- `rec_head`: the cosine of h_T after [prompt; marker] (no reasoning) with each hint's item
  vector, what the service's no-reasoning mode ranks by;
- `LM sum` / `LM mean`: the language model's log-probability of the hint's title as the
  continuation of [prompt; assistant turn "I would watch next: "], summed or averaged over its
  tokens (the sum favours short titles, the mean long ones).
If the LM picks the target among the hints clearly better than rec_head ranks it, a reasoning
step that writes its pick would hand rec_head information the no-reasoning pass lacks; if not,
that design has nothing to build on with this backbone. Prints a markdown table.
"""

from __future__ import annotations

import argparse

from model.data import load_prepared  # before torch: model/__init__ sets OMP_WAIT_POLICY

PICK = "I would watch next: "


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", default="data/ml-100k/loo")
    parser.add_argument(
        "--users", type=int, default=200, help="first N test users (scored: those with the target hinted)"
    )
    args = parser.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    from model.checkpoint import load_checkpoint
    from model.generation import EngineBackend
    from model.rewards import target_rank
    from model.samples import sample_histories

    ckpt = load_checkpoint(args.checkpoint)
    model = ckpt.model
    if model.cowatch is None or not model.prompts.cowatch_hints:
        raise SystemExit("this checkpoint's prompts name no co-watch hints")
    ids = ckpt.items["item_id"].astype(str).tolist()
    row_of = {item: r for r, item in enumerate(ids)}
    titles = dict(zip(ids, ckpt.items["title"], strict=True))
    test = load_prepared(args.data).split("test").iloc[: args.users]
    histories = sample_histories(test, titles)
    engine = EngineBackend(model, slots=1, exact=True)
    tok = model.tokenizer
    ranks: dict[str, list[int]] = {"co-watch order": [], "rec_head": [], "LM sum": [], "LM mean": []}
    hinted = 0
    for history, target in tqdm(list(zip(histories, test["target_item_id"].astype(str), strict=True))):
        hints = model.cowatch.hints([e.item_id for e in history], model.prompts.cowatch_hints)
        if target not in hints:
            continue
        hinted += 1
        prompt = model.user_prompt_ids([history])[0]
        h_t = engine.vectors([prompt], [[]])[0].numpy()
        cos = ckpt.item_vectors[[row_of[h] for h in hints]] @ h_t
        # the LM: [prompt; PICK; title] for every hint in one padded batch
        head = prompt + tok(PICK, add_special_tokens=False)["input_ids"]
        title_ids = [tok(titles[h], add_special_tokens=False)["input_ids"] for h in hints]
        width = len(head) + max(map(len, title_ids))
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        batch = torch.full((len(hints), width), pad)
        mask = torch.zeros((len(hints), width), dtype=torch.long)
        for j, t in enumerate(title_ids):
            batch[j, : len(head) + len(t)] = torch.tensor(head + t)
            mask[j, : len(head) + len(t)] = 1
        with torch.inference_mode():
            logits = model.lm(input_ids=batch, attention_mask=mask).logits.float()
        logp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch[:, 1:, None])[..., 0]
        sums, means = [], []
        for j, t in enumerate(title_ids):
            lp = logp[j, len(head) - 1 : len(head) - 1 + len(t)]
            sums.append(float(lp.sum()))
            means.append(float(lp.mean()))
        at = hints.index(target)
        for name, score in (
            ("co-watch order", -np.arange(len(hints), dtype=float)),
            ("rec_head", cos),
            ("LM sum", np.array(sums)),
            ("LM mean", np.array(means)),
        ):
            ranks[name].append(int(target_rank(torch.as_tensor(score)[None], torch.tensor([at]))))

    k = model.prompts.cowatch_hints
    if not hinted:
        raise SystemExit(f"no target of the first {len(test)} test users is in the {k} hints; raise --users")
    print(f"\n{hinted} of {len(test)} test users have their target among the {k} hints\n")
    print("| hints ranked by | hit@1 among hints | MRR among hints | mean rank |\n|---|---|---|---|")
    print(f"| chance | {1 / k:.3f} | {sum(1 / r for r in range(1, k + 1)) / k:.3f} | {(k + 1) / 2:.1f} |")
    for name, rs in ranks.items():
        r = np.array(rs)
        print(f"| {name} | {np.mean(r == 1):.3f} | {np.mean(1 / r):.3f} | {r.mean():.2f} |")


if __name__ == "__main__":
    main()

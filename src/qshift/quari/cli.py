"""``qshift quari``: train QuARI and the TA baseline from a collection's stored embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qshift.clikit import (CaptionsPerItemOpt, EncoderOpt, FormatOpt, JsonOpt, LimitOpt, StoreOpt, _collection,
                           _handle_errors, _print_json, _store, out)

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="QuARI: query-adaptive low-rank transforms (train, TA baseline).")
DirectionOpt = typer.Option("t2i", help="t2i (caption → image) or t2t (caption → other captions' mean); "
                            "i2i for a world-ilias set (rendering → the instance's other renderings).")
ClausesOpt = typer.Option(False, help="t2i: every caption's clauses ('a red star left of a ring' → 'a red star', "
                          "'a ring') are queries for its image too — short partial queries like INQUIRE's "
                          "(reconstruction).")


def _pairs(collection: Path, encoder: str, direction: str, store: Optional[Path], fmt: str,
           limit: Optional[int], captions_per_item: int, progress: bool, negatives: bool = False,
           clauses: bool = False):
    """(encoder, (queries, targets, target_of), groups, a protocol set's negatives pool or None)."""
    from qshift.encoders import create_encoder
    from qshift.errors import InputError
    from qshift.quari.data import clause_collection, pairs_and_groups, protocol_negatives

    coll = _collection(collection, fmt, limit, captions_per_item, None, "train")
    if clauses:
        if "protocol" in coll.meta or direction != "t2i":
            raise InputError(f"{collection}: --clauses splits the captions of a caption collection for t2i "
                             f"training, not {'a protocol set' if 'protocol' in coll.meta else direction}")
        coll = clause_collection(coll)
    enc = create_encoder(encoder)
    *pairs, groups = pairs_and_groups(coll, enc, direction, _store(store), progress=progress)
    pool = (protocol_negatives(coll, enc, _store(store), progress=progress)
            if negatives and "protocol" in coll.meta else None)
    return enc, tuple(pairs), groups, pool


@app.command()
@_handle_errors
def train(collection: Path = typer.Argument(..., help="Training collection (file or folder)."),
          encoder: str = EncoderOpt,
          out_dir: Path = typer.Option(..., "--out", "-o", help="Run folder (model.safetensors, quari.json; resumes)."),
          direction: str = DirectionOpt,
          rank: int = typer.Option(64), hidden: int = typer.Option(256), layers: int = typer.Option(4),
          heads: int = typer.Option(4), steps: int = typer.Option(4),
          epochs: int = typer.Option(10), batch_size: int = typer.Option(320), lr: float = typer.Option(3e-4),
          one_step: bool = typer.Option(False, help="Ablation: no iterative generation."),
          semi_positives: bool = typer.Option(True, help="--no-semi-positives: ablation."),
          noise: bool = typer.Option(True, help="--no-noise: ablation."),
          column_loss: bool = typer.Option(True, help="--no-column-loss: the query-side softmax of Eq. 10 only "
                                           "(reconstruction: each row is scored through its own T)."),
          hard_negatives: int = typer.Option(0, help="Per target, its N nearest non-positives join the batch as "
                                             "negatives (reconstruction; a world-ilias set adds its near-duplicates)."),
          anchor: Optional[float] = typer.Option(0.8, help="T = I + a·UVᵀ (authors' code); 0 → T = UVᵀ (paper)."),
          query_residual: float = typer.Option(0.5, help="λ in q' = norm((1-λ)·MLP(control) + λ·q)."),
          unit_query_head: bool = typer.Option(False, help="Normalise MLP(control) before the λ-mix, so that λ "
                                               "bounds how far q' moves (reconstruction; World-ILIAS val's pick, "
                                               "with λ 0.9)."),
          identity_init: bool = typer.Option(False, help="Start at T = I and q' = q (U and q' decoders "
                                             "zero-initialised, U and V not normalised; reconstruction)."),
          tied_query: bool = typer.Option(False, help="q' mixes T q instead of q: the query goes through its own "
                                          "transform, as TA maps both sides (reconstruction)."),
          static_base: bool = typer.Option(False, help="U = U₀ + MLP_u, V = V₀ + MLP_v with learned "
                                           "query-independent U₀, V₀: the static part of T is its own parameter "
                                           "(reconstruction)."),
          static_rank: int = typer.Option(0, help="With --static-base: U₀, V₀ of this rank appended to U, V "
                                          "(T = I + a·(UᵀV + U₀ᵀV₀)) instead of added; 0 = added, rank r "
                                          "(reconstruction)."),
          static_lr_scale: float = typer.Option(1.0, help="With --static-base: U₀, V₀ learn at lr × this "
                                                "(reconstruction)."),
          static_init_epochs: int = typer.Option(0, help="With --static-rank: first fit U₀, V₀ alone as the "
                                                 "rank-r₀ TA map for this many epochs, then train everything "
                                                 "(reconstruction)."),
          warmup_steps: int = typer.Option(0, help="Linear warm-up steps before the cosine schedule."),
          ta: Optional[Path] = typer.Option(None, help="Train on features projected by this TA map (TA + QuARI)."),
          val_fraction: float = typer.Option(0.1, help="Share of targets held out (≤ 1,000) to pick the best epoch."),
          seed: int = typer.Option(0), clauses: bool = ClausesOpt,
          store: Optional[Path] = StoreOpt, fmt: str = FormatOpt, limit: Optional[int] = LimitOpt,
          captions_per_item: int = CaptionsPerItemOpt, as_json: bool = JsonOpt) -> None:
    """Train QuARI on (query, target) embedding pairs; re-running the same command resumes.

    Example: `qshift quari train runs/world/train.csv -e world:mini-clip -o runs/quari`
    """
    from qshift.quari import QuARIConfig, QuARITrainConfig, load_ta, train_quari

    enc, (q, t, tof), groups, pool = _pairs(collection, encoder, direction, store, fmt, limit, captions_per_item,
                                            not as_json, negatives=hard_negatives > 0, clauses=clauses)
    mcfg = QuARIConfig(dim=q.shape[1], rank=rank, hidden=hidden, layers=layers, heads=heads, steps=steps,
                       one_step=one_step, anchor=anchor or None, query_residual=query_residual,
                       unit_query_head=unit_query_head, identity_init=identity_init,
                       tied_query=tied_query, static_base=static_base,
                       static_rank=static_rank)
    tcfg = QuARITrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, noise=noise,
                            semi_positives=semi_positives, hard_negatives=hard_negatives, column_loss=column_loss,
                            warmup_steps=warmup_steps, static_lr_scale=static_lr_scale,
                            static_init_epochs=static_init_epochs, val_fraction=val_fraction, seed=seed)
    res = train_quari(q, t, tof, mcfg, tcfg, out_dir, backbone=enc.fingerprint(), progress=not as_json,
                      projection=None if ta is None else load_ta(ta), groups=groups, negatives=pool)
    if as_json:
        _print_json(res)
    else:
        out.print(f"QuARI ({len(q)} pairs, {res['train_seconds']:.0f}s): loss "
                  f"{res['log'][0]['loss']:.3f} → {res['log'][-1]['loss']:.3f}; → {out_dir}")
        if "val_r1" in res:
            out.print(f"held-out R@1 ({res['val_pairs']} pairs): QuARI {res['val_r1']:.1f} (epoch {res['best_epoch']}, "
                      f"kept) vs backbone {res['val_r1_zero_shot']:.1f}")


@app.command("ta")
@_handle_errors
def ta_(collection: Path = typer.Argument(..., help="Training collection (file or folder)."),
        encoder: str = EncoderOpt,
        out_path: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
        direction: str = DirectionOpt,
        epochs: int = typer.Option(10), batch_size: int = typer.Option(320), lr: float = typer.Option(1e-3),
        seed: int = typer.Option(0), clauses: bool = ClausesOpt,
        store: Optional[Path] = StoreOpt, fmt: str = FormatOpt, limit: Optional[int] = LimitOpt,
        captions_per_item: int = CaptionsPerItemOpt, as_json: bool = JsonOpt) -> None:
    """Train the static task-adaptation baseline (one linear map for queries and gallery).

    Example: `qshift quari ta runs/world/train.csv -e world:mini-clip -o runs/ta.safetensors`
    """
    from qshift.quari import save_ta, train_ta

    enc, (q, t, tof), groups, _ = _pairs(collection, encoder, direction, store, fmt, limit, captions_per_item,
                                         not as_json, clauses=clauses)
    p = train_ta(q, t, tof, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=not as_json,
                 groups=groups)
    save_ta(out_path, p, backbone=enc.fingerprint())
    if as_json:
        _print_json({"out": str(out_path), "pairs": len(q)})
    else:
        out.print(f"TA map ({len(q)} pairs) → {out_path}")

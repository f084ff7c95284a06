"""Train the periodic-variable classifier; writes ``survey_proc/models/classifier.pt`` + card.

    make run            # the training survey's pipeline output (default survey, seed 0)
    PYTHONPATH=. python training/train_classifier.py [--run DIR] [--n-train 30000] [--epochs 30]

Data: :mod:`training.classifier_data` (simulator variability models injected into real
constant-star light curves of a pipeline run, or into noise drawn from the error against
magnitude that run measures). Templates are split by object: 80 % train, 20 % validation;
the signals of the two sets come from different seeds. The same preprocessing, periodograms
and views as ``survey-proc run`` (:func:`survey_proc.lightcurves.classifier.search`).

Loss: cross-entropy over the 5 classes; AdamW, cosine learning rate, batch 256.

Threshold on ``p_periodic``: the validation curves are reweighted to a survey in which
:data:`PERIODIC_PRIOR` (3 %) of the classified objects are periodic (the default survey:
2.3 % of its stars are periodic variables); the threshold is the lowest one whose precision
is >= 0.985, which maximises recall. The card records it with the validation metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf

from survey_proc import model_registry
from survey_proc.cli import default_survey_prefix
from survey_proc.lightcurves import classifier as C
from survey_proc.lightcurves.periodogram import search_grid
from survey_proc.lightcurves.preprocess import PreprocessConfig, preprocess
from training.classifier_data import CLASS_MIX, RANGES, load_templates, synthesize

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(__file__).resolve().parent / "cache"
LOGS = Path(__file__).resolve().parent / "logs"
PERIODIC_PRIOR = 0.03
TARGET_PRECISION = 0.985


def featurize(arrays: dict[str, np.ndarray], mjd: np.ndarray, chunk: int = 2048) -> dict[str, np.ndarray]:
    """Preprocess, search and build the classifier inputs of synthetic curves (as a run does)."""
    grid = search_grid(mjd - mjd[0])
    out: dict[str, list] = {k: [] for k in ("g", "loc", "aux", "usable", "period_bls", "period_ls")}
    n = len(arrays["mag"])
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        b = preprocess(np.arange(i, min(i + chunk, n)), mjd, arrays["mag"][sl], arrays["mag_err"][sl],
                       arrays["flags"][sl], PreprocessConfig())
        bls, ls, (g, loc, aux) = C.search(b, grid)
        for k, v in (("g", g), ("loc", loc), ("aux", aux), ("usable", b.usable), ("period_bls", bls.period_days),
                     ("period_ls", ls.period_days)):
            out[k].append(v)
        print(f"  featurized {min(i + chunk, n)}/{n}", flush=True)
    return {k: np.concatenate(v) for k, v in out.items()}


def _dataset(name: str, tpl, n: int, seed: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"classifier-{name}-seed{seed}-{n}.npz"
    if path.exists():
        return dict(np.load(path, allow_pickle=True))
    arrays, meta = synthesize(tpl, n, seed, rows)
    feats = featurize(arrays, tpl.mjd)
    d = {**feats, "label": arrays["label"], "period_true": meta["period"].to_numpy(float),
         "snr_obs": meta["snr_obs"].to_numpy(float), "sim_class": meta["var_class"].to_numpy(str),
         "mag": meta["mag"].to_numpy(float)}
    np.savez(path, **d)
    return d


def choose_threshold(p_per: np.ndarray, is_per: np.ndarray, prior: float = PERIODIC_PRIOR,
                     target: float = TARGET_PRECISION) -> dict:
    """Lowest p_periodic threshold whose prior-reweighted precision reaches ``target``."""
    best = None
    for thr in np.linspace(0.05, 0.99, 95):
        tpr = float(np.mean(p_per[is_per] >= thr))
        fpr = float(np.mean(p_per[~is_per] >= thr))
        prec = prior * tpr / max(prior * tpr + (1 - prior) * fpr, 1e-12)
        if prec >= target:
            best = {"threshold": float(thr), "recall": tpr, "false_positive_rate": fpr, "precision_at_prior": prec}
            break
    return best or {"threshold": 0.99, "recall": float(np.mean(p_per[is_per] >= 0.99)),
                    "false_positive_rate": float(np.mean(p_per[~is_per] >= 0.99)), "precision_at_prior": None}


def fit(tr: list[torch.Tensor], va: list[torch.Tensor], *, epochs: int, batch: int, seed: int, log_path: Path,
        t_start: float | None = None) -> tuple[C.LocalGlobalCNN, float]:
    """Train a new classifier on ``tr`` (global, local, aux, label), keep the epoch with the lowest validation loss.

    AdamW (lr 1e-3, weight decay 1e-4) with a one-cycle schedule to 2e-3; one JSON line per epoch
    (train/val loss, val accuracy, and ``wall_s`` since ``t_start`` when given) goes to ``log_path``
    and stdout. Returns the best model in eval mode and its validation loss.
    """
    torch.manual_seed(seed)
    model = C.LocalGlobalCNN()
    model.aux_mean.copy_(tr[2].mean(0))
    model.aux_std.copy_(tr[2].std(0).clamp_min(1e-3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    n = len(tr[3])
    steps = epochs * ((n + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    log_path.parent.mkdir(exist_ok=True)
    best: tuple[float, dict | None] = (np.inf, None)
    with open(log_path, "w") as log:
        for epoch in range(epochs):
            model.train()
            perm_t = torch.randperm(n)
            tot = 0.0
            for i in range(0, n, batch):
                idx = perm_t[i:i + batch]
                loss = nnf.cross_entropy(model(tr[0][idx], tr[1][idx], tr[2][idx]), tr[3][idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                tot += float(loss) * len(idx)
            model.eval()
            with torch.no_grad():
                logits = model(va[0], va[1], va[2])
                vloss = float(nnf.cross_entropy(logits, va[3]))
                acc = float((logits.argmax(1) == va[3]).float().mean())
            rec: dict = {"epoch": epoch, "train_loss": tot / n, "val_loss": vloss, "val_acc": acc}
            if t_start is not None:
                rec["wall_s"] = round(time.time() - t_start, 1)
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            if vloss < best[0]:
                best = (vloss, {k: v.clone() for k, v in model.state_dict().items()})
    assert best[1] is not None
    model.load_state_dict(best[1])
    model.eval()
    return model, best[0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default=str(ROOT / "survey-proc-out" / f"{default_survey_prefix()}1000ep"))
    ap.add_argument("--store", default=None, help="the run's simulated store (default: from run.json)")
    ap.add_argument("--n-train", type=int, default=30000)
    ap.add_argument("--n-val", type=int, default=6000)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--out", default=str(C.DEFAULT_WEIGHTS))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    run_json = json.loads((Path(args.run) / "run.json").read_text())
    store = args.store or run_json["config"]["store"]
    tpl = load_templates(args.run, store)
    rng = np.random.default_rng(args.seed)
    perm = rng.permutation(len(tpl.object_id))
    n_tr = int(0.8 * len(perm))
    print(f"{len(perm)} constant-star templates from {args.run}", flush=True)
    train = _dataset("train", tpl, args.n_train, args.seed, perm[:n_tr])
    val = _dataset("val", tpl, args.n_val, args.seed + 500, perm[n_tr:])
    t_data = time.time() - t_start

    def tensors(d: dict, sel: np.ndarray) -> list[torch.Tensor]:
        return [torch.as_tensor(d[k][sel]) for k in ("g", "loc", "aux")] + [torch.as_tensor(d["label"][sel])]

    tr = tensors(train, train["usable"])
    va = tensors(val, val["usable"])
    model, best_val_loss = fit(tr, va, epochs=args.epochs, batch=256, seed=args.seed,
                               log_path=LOGS / "classifier.jsonl")
    with torch.no_grad():
        prob = torch.softmax(model(va[0], va[1], va[2]), 1).numpy()
    y = va[3].numpy()
    per_idx = [C.CLASSES.index(c) for c in C.PERIODIC]
    p_per = prob[:, per_idx].sum(1)
    is_per = np.isin(y, per_idx)
    thr = choose_threshold(p_per, is_per)
    _, names, _ = C.decide(prob, thr["threshold"])
    true_names = np.array(C.CLASSES, dtype=object)[y]
    from survey_proc.evaluate import classification_metrics

    cm = classification_metrics(true_names, names, list(C.CLASSES))
    # candidate periods of the true periodic curves (before refinement)
    vu = {k: val[k][val["usable"]] for k in ("period_bls", "period_ls", "period_true", "sim_class")}
    cand = np.where(vu["sim_class"] == "pulsator", vu["period_ls"], vu["period_bls"])
    rel = np.abs(cand / vu["period_true"] - 1)
    per_ok = {c: float(np.mean(rel[(vu["sim_class"] == c) & is_per] <= 0.01)) for c in C.PERIODIC}
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    card = {
        "model": "periodic-variable classifier (Astronet-style local/global CNN)",
        "date": dt.date.today().isoformat(), "git_revision": git,
        "classes": list(C.CLASSES), "threshold": thr["threshold"],
        "threshold_rule": f"lowest p_periodic threshold with precision >= {TARGET_PRECISION} on the validation set "
                          f"reweighted to {PERIODIC_PRIOR:.0%} periodic objects",
        "data": {"generator": "training/classifier_data.py", "templates_run": str(args.run), "store": str(store),
                 "n_templates": len(perm), "n_train": len(tr[3]), "n_val": len(y), "class_mix": CLASS_MIX,
                 "ranges": {k: list(v) for k, v in RANGES.items()}, "seed_train": args.seed,
                 "seed_val": args.seed + 500},
        "training": {"epochs": args.epochs, "batch": 256, "optimizer": "AdamW + one-cycle, max lr 2e-3",
                     "wall_s": round(time.time() - t_start, 1), "data_s": round(t_data, 1),
                     "best_val_loss": best_val_loss},
        "validation": {"threshold": thr, "per_class": cm["per_class"], "confusion": cm["confusion"],
                       "candidate_period_within_1pct": per_ok},
    }
    model_registry.save("classifier", model, args.out, card=card, threshold=thr["threshold"])
    print(json.dumps(card["validation"], indent=1))


if __name__ == "__main__":
    main()

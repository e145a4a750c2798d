"""The Fisher study (Soen & Sun 2024, §5): train an MLP, analyse held-out inputs after every epoch."""

from __future__ import annotations

import pathlib
import time
from typing import NamedTuple

import numpy as np

import fishercore as fc
from fishercore.backends import mlp

from . import data as D
from .results import CONFIDENCE, REL_ERROR, ResultsWriter, group_records, log_epoch
from .train import init_layers, make_trainer

GROUP_FIELDS = ["fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper", "std_i1",
                "std_i2", "log_upper_over_v1", "log_upper_over_v2", "i2_better", "i1_better", "ties", "n_i1", "n_i2",
                "n_optimal", "bounds_hold"]


class FisherStudy(NamedTuple):
    task: str = "classification"
    data: str | None = None
    label_column: str = "label"
    activation: str = "sigmoid"
    hidden: tuple = (128, 128, 128)
    epochs: int = 20
    backend: str = "numpy"
    seed: int = 0
    batch_size: int = 32  # training minibatch
    max_analyze: int = 400  # held-out inputs analysed per epoch (all when fewer)


def run_fisher_study(cfg: FisherStudy, out: pathlib.Path, *, progress: bool = True) -> dict:
    """Train, analyse after every epoch (epoch 0 = initialisation), write results as they come."""
    ds = D.load(cfg.task, cfg.data, label_column=cfg.label_column, seed=cfg.seed)
    family = fc.Categorical() if cfg.task == "classification" else fc.Gaussian(variance=1.0)
    widths = [ds.X_train.shape[1], *cfg.hidden, ds.n_outputs]
    layers = init_layers(widths, cfg.seed)
    trainer = make_trainer(cfg.backend, layers, cfg.activation, family)
    names = [g.name for g in mlp.MLP(layers, cfg.activation).groups]  # torch.nn.Sequential's, on every backend
    X_test = ds.X_test[:cfg.max_analyze]
    Xa, Xt, yt = trainer.as_array(X_test), trainer.as_array(ds.X_test), trainer.as_array(ds.y_test)
    header = {"study": "fisher", "config": {**cfg._asdict(), "hidden": list(cfg.hidden), "dataset": ds.name,
                                             "family": repr(family), "widths": widths,
                                             "n_train": int(ds.X_train.shape[0]), "n_analyzed": int(X_test.shape[0]),
                                             "rel_error": REL_ERROR, "confidence": CONFIDENCE}}
    writer = ResultsWriter(out, header, ["epoch", "group", "size"] + GROUP_FIELDS)
    rng = np.random.default_rng(cfg.seed + 1)
    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.epochs + 1), desc="fishercore report", unit="epoch", disable=progress is not True)
    for epoch in bar:
        t0 = time.perf_counter()
        if epoch > 0:
            perm = rng.permutation(ds.X_train.shape[0])
            for start in range(0, perm.size, cfg.batch_size):
                idx = perm[start:start + cfg.batch_size]
                trainer.step(trainer.as_array(ds.X_train[idx]), trainer.as_array(ds.y_train[idx]))
        res = fc.analyze(trainer.model(), Xa, family, batch_size=128)
        groups = group_records(res, names)
        record = {"epoch": epoch, "test_loss": trainer.loss(Xt, yt),
                  "train_loss": trainer.loss(trainer.as_array(ds.X_train), trainer.as_array(ds.y_train)),
                  "seconds": None, "groups": groups}
        if cfg.task == "classification":
            record["test_accuracy"] = float(np.mean(np.argmax(trainer.outputs(Xt), axis=1) == ds.y_test))
        record["seconds"] = time.perf_counter() - t0
        writer.add(record, [{"epoch": epoch, "group": g, **r} for g, r in groups.items()])
        log_epoch(progress, epoch, cfg.epochs, record)
        bar.set_postfix(test_loss=f"{record['test_loss']:.3f}")
    bar.close()
    return writer.data

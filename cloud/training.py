"""Training on the cloud store: the shell that wires config, custodian and trainer.

``medchain cloud train`` runs :func:`train_from_store`: signed as the training principal, it
asks the custodian process (:mod:`cloud.custodian_service`, the only holder of the custodian
key) for the candidate images; the custodian files an access request per image on the ledger
(the contract decides by policy and consent, and audits) and decrypts only the granted ones;
this process never holds the key. :mod:`cloud.trainset`
turns them into a patient-split ``store`` source, and :func:`models.pipeline.train_run`
leaves the usual run folder, its model card chain starting from raw modality values. The
run folder also gets ``access_report.json``: how many images were granted, denied (by the
contract's reason) or unreadable.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from medchain.identity import SigningKey

from cloud.catalog import Catalog
from cloud.config import CloudConfig, ConfigError
from cloud.custodian_service import RemoteCustodian
from cloud.trainset import StoreTrainset, candidates, collect

__all__ = ["TRAINING_PRINCIPAL", "gather", "train_from_store"]

TRAINING_PRINCIPAL = "training"


def gather(config: CloudConfig, modality: str, *, seed: int = 0, max_images: int | None = None,
           user: str = TRAINING_PRINCIPAL) -> StoreTrainset:
    """The granted, labelled images of ``modality`` as a store source (ledger-audited)."""
    if config.training_key is None:
        raise ConfigError("[ledger] training_key is not set: training on the store needs the "
                          "training principal's key")
    catalog = Catalog(config.database_url)
    try:
        entries = candidates(catalog, modality)
    finally:
        catalog.close()
    if config.custodian_socket is None:
        raise ConfigError("[custodian] socket is not set: training reads images through the custodian "
                          "process (`medchain cloud custodian`)")
    custodian = RemoteCustodian(config.custodian_socket, SigningKey.load(config.training_key), principal=user)
    return collect(custodian, entries, modality.upper(), seed=seed, max_images=max_images)


def train_from_store(config: CloudConfig, modality: str, out: str | Path, recipe=None, *,
                     max_images: int | None = None, device: str = "auto", progress: bool = False,
                     say: Callable[[str], None] = print) -> dict:
    """Gather, train, and write the run folder; returns the metrics summary."""
    from models.pipeline import check_out, train_run  # torch: only when training
    from models.training import Recipe

    recipe = recipe or Recipe()
    out = Path(out)
    check_out(out, resume=False)  # before asking the ledger: every request is audited
    trainset = gather(config, modality, seed=recipe.seed, max_images=max_images)
    report, source = trainset.report, trainset.source
    say(f"access for training: {report.summary()}")
    if trainset.skipped:
        say("skipped: " + ", ".join(f"{n} {why}" for why, n in trainset.skipped.items()))
    say(f"training on {sum(len(s) for s in source.splits.values())} {modality.upper()} image(s) of "
        f"{len({p for s in source.splits.values() for p in s.patients or ()})} patient(s): "
        + ", ".join(f"{name} {len(split)}" for name, split in source.splits.items())
        + f"; classes {', '.join(source.class_names)}")
    summary = train_run(source, out, recipe, device=device, progress=progress, prefix=trainset.prefix)
    (out / "access_report.json").write_text(json.dumps({
        **report.to_dict(), "skipped": dict(trainset.skipped), "user": TRAINING_PRINCIPAL,
        "purpose": "training", "denied_images": [list(d) for d in report.denied_ids]},
        indent=1, sort_keys=True) + "\n")
    return summary

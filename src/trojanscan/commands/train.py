"""``trojanscan train``: make a clean or backdoored model and save it with ground truth."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..dataset import ImageDataset
from ..exceptions import bad_param
from ..io.outputs import Input, Output, check_outputs
from ..training import TrainConfig
from ..utils import seed_everything

#: built-in training sets and their held-out test splits
TEST_SPLITS = {
    "fashion-mnist:train": "fashion-mnist:test",
    "digits:train": "digits:test",
    "synthetic-rgb:train": "synthetic-rgb:test",
}


def split_holdout(ds: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset,
                                                                          ImageDataset]:
    """Seeded random split into (train, held-out)."""
    gen = torch.Generator().manual_seed(seed + 7919)
    perm = torch.randperm(len(ds), generator=gen)
    n_test = max(1, round(fraction * len(ds)))
    return ds.subset(perm[n_test:].sort().values), ds.subset(perm[:n_test].sort().values)


def model_outputs(out: Path) -> list[Output]:
    """What ``--out`` makes: the TorchScript file and the weights and sidecar beside it."""
    if out.suffix.lower() in (".json", ".safetensors"):
        raise bad_param("out", "a file name with an extension other than .json/.safetensors "
                        "(those are written beside it)", str(out))
    return [Output("--out", out), Output("--out", out.with_suffix(".safetensors")),
            Output("--out", out.with_suffix(".json"))]


def run(*, dataset: str, out: Path, attack: str, poison_rate: float, arch: str,
        test_data: str | None, epochs: int | None, batch_size: int, lr: float,
        save_data: Path | None, seed: int, device: str, quiet: bool, json_out: bool) -> int:
    from ..attacks import parse_attack
    from ..io.data import load_dataset
    from ..zoo import default_epochs, make_model, save_model, save_poisoned_data

    seed_everything(seed)
    out = Path(out)
    check_outputs(model_outputs(out) + ([] if save_data is None
                                        else [Output("--save-data", Path(save_data))]),
                  [Input("--dataset", dataset), Input("--test-data", test_data)])
    if epochs is not None and epochs < 1:
        raise bad_param("epochs", "an integer >= 1", epochs)
    atk = parse_attack(attack)
    train = load_dataset(dataset)
    train.require_classes(2)
    if test_data is None and dataset in TEST_SPLITS:
        test_data = TEST_SPLITS[dataset]
    if test_data is not None:
        test = load_dataset(test_data)
        if test.input_shape != train.input_shape:
            raise bad_param("test_data", "data of the training set's shape "
                            + "×".join(map(str, train.input_shape)),
                            "×".join(map(str, test.input_shape)))
    else:
        train, test = split_holdout(train, 0.1, seed)
    cfg = TrainConfig(epochs=epochs or default_epochs(len(train)), batch_size=batch_size, lr=lr)
    trained = make_model(train, test, attack=atk, poison_rate=poison_rate, arch=arch,
                         seed=seed, config=cfg, device=device)
    paths = save_model(trained, out)
    if save_data is not None:
        save_poisoned_data(trained, train, save_data)
    meta = trained.sidecar()
    if json_out:
        print(json.dumps({k: v for k, v in meta.items() if k != "poison_indices"}, indent=2))
    elif not quiet:
        asr = "n/a" if trained.asr is None else f"{trained.asr:.4f}"
        print(f"trained {arch} on {dataset} ({len(train)} samples, attack: {attack}, "
              f"seed {seed}) in {trained.seconds:.1f} s")
        print(f"clean accuracy {trained.clean_accuracy:.4f}  attack success rate {asr}")
        print(f"wrote {paths['torchscript']}, {paths['safetensors']}, {paths['sidecar']}"
              + (f", {save_data}" if save_data else ""))
    return 0

"""Does training lenet longer make the MNTD benchmark's backdoors take?

Of 108 backdoored models of the MNTD reference sets, 24 did not take (ASR < 0.5), 20 of
them lenet (clean accuracy 0.75 under the target recipe: 5,000 images, batch 128). This
trains one SIG and one WaNet lenet on the same data for 12 (the recipe), 24 and 40 epochs
and prints clean accuracy and attack success rate (benchmarks/notes/mntd_development.md).

    python benchmarks/mntd_research/bench_lenet_recipe.py [--results OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_mntd

#: (attack spec, poison rate, training seed): as bench_mntd's SIG and WaNet targets
CASES = (("sig:target=3", 0.08, 1019), ("wanet:target=5,trigger_seed=7", 0.2, 1013))
EPOCHS = (12, 24, 40)


def main(argv: list[str] | None = None) -> None:
    from trojanscan.attacks import attack_success_rate, parse_attack
    from trojanscan.training import TrainConfig, evaluate, train_model
    from trojanscan.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(Path(__file__).resolve().parent.parent
                                             / "results" / "lenet_recipe.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = bench_mntd._data()
    rows = []
    print("| epochs | attack | clean accuracy | ASR |\n|---|---|---|---|")
    for epochs in EPOCHS:
        for spec, rate, seed in CASES:
            g = torch.Generator().manual_seed(seed)
            pool = d["pool"]
            idx = pool[torch.randperm(len(pool), generator=g)[:bench_mntd.TARGET_SAMPLES]]
            attack = parse_attack(spec)
            data = attack.poison(d["train"].subset(idx.sort().values), rate, seed=seed).dataset
            model = train_model("lenet", data, seed=seed, device="cpu", num_classes=10,
                                config=TrainConfig(epochs=epochs,
                                                   batch_size=bench_mntd.TARGET_BATCH_SIZE))
            acc = float(evaluate(model, d["test"]))
            asr = float(attack_success_rate(model, attack, d["test"]))
            rows.append({"epochs": epochs, "attack": spec, "rate": rate, "seed": seed,
                         "clean_accuracy": round(acc, 4), "asr": round(asr, 4)})
            print(f"| {epochs} | {spec} | {acc:.3f} | {asr:.3f} |", flush=True)
    atomic_write_text(Path(args.results), json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {args.results}", file=sys.stderr)


if __name__ == "__main__":
    main()

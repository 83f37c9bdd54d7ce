"""``trojanscan mntd ...``: train MNTD meta-classifiers for your own model shapes, and cut a
bundle down to what its recipe reads (``slim``).

Only Typer and pathlib are imported at module level (the CLI starts fast); the work is
in :mod:`trojanscan.mntd.pipeline`, imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Meta Neural Trojan Detection (Xu et al., IEEE S&P 2021): train meta-classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def train(
    data: Annotated[str, typer.Option(
        "--data", help="The defender's clean data (.npz, image folder, IDX folder or a "
                       "built-in such as fashion-mnist:train).")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Work folder: shadow models go to OUT/shadows (reruns resume), "
                            "the meta-classifier to OUT/NAME.safetensors + .json.")],
    share: Annotated[float, typer.Option(
        "--share", help="Share of DATA the shadows train on (the paper: 0.02).")] = 0.02,
    max_samples: Annotated[int | None, typer.Option(
        "--max-samples", help="Cap on the shadows' training samples.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", help="Name of the meta-classifier (default: mntd_CxHxW_K).")] = None,
    num_shadows: Annotated[int, typer.Option(
        "--num-shadows", help="Shadow models per kind (benign, jumbo).")] = 256,
    num_val: Annotated[int, typer.Option(
        "--num-val", help="Of those, held out per kind for epoch selection and "
                          "calibration.")] = 32,
    archs: Annotated[str, typer.Option(
        "--archs", help="Shadow architectures, comma-separated (small_cnn, bn_cnn, lenet, "
                        "mlp, cifar_cnn, preact_resnet18[_narrow], vgg_small); use the "
                        "families of the models you will scan.")
                     ] = "small_cnn,lenet,mlp",
    shadow_epochs: Annotated[int, typer.Option("--shadow-epochs")] = 20,
    meta_epochs: Annotated[int, typer.Option("--meta-epochs")] = 40,
    queries: Annotated[int, typer.Option("--queries", help="Number of tuned queries.")] = 10,
    response: Annotated[str, typer.Option(
        "--response", help="What the meta-classifier reads: logits (the paper's), softmax, "
                           "zscore, scaled or sorted.")] = "logits",
    poisoning: Annotated[str, typer.Option(
        "--poisoning", help="Jumbo shadows' poison: append (the paper's) or replace.")
                         ] = "append",
    jumbo_family: Annotated[str, typer.Option(
        "--jumbo-family", help="Jumbo shadows' triggers: paper (all-to-one) or wide (a "
                               "third of them source-specific, beyond the paper).")
                            ] = "paper",
    variants: Annotated[str, typer.Option(
        "--variants", help="Comma-separated: qt (query tuning), no_qt, one_class.")
                        ] = "qt,no_qt,one_class",
    data_members: Annotated[int, typer.Option(
        "--data-members", help="Also train the qt_data ensemble (beyond the paper): this "
                               "many query-tuned meta-classifiers whose queries start from "
                               "your images; the bundle's recipe adds them to its sum. "
                               "0: none.")] = 0,
    data_query_eps: Annotated[float, typer.Option(
        "--data-query-eps", help="How far (L∞, pixels in [0, 1]) those queries may move "
                                 "from their starting images.")] = 0.1,
    query_holdout: Annotated[float, typer.Option(
        "--query-holdout", help="Share of your images (per class, at most 0.5) kept out of "
                                "shadow training for those queries to start from: shadows "
                                "memorise their own training images, models under test "
                                "have not seen them. 0: start from the shadows' images.")
                     ] = 0.0,
    stamp_members: Annotated[int, typer.Option(
        "--stamp-members", help="Also train the stamp ensemble (beyond the paper): this "
                                "many meta-classifiers that learn stamps, apply them to "
                                "your images and read the change of the model's class "
                                "probabilities; the bundle's recipe adds them to its "
                                "sum. 0: none.")] = 3,
    stamp_family: Annotated[str, typer.Option(
        "--stamp-family", help="Jumbo triggers the stamp members learn from: paper or wide "
                               "(extra jumbo shadows, a third of them source-specific, "
                               "in shadows/jumbo-wide/).")] = "wide",
    search_probe: Annotated[bool, typer.Option(
        "--search-probe/--no-search-probe",
        help="Also add the trigger-search probe (beyond the paper): per class, the cheapest "
             "mask and pattern that move your images out of it, found on the model under "
             "test and read against clean reference models (or the benign shadows), "
             "both for its cost and for where each class went (search_flow).")] = True,
    reference_models: Annotated[int, typer.Option(
        "--reference-models", help="Clean reference models, trained on DATA outside the "
                                   "shadows' share with varied recipes (in OUT/references, "
                                   "reruns resume), whose outputs set the verdict's "
                                   "threshold and p-values. Real clean models out-score "
                                   "held-out shadows, so without them the verdict flags "
                                   "many clean models. 0: calibrate on the shadows.")] = 32,
    seed: Annotated[int, typer.Option("--seed", help="Random seed, 0 to 4294967295.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")
                      ] = "auto",
    ray_address: Annotated[str | None, typer.Option(
        "--ray-address", help="Run shadow training on this Ray cluster ('auto' or "
                              "ADDRESS). Default: a local Ray started in-process when Ray "
                              "is installed, else sequential.")] = None,
    no_ray: Annotated[bool, typer.Option(
        "--no-ray", help="Train the shadows one after the other in this process.")] = False,
    workers: Annotated[int | None, typer.Option(
        "--workers", help="Parallel shadow-training tasks (local Ray CPUs); default: all "
                          "cores.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q")] = False,
) -> None:
    """Train shadow models and MNTD meta-classifiers on your clean data."""
    from ..exceptions import ParameterError
    from ..io.data import load_dataset
    from ..mntd.pipeline import (
        TrainSettings,
        check_member_data,
        defender_share,
        fit_bundle,
        share_indices,
        train_shadow_set,
    )
    from ..mntd.pretrained import save_bundle
    from ..mntd.reference import calibrate, outside_share
    from ..mntd.shadows import ShadowData
    from ..progress import set_quiet
    from ..utils import pick_device
    from ._options import check_options

    device = check_options({
        "share": share, "max_samples": max_samples, "num_shadows": num_shadows,
        "num_val": num_val, "shadow_epochs": shadow_epochs, "meta_epochs": meta_epochs,
        "queries": queries, "data_members": data_members, "data_query_eps": data_query_eps,
        "query_holdout": query_holdout, "stamp_members": stamp_members,
        "reference_models": reference_models, "seed": seed, "device": device,
        "workers": workers})["device"]
    if quiet:
        set_quiet(True)
    if no_ray and ray_address is not None:
        raise ParameterError("invalid --no-ray: expected it without --ray-address, got both")
    backend = "sequential" if no_ray else ("ray" if ray_address is not None else "auto")
    settings = TrainSettings(
        num_shadows=num_shadows, num_val=num_val,
        archs=tuple(a.strip() for a in archs.split(",") if a.strip()),
        shadow_epochs=shadow_epochs, meta_epochs=meta_epochs, num_queries=queries,
        response=response, shadow_poisoning=poisoning, jumbo_family=jumbo_family,
        variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
        data_members=data_members, data_query_eps=data_query_eps,
        query_holdout=query_holdout, stamp_members=stamp_members, stamp_family=stamp_family,
        search_probe=search_probe)
    settings.validate()
    if reference_models < 0 or reference_models == 1:
        raise ParameterError(f"invalid --reference-models: expected 0 or an integer >= 2, "
                             f"got {reference_models}")
    if search_probe and reference_models == 2:  # refused before anything trains
        raise ParameterError("invalid --reference-models: expected 0 or at least 3 with the "
                             "search probe (it reads against them), got 2; or add "
                             "--no-search-probe")
    ds = load_dataset(data)
    ds.require_classes(2)
    shadow_data = defender_share(ds, share, seed=seed, max_samples=max_samples)
    check_member_data(settings, shadow_data)
    # the reference models' pool: everything outside the share (checked before training)
    pool = (outside_share(ds, share_indices(len(ds), share, seed=seed))
            if reference_models else None)
    dev = str(pick_device(device))
    c, h, w = ds.input_shape
    stem = name or f"mntd_{c}x{h}x{w}_{ds.num_classes}"
    run = train_shadow_set(ShadowData(shadow_data, ds.num_classes, None, dev),
                           out / "shadows", settings, seed=seed, backend=backend,
                           workers=workers, address=None if ray_address in (None, "") else
                           ray_address)
    if not quiet:
        typer.echo(f"shadows: {len(run.ran)} trained, {len(run.skipped)} reused "
                   f"({run.backend}, {run.seconds:.0f} s)", err=True)
    bundle = fit_bundle(out / "shadows", settings, name=stem, data=shadow_data, seed=seed,
                        device=dev, extra_info={"produced_by": {
                            "command": "trojanscan mntd train", "data": data, "share": share,
                            "shadow_backend": run.backend}})
    if pool is not None:
        bundle, ref_run = calibrate(bundle, pool, out / "references", num=reference_models,
                                    seed=seed, device=dev, backend=backend, workers=workers,
                                    address=None if ray_address in (None, "") else ray_address,
                                    data_info={"outside_share": share})
        if not quiet:
            typer.echo(f"reference models: {len(ref_run.ran)} trained, "
                       f"{len(ref_run.skipped)} reused ({ref_run.seconds:.0f} s)", err=True)
    _, sidecar = save_bundle(out / stem, bundle)
    if not quiet:
        for v, cal in bundle.calibration.items():
            typer.echo(f"{v}: AUROC on held-out shadows {cal['val_auroc']:.3f}", err=True)
    typer.echo(str(sidecar))


@app.command()
def slim(
    bundle: Annotated[str, typer.Argument(
        help="A meta-classifier bundle (.json or .safetensors) or a built-in name.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Stem of the slimmed bundle: OUT.safetensors + OUT.json "
                            "(must not be the input's).")],
) -> None:
    """Write a copy of BUNDLE with only what its recipe reads (the detector's default)."""
    from ..exceptions import ParameterError
    from ..mntd.pretrained import resolve, save_bundle
    from ..mntd.pretrained import slim as slim_bundle

    src = resolve(bundle)
    assert src is not None and src.path is not None
    stem = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    inputs = {src.path.resolve(), (src.path.parent / src.info["weights"]["file"]).resolve()}
    if {stem.with_suffix(".json").resolve(), stem.with_suffix(".safetensors").resolve()
        } & inputs:
        raise ParameterError(f"invalid --out: expected a stem other than the input "
                             f"bundle's, got {str(out)!r}")
    _, sidecar = save_bundle(stem, slim_bundle(src))
    typer.echo(str(sidecar))


@app.command("add-references")
def add_references(
    bundle: Annotated[str, typer.Argument(
        help="A meta-classifier bundle (.json or .safetensors) or a built-in name.")],
    models: Annotated[list[Path], typer.Argument(
        help="Clean models to add to its reference null (TorchScript, ONNX, or safetensors "
             "with --arch), e.g. clean models of the architecture you scan.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="Stem of the new bundle: OUT.safetensors + OUT.json (must not "
                            "be the input's).")],
    arch: Annotated[str | None, typer.Option(
        "--arch", help="Architecture of safetensors / state_dict models.")] = None,
    label: Annotated[str | None, typer.Option(
        "--label", help="What the models are, recorded in the bundle (default: their "
                        "file names).")] = None,
    seed: Annotated[int, typer.Option(
        "--seed", help="The trigger search's start (0: where scans start it).")] = 0,
) -> None:
    """Write a copy of BUNDLE whose reference null also holds MODELS (clean models), so
    that MNTD's threshold and p-values fit models trained like them. Runs on the CPU (a
    forward pass and a short search per model)."""
    import torch

    from ..api import load_model
    from ..detectors.mntd import MNTD
    from ..exceptions import ModelError, ParameterError
    from ..mntd.pretrained import check_fits, resolve, save_bundle
    from ..mntd.reference import add_references as add

    if not 0 <= seed < 2**32:
        raise ParameterError(f"invalid --seed: expected an integer in [0, 2**32), got {seed}")
    src = resolve(bundle)
    assert src is not None and src.path is not None
    stem = out.with_suffix("") if out.suffix in (".json", ".safetensors") else out
    inputs = {src.path.resolve(), (src.path.parent / src.info["weights"]["file"]).resolve(),
              *(p.resolve() for p in models)}
    if {stem.with_suffix(".json").resolve(), stem.with_suffix(".safetensors").resolve()
        } & inputs:
        raise ParameterError(f"invalid --out: expected a stem other than the input "
                             f"bundle's or a model's, got {str(out)!r}")
    loaded = [load_model(p, arch=arch, device="cpu") for p in models]
    for p, m in zip(models, loaded):
        try:
            k = MNTD._num_classes(m.module, src.input_shape, torch.device("cpu"))
        except ModelError:
            raise ModelError(f"{p}: the model does not take {src.name}'s inputs "
                             f"({'×'.join(map(str, src.input_shape))}); add clean models of "
                             f"the bundle's shape ({src.shape_text()})") from None
        check_fits(src, src.input_shape, k)
    source = {"label": label or ", ".join(p.name for p in models[:5])
              + (f" and {len(models) - 5} more" if len(models) > 5 else ""),
              "sha256": [m.sha256 for m in loaded]}
    new = add(src, [m.module for m in loaded], source=source, seed=seed)
    _, sidecar = save_bundle(stem, new)
    typer.echo(str(sidecar))

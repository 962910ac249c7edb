"""``ats-wsi``: the command line. Each subcommand parses its arguments and calls one
library function; readers, Dask and the application modules are imported inside
the commands (torch comes with the ``pipeline`` package itself).

Exit status: 0 success; 1 some slides failed in ``predict`` (all others were
processed and have their outputs); 2 usage or input errors (including a file
``info`` cannot read, after the others are shown), reported as
``ats-wsi: error: ...`` without a traceback. Only errors in the user's input count
as such (``errors.UserError`` and ``ConfigError``, missing files, unreadable slides,
an unreachable scheduler); anything else is a bug and keeps its traceback.

Option defaults are not restated here: an option left out is not passed on, so the
library's own defaults (the config dataclasses, ``run_demo``) apply, and the help
text reads them from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from pipeline.app import config
from pipeline.app.config import (
    BALANCE_MODES,
    ESTIMATORS,
    SELECT_METRICS,
    TASK_NAMES,
    DemoConfig,
    EvaluateConfig,
    InputConfig,
    ModelConfig,
    PredictConfig,
    ReportConfig,
    TrainConfig,
    package_version,
)
from pipeline.app.errors import UserError
from pipeline.app.files import printable

PROG = "ats-wsi"


def default_cache_dir() -> Path:
    """``$ATS_WSI_CACHE``, else ``$XDG_CACHE_HOME/ats-wsi/views`` (``~/.cache/...``)."""
    if os.environ.get("ATS_WSI_CACHE"):
        return Path(os.environ["ATS_WSI_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ats-wsi" / "views"


def _user_errors() -> tuple[type[BaseException], ...]:
    import readers

    return (
        UserError,
        FileNotFoundError,
        NotADirectoryError,
        ConnectionError,
        readers.SlideError,
    )


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options among ``names`` that the user gave (``None`` = left out)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _skips_only(line: str) -> None:
    """train's log under ``--quiet``: a slide left out of training is an error worth
    seeing (on stderr); epoch lines are not."""
    if line.startswith("skipping "):
        print(f"{PROG}: {printable(line)}", file=sys.stderr)


def _say(args: argparse.Namespace, line: str) -> None:
    """Print a command's summary ``line`` unless ``--quiet``."""
    if not args.quiet:
        print(line)


def _default(config: type, name: str) -> str:
    """``"(default X)"`` for field ``name`` of a config dataclass."""
    return f"(default {next(f.default for f in dataclasses.fields(config) if f.name == name)})"


def cmd_info(args: argparse.Namespace) -> int:
    from pipeline.app.slide.metadata import describe

    infos = describe(args.slides, _user_errors(), recursive=args.recursive)
    failed = [info for info in infos if "error" in info]
    for info in failed:
        print(f"{PROG}: error: {info['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(infos, indent=2))
    for info in [] if args.json else infos:
        if "error" in info:
            continue
        mpp = "unknown" if info["mpp"] is None else "{:.4g} x {:.4g}".format(*info["mpp"])
        print(f"{info['path']}  ({info['backend']}, mpp {mpp})")
        for level in info["levels"]:
            h, w, c = level["shape"]
            th, tw = level["tile_shape"]
            print(
                f"  level {level['index']}: {h} x {w} x {c}  "
                f"downsample {level['downsample']:.4g}  tiles {th} x {tw}"
            )
    return 2 if failed else 0


def cmd_synth(args: argparse.Namespace) -> int:
    from pipeline.app.synth import write_dataset

    labels = write_dataset(
        args.out_dir,
        n=args.n,
        size=args.size,
        seed=args.seed,
        progress=not args.quiet,
        workers=args.workers,
        task=args.task,
    )
    _say(args, f"wrote {args.n} slides and {labels}")
    return 0


MODEL_OPTIONS = (
    "task",
    "loss",
    "n_patches",
    "patch_size",
    "low_res_max_side",
    "low_res_level",
    "low_res_mpp",
    "patch_level",
    "patch_mpp",
    "entropy_strength",
    "estimator",
    "feature_net",
    "feature_weights",
    "feature_mean",
    "feature_std",
    "feature_input_size",
    "assume_mpp",
)
TRAIN_OPTIONS = (
    "epochs",
    "lr",
    "batch_size",
    "val_fraction",
    "seed",
    "select_metric",
    "patience",
    "balance",
    "exploration",
    "prior",
    "prior_weight",
    "remedy_epochs",
    "early_patches",
    "prior_init_steps",
    "queue_depth",
    "feature_lr",
    "color_jitter",
    "hed_jitter",
)
TRAIN_FLAGS = ("amp", "augment_flips")


def _model_config(args: argparse.Namespace):
    """ModelConfig from the options given; the others keep the dataclass defaults (a
    classification model's classes come from the labels when training starts)."""
    options = _given(args, MODEL_OPTIONS)
    if args.targets is not None:
        options["targets"] = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    if "patch_size" in options:
        options["patch_size"] = (options["patch_size"],) * 2
    if "feature_input_size" in options:
        options["feature_input_size"] = (options["feature_input_size"],) * 2
    if args.no_tissue_mask:
        options["tissue_mask"] = False
    if args.freeze_features:
        options["freeze_features"] = True
    return ModelConfig(slide_mpp=_slide_mpp(args), **options)


def _slide_mpp(args: argparse.Namespace) -> tuple[tuple[str, float], ...]:
    from pipeline.app.slide.resolution import read_slide_mpp

    return () if args.slide_mpp is None else read_slide_mpp(args.slide_mpp)


def _channels(text: str) -> tuple[float, float, float]:
    """``"0.485,0.456,0.406"`` -> three floats (argparse type of --feature-mean/std)."""
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected R,G,B (three numbers), got {text!r}")
    return values


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.app.training.crossval import CV_SUMMARY_FILE, cross_validate
    from pipeline.app.training.loop import train

    options = dict(
        model_config=_model_config(args),
        train_config=TrainConfig(
            **_given(args, TRAIN_OPTIONS), **{f: True for f in TRAIN_FLAGS if getattr(args, f)}
        ),
        device=args.device,
        resplit=args.resplit,
        cache_dir=None if args.no_view_cache else args.cache_dir or default_cache_dir(),
        progress=not args.quiet,
        log=_skips_only if args.quiet else None,
    )
    if args.folds is not None:
        cv = cross_validate(args.slides, args.labels, args.out, args.folds, **options)
        _say(
            args,
            f"{args.folds} fold models in {cv.run_dir}/fold_<k>; "
            f"summary in {cv.run_dir / CV_SUMMARY_FILE}",
        )
        return 0
    result = train(
        args.slides,
        args.labels,
        args.out,
        val_labels=args.val_labels,
        val_slides=args.val_slides,
        **options,
    )
    _say(
        args,
        f"model saved in {result.run_dir} (best epoch {result.best_epoch} of "
        f"{len(result.history)}; {len(result.skipped)} slides skipped)",
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pipeline.app.prediction.batch import prediction_task
    from pipeline.app.results.evaluation import evaluate

    task = prediction_task(args.predictions)
    options = _given(args, EVALUATE_OPTIONS)
    result = evaluate(args.predictions, args.labels, args.out, task=task, **options)
    m = result.metrics

    def show(name: str) -> str:
        value, ci = m[name]["value"], m[name]["ci95"]
        if value is None:
            return f"{name.replace('_', ' ')} undefined"
        interval = "" if ci is None else f" (95% CI {ci[0]:.3f}-{ci[1]:.3f})"
        return f"{name.replace('_', ' ')} {value:.3f}{interval}"

    counts = m["counts"]
    missed = ", ".join(f"{n} {why}" for why, n in counts["not_evaluated"].items())
    _say(
        args,
        f"{counts['evaluated']} of {counts['labelled_slides']} labelled slides evaluated"
        + (f" (not evaluated: {missed})" if missed else "")
        + f"; {counts['predictions_without_label']} predictions without a label",
    )
    _say(args, ", ".join(show(n) for n in m["summary"]))
    _say(args, f"written: {', '.join(str(f) for f in result.files)}")
    return 0


EVALUATE_OPTIONS = ("n_bootstrap", "seed")
REPORT_OPTIONS = ("heatmap_side", "heatmap_scale")


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.app.prediction.batch import prepare_batch
    from pipeline.app.prediction.cluster import connect, on_cluster

    report = ReportConfig(report=not args.no_report, **_given(args, REPORT_OPTIONS))
    # Every user error is raised by prepare_batch, before a cluster is started.
    with (
        prepare_batch(
            args.model,
            args.slides,
            args.out,
            PredictConfig(**_given(args, ["seed", "draws", "roi_dir"])),
            report,
            InputConfig(
                recursive=args.recursive,
                slides_csv=args.slides_csv,
                assume_mpp=args.assume_mpp,
                slide_mpp=_slide_mpp(args),
                slide_time_limit=args.slide_time_limit,
            ),
            overwrite=args.overwrite,
            device=args.device,
            feature_weights=args.feature_weights,
            trust_feature_net=args.trust_feature_net,
        ) as batch,
        connect(args.scheduler, args.workers) as client,
    ):
        runner = None if client is None else on_cluster(client, args.device)
        summary = batch.run(runner, progress=not args.quiet)
    for result in summary.failed:
        print(f"{PROG}: failed: {printable(result.error)}", file=sys.stderr)
    blank = sum(r.status == "no_tissue" for r in summary.results)
    ok = len(summary.results) - len(summary.failed) - blank
    if not args.quiet:
        print(
            f"{ok} slides predicted, {blank} without tissue, {len(summary.failed)} failed, "
            f"{len(summary.skipped)} already done; outputs in {summary.out_dir}"
        )
    return 1 if summary.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.app.results.report import write_report

    _say(args, f"wrote {write_report(args.out_dir)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.app.demo import run_demo

    run_demo(
        **_given(args, DEMO_OPTIONS),
        progress=not args.quiet,
        log=(lambda line: None) if args.quiet else print,
    )
    return 0


DEMO_OPTIONS = ("out_dir", "n_train", "n_test", "size", "epochs", "seed")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _seconds_or_none(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected seconds > 0 or 'none', got {text!r}")
    return value


# The parser: one ``_add_<command>`` per subcommand; the options several commands
# share are added by the ``_add_*`` helpers below, as a group where they form one.

QUIET_HELP = "no progress and no summary; errors only"


def _add_quiet(p: argparse.ArgumentParser, default: object = False) -> None:
    """``-q/--quiet``: global, and again on every command with ``default=SUPPRESS``,
    so that leaving it out after the command keeps the value given before it."""
    p.add_argument("-q", "--quiet", action="store_true", default=default, help=QUIET_HELP)


def _add_command(sub, name: str, run, help: str) -> argparse.ArgumentParser:
    """The subparser of command ``name``, handled by ``run``, with ``--quiet``."""
    p = sub.add_parser(name, help=help)
    _add_quiet(p, default=argparse.SUPPRESS)
    p.set_defaults(run=run)
    return p


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")


def _add_mpp_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("slides without mpp metadata (needed by --patch-mpp/--low-res-mpp)")
    g.add_argument("--slide-mpp", metavar="CSV", help="columns slide,mpp (overrides the files)")
    g.add_argument(
        "--assume-mpp",
        type=float,
        metavar="X",
        help="microns per level-0 pixel of slides that state none",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    M = ModelConfig
    g = p.add_argument_group("model (new runs only; a resumed run keeps its own)")
    g.add_argument(
        "--task",
        choices=TASK_NAMES,
        help="kind of target (docs/tasks.md): a class, several binary targets, a number, "
        f"a time to event {_default(M, 'task')}",
    )
    g.add_argument(
        "--targets",
        metavar="A,B,...",
        help="labels CSV columns of the target (default: label for classification, value "
        "for regression, time,event for survival; multilabel: required)",
    )
    g.add_argument("--loss", choices=("mse", "huber"), help="regression loss (default mse)")
    g.add_argument(
        "--n-patches", type=int, help=f"patches sampled per slide {_default(M, 'n_patches')}"
    )
    g.add_argument(
        "--patch-size",
        type=int,
        help=f"patch side in patch-level pixels {_default(M, 'patch_size')}",
    )
    g.add_argument(
        "--low-res-max-side",
        type=int,
        help=f"longer side of the attention view {_default(M, 'low_res_max_side')}",
    )
    g.add_argument("--low-res-level", type=int, help="pyramid level as the attention view")
    g.add_argument(
        "--low-res-mpp", type=float, help="microns per pixel of the attention view, exactly"
    )
    g.add_argument(
        "--patch-level", type=int, help=f"pyramid level of the patches {_default(M, 'patch_level')}"
    )
    g.add_argument(
        "--patch-mpp",
        type=float,
        help="microns per pixel of the patches, exactly (patches resampled)",
    )
    g.add_argument("--no-tissue-mask", action="store_true", help="sample outside tissue too")
    g.add_argument(
        "--entropy",
        type=float,
        dest="entropy_strength",
        help=f"entropy regularizer strength {_default(M, 'entropy_strength')}",
    )
    g.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        help="average of the draws: the mean, or later draws weighted more "
        f"(both unbiased; docs/cold_start.md) {_default(M, 'estimator')}",
    )
    g = p.add_argument_group("encoder (docs/encoders.md)")
    g.add_argument(
        "--feature-net",
        metavar="NAME",
        help=f"small, timm:<name> or module.path:factory {_default(M, 'feature_net')}",
    )
    g.add_argument(
        "--feature-weights",
        metavar="PATH",
        help="local encoder weights: .safetensors, or .bin/.pth (tensors only)",
    )
    g.add_argument(
        "--feature-mean",
        type=_channels,
        metavar="R,G,B",
        help="encoder input mean (default: the timm model's pretrained config)",
    )
    g.add_argument(
        "--feature-std",
        type=_channels,
        metavar="R,G,B",
        help="encoder input std (default: the timm model's pretrained config)",
    )
    g.add_argument(
        "--feature-input-size",
        type=int,
        metavar="N",
        help="side the encoder sees, patches resized to it (default: timm config)",
    )
    g.add_argument(
        "--freeze-features",
        action="store_true",
        help="train only the attention net and head (batch norm in eval mode)",
    )
    _add_mpp_options(p)


def _add_info(sub) -> None:
    p = _add_command(sub, "info", cmd_info, help="levels, sizes, mpp and backend of slides")
    p.add_argument("slides", nargs="+", metavar="SLIDE_OR_DIR")
    p.add_argument(
        "--json",
        action="store_true",
        help="print JSON: one object per slide, {path, error} for a failure",
    )
    p.add_argument("--recursive", action="store_true", help="list sub-directories too")


def _add_synth(sub) -> None:
    p = _add_command(sub, "synth", cmd_synth, help="write a labelled synthetic slide dataset")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--n", type=int, default=40, help="number of slides")
    p.add_argument("--size", type=int, default=2048, help="slide side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes writing slides")
    p.add_argument(
        "--task",
        choices=TASK_NAMES,
        default="classification",
        help="whose targets labels.csv holds (docs/tasks.md; default classification)",
    )


def _add_train(sub) -> None:
    p = _add_command(
        sub, "train", cmd_train, help="train a classifier (resumes an existing run directory)"
    )
    p.add_argument("--slides", required=True, metavar="DIR")
    p.add_argument("--labels", required=True, metavar="CSV", help="columns slide,label[,case]")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    _add_schedule_options(p)
    _add_cold_start_options(p)
    _add_validation_options(p)
    _add_view_cache_options(p)
    _add_device(p)
    _add_model_options(p)
    _add_training_extras(p)


def _add_schedule_options(p: argparse.ArgumentParser) -> None:
    """train: epochs, optimizer, split, seed and read-ahead."""
    T = TrainConfig
    p.add_argument("--epochs", type=int, help=_default(T, "epochs"))
    p.add_argument("--lr", type=float, help=f"learning rate {_default(T, 'lr')}")
    p.add_argument(
        "--batch-size", type=int, help=f"slides per optimizer step {_default(T, 'batch_size')}"
    )
    p.add_argument("--val-fraction", type=float, help=_default(T, "val_fraction"))
    p.add_argument("--seed", type=int, help=_default(T, "seed"))
    p.add_argument(
        "--queue-depth",
        type=int,
        help="batches in flight: 1 reads then computes, "
        f"more read ahead while the model computes {_default(T, 'queue_depth')}",
    )


def _add_cold_start_options(p: argparse.ArgumentParser) -> None:
    T = TrainConfig
    g = p.add_argument_group("cold start (unbiased, see docs/estimator.md; training only)")
    g.add_argument(
        "--exploration",
        type=float,
        help=f"weight of uniform sampling over tissue {_default(T, 'exploration')}",
    )
    g.add_argument(
        "--prior",
        choices=["none", "tissue", "hematoxylin"],
        help=f"content prior mixed into the sampling {_default(T, 'prior')}",
    )
    g.add_argument(
        "--prior-weight", type=float, help=f"weight of the prior, < 1 {_default(T, 'prior_weight')}"
    )
    g.add_argument(
        "--remedy-epochs",
        type=float,
        help="epochs over which both weights decay to 0 "
        f"{_default(T, 'remedy_epochs')}, 0: constant",
    )
    g.add_argument(
        "--early-patches",
        type=int,
        metavar="N",
        help="patches per slide during the remedy epochs "
        f"{_default(T, 'early_patches')}, 0: --n-patches",
    )
    g.add_argument(
        "--prior-init-steps",
        type=int,
        metavar="S",
        help="first fit the attention net to --prior for S steps "
        f"{_default(T, 'prior_init_steps')}",
    )


def _add_validation_options(p: argparse.ArgumentParser) -> None:
    """train: the best epoch, early stopping, class balance and the validation set."""
    T = TrainConfig
    p.add_argument(
        "--select",
        dest="select_metric",
        choices=SELECT_METRICS,
        help="validation metric that picks the best epoch (default: the task's first: "
        "roc_auc, mean_auc, r2, c_index)",
    )
    p.add_argument(
        "--patience",
        type=int,
        metavar="P",
        help=f"stop after P epochs without improvement, 0 never {_default(T, 'patience')}",
    )
    p.add_argument(
        "--balance",
        choices=BALANCE_MODES,
        help=f"imbalanced classes: weight the loss or sample evenly {_default(T, 'balance')}",
    )
    validation = p.add_mutually_exclusive_group()
    validation.add_argument(
        "--folds",
        type=int,
        metavar="K",
        help="stratified, case-grouped K-fold cross-validation into "
        "RUN_DIR/fold_<k>/ and RUN_DIR/cv_summary.csv",
    )
    validation.add_argument(
        "--val-labels", metavar="CSV", help="a fixed external validation set instead of a split"
    )
    p.add_argument(
        "--val-slides", metavar="DIR", help="directory of --val-labels' slides (default: --slides)"
    )
    p.add_argument(
        "--resplit",
        action="store_true",
        help="the labels changed under this run: split again, train from epoch 1",
    )


def _add_view_cache_options(p: argparse.ArgumentParser) -> None:
    cache = p.add_mutually_exclusive_group()
    cache.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="on-disk cache of the slides' "
        "attention views, so the next run skips reading them (default: "
        "$ATS_WSI_CACHE or ~/.cache/ats-wsi/views)",
    )
    cache.add_argument(
        "--no-view-cache", action="store_true", help="read every slide's view anew, cache nothing"
    )


def _add_training_extras(p: argparse.ArgumentParser) -> None:
    T = TrainConfig
    g = p.add_argument_group("fine-tuning and augmentation")
    g.add_argument(
        "--feature-lr", type=float, help="learning rate of a fine-tuned encoder (default: --lr)"
    )
    g.add_argument(
        "--amp",
        action="store_true",
        help="mixed precision on CUDA (a no-op with a message on the CPU)",
    )
    g.add_argument(
        "--augment-flips",
        action="store_true",
        help="random flips and 90-degree rotations of each training slide",
    )
    g.add_argument(
        "--color-jitter",
        type=float,
        metavar="S",
        help=f"brightness/contrast/saturation of patches {_default(T, 'color_jitter')}",
    )
    g.add_argument(
        "--hed-jitter",
        type=float,
        metavar="S",
        help=f"stain (HED) jitter of patches {_default(T, 'hed_jitter')}",
    )


def _add_evaluate(sub) -> None:
    p = _add_command(
        sub, "evaluate", cmd_evaluate, help="metrics of predictions against true labels, with CIs"
    )
    p.add_argument(
        "--predictions",
        required=True,
        metavar="CSV",
        help="predictions.csv of ats-wsi predict (or its output directory)",
    )
    p.add_argument("--labels", required=True, metavar="CSV", help="columns slide,label")
    p.add_argument(
        "--out", required=True, metavar="DIR", help="where metrics.json, metrics.md and roc.png go"
    )
    E = EvaluateConfig
    p.add_argument(
        "--bootstrap",
        type=int,
        dest="n_bootstrap",
        metavar="N",
        help=f"bootstrap resamples for the 95%% CIs {_default(E, 'n_bootstrap')}",
    )
    p.add_argument("--seed", type=int, help=f"of the bootstrap {_default(E, 'seed')}")


def _add_predict(sub) -> None:
    p = _add_command(
        sub, "predict", cmd_predict, help="classify slides into CSV, heatmaps and GeoJSON"
    )
    p.add_argument("--model", required=True, metavar="RUN_DIR")
    p.add_argument("--slides", nargs="+", default=[], metavar="DIR_OR_FILE")
    p.add_argument(
        "--slides-csv",
        metavar="CSV",
        help="a CSV naming the slides: column path, optional column slide (output name)",
    )
    p.add_argument("--recursive", action="store_true", help="list sub-directories of --slides")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="redo slides already done; replace outputs made by another model or seed",
    )
    _add_draw_options(p)
    _add_device(p)
    p.add_argument(
        "--feature-weights",
        metavar="PATH",
        help="where the run's frozen encoder weights file is now (checked by SHA-256)",
    )
    p.add_argument(
        "--trust-feature-net",
        metavar="MODULE:CALLABLE",
        help="build the run's encoder with this factory, which the model directory names: "
        "without it, a directory naming module:callable code is refused (docs/security.md)",
    )
    p.add_argument(
        "--slide-time-limit",
        type=_seconds_or_none,
        default=InputConfig.slide_time_limit,  # not _given: "none" (None) means no limit
        metavar="SECONDS",
        help="a slide whose reading takes longer, for its attention view or for its "
        "patches, becomes an error row; 'none' for no limit "
        f"{_default(InputConfig, 'slide_time_limit')}",
    )
    _add_mpp_options(p)
    _add_cluster_options(p)
    _add_report_options(p)


def _add_draw_options(p: argparse.ArgumentParser) -> None:
    """predict: how the patches of a slide are drawn."""
    p.add_argument("--seed", type=int, help=_default(PredictConfig, "seed"))
    p.add_argument(
        "--draws",
        type=_positive_int,
        metavar="K",
        help="independent draws of patches averaged per slide (their spread is "
        f"prob_<class>_sd) {_default(PredictConfig, 'draws')}",
    )
    p.add_argument(
        "--roi-dir",
        metavar="DIR",
        help="<slide>.geojson regions of interest "
        "(QuPath polygons, level-0 pixels) restricting where patches are sampled",
    )


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler")
    cluster.add_argument(
        "--workers", type=_positive_int, metavar="N", help="local Dask worker processes"
    )


def _add_report_options(p: argparse.ArgumentParser) -> None:
    R = ReportConfig
    p.add_argument(
        "--heatmap-size",
        type=int,
        dest="heatmap_side",
        metavar="PIXELS",
        help=f"longer side of the heatmap and thumbnail {_default(R, 'heatmap_side')}",
    )
    p.add_argument(
        "--heatmap-scale",
        choices=config.HEATMAP_SCALES,
        help=f"attention colour scale {_default(R, 'heatmap_scale')}",
    )
    p.add_argument("--no-report", action="store_true", help="do not write report.html")


def _add_report(sub) -> None:
    p = _add_command(
        sub, "report", cmd_report, help="rebuild report.html from a predict output directory"
    )
    p.add_argument("out_dir", metavar="OUT_DIR")


def _add_demo(sub) -> None:
    p = _add_command(
        sub, "demo", cmd_demo, help="synthetic data, train, predict and a baseline, in minutes"
    )
    d = DemoConfig
    p.add_argument("--out", dest="out_dir", metavar="DIR", help=_default(d, "out_dir"))
    p.add_argument("--n-train", type=int, help=f"training slides {_default(d, 'n_train')}")
    p.add_argument("--n-test", type=int, help=f"test slides {_default(d, 'n_test')}")
    p.add_argument("--size", type=int, help=f"slide side in pixels {_default(d, 'size')}")
    p.add_argument("--epochs", type=int, help=f"training epochs {_default(d, 'epochs')}")
    p.add_argument("--seed", type=int, help=f"dataset and training seed {_default(d, 'seed')}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Attention sampling for gigapixel whole-slide images."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_quiet(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_info(sub)
    _add_synth(sub)
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)
    _add_report(sub)
    _add_demo(sub)
    return parser


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""Write errors that are the disk's (or a file-size limit's), not a bug."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what schedulers and Kubernetes send), unwound like Ctrl-C so that
    every ``with`` block closes: ``predictions.csv`` is brought up to date."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. Exit status: 0 done, 1 some slides failed, 2 a user error
    (one line on stderr), 130 interrupted (SIGINT), 143 terminated (SIGTERM)."""
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return args.run(args)
    except Terminated:
        print(f"{PROG}: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, OSError) and e.errno in DISK_FULL:
            # Every file is written atomically: what was written before is whole.
            where = f" writing {printable(e.filename)}" if e.filename else ""
            print(f"{PROG}: error: {e.strerror}{where}", file=sys.stderr)
            return 2
        if isinstance(e, _user_errors()):
            print(f"{PROG}: error: {printable(e)}", file=sys.stderr)
            return 2
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())

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
import json
import sys
from collections.abc import Sequence

from pipeline.app.config import DemoConfig, ModelConfig, PredictConfig, TrainConfig, package_version
from pipeline.app.errors import UserError

PROG = "ats-wsi"


def _user_errors() -> tuple[type[BaseException], ...]:
    import readers

    return (
        UserError, FileNotFoundError, NotADirectoryError, ConnectionError, readers.SlideError,
    )  # fmt: skip


def _given(args: argparse.Namespace, names: Sequence[str]) -> dict:
    """The options among ``names`` that the user gave (``None`` = left out)."""
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _default(config: type, name: str) -> str:
    """``"(default X)"`` for field ``name`` of a config dataclass."""
    return f"(default {next(f.default for f in dataclasses.fields(config) if f.name == name)})"


def cmd_info(args: argparse.Namespace) -> int:
    from pipeline.app.metadata import describe

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
    from pipeline.app.demo_dataset import write_dataset

    labels = write_dataset(
        args.out_dir, n=args.n, size=args.size, seed=args.seed, progress=True, workers=args.workers
    )
    print(f"wrote {args.n} slides and {labels}")
    return 0


MODEL_OPTIONS = (
    "n_patches", "patch_size", "low_res_max_side", "low_res_level", "low_res_mpp",
    "patch_level", "patch_mpp", "entropy_strength",
)  # fmt: skip
TRAIN_OPTIONS = ("epochs", "lr", "batch_size", "val_fraction", "seed")


def _model_config(args: argparse.Namespace, class_names: tuple[str, ...]):
    """ModelConfig from the options given; the others keep the dataclass defaults."""
    options = _given(args, MODEL_OPTIONS)
    if "patch_size" in options:
        options["patch_size"] = (options["patch_size"],) * 2
    if args.no_tissue_mask:
        options["tissue_mask"] = False
    return ModelConfig(class_names=class_names, **options)


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.app.training import read_labels, train

    classes = tuple(sorted({label for _, label in read_labels(args.labels, args.slides)}))
    if len(classes) < 2:
        raise UserError(f"{args.labels}: need at least two classes, found {list(classes)}")
    result = train(
        args.slides,
        args.labels,
        args.out,
        model_config=_model_config(args, classes),
        train_config=TrainConfig(**_given(args, TRAIN_OPTIONS)),
        device=args.device,
    )
    print(f"model saved in {result.run_dir} ({len(result.skipped)} slides skipped)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.app.cluster import connect, on_cluster
    from pipeline.app.prediction import prepare_batch

    # Every user error is raised by prepare_batch, before a cluster is started.
    with prepare_batch(
        args.model, args.slides, args.out, overwrite=args.overwrite, device=args.device,
        recursive=args.recursive, slides_csv=args.slides_csv, **_given(args, ["seed"]),
    ) as batch, connect(args.scheduler, args.workers) as client:  # fmt: skip
        runner = None if client is None else on_cluster(client, args.device)
        summary = batch.run(runner, progress=not args.quiet)
    for result in summary.failed:
        print(f"{PROG}: failed: {result.error}", file=sys.stderr)
    ok = len(summary.results) - len(summary.failed)
    if not args.quiet:
        print(
            f"{ok} slides predicted, {len(summary.failed)} failed, "
            f"{len(summary.skipped)} already done; outputs in {summary.out_dir}"
        )
    return 1 if summary.failed else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline.app.demo import run_demo

    run_demo(**_given(args, DEMO_OPTIONS))
    return 0


DEMO_OPTIONS = ("out_dir", "n_train", "n_test", "size", "epochs", "seed")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    M = ModelConfig
    g = p.add_argument_group("model (new runs only; a resumed run keeps its own)")
    g.add_argument("--n-patches", type=int,
                   help=f"patches sampled per slide {_default(M, 'n_patches')}")
    g.add_argument("--patch-size", type=int,
                   help=f"patch side in patch-level pixels {_default(M, 'patch_size')}")
    g.add_argument("--low-res-max-side", type=int,
                   help=f"longer side of the attention view {_default(M, 'low_res_max_side')}")
    g.add_argument("--low-res-level", type=int, help="pyramid level as the attention view")
    g.add_argument("--low-res-mpp", type=float, help="microns per pixel of the attention view")
    g.add_argument("--patch-level", type=int,
                   help=f"pyramid level of the patches {_default(M, 'patch_level')}")
    g.add_argument("--patch-mpp", type=float, help="microns per pixel of the patches")
    g.add_argument("--no-tissue-mask", action="store_true", help="sample outside tissue too")
    g.add_argument("--entropy", type=float, dest="entropy_strength",
                   help=f"entropy regularizer strength {_default(M, 'entropy_strength')}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Attention sampling for gigapixel whole-slide images."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress and no summary; errors only")
    # Also accepted after the command; SUPPRESS keeps it from resetting the global one.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress and no summary; errors only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", parents=[common], help="levels, sizes, mpp and backend of slides")
    p.add_argument("slides", nargs="+", metavar="SLIDE_OR_DIR")
    p.add_argument("--json", action="store_true",
                   help="print JSON: one object per slide, {path, error} for a failure")
    p.add_argument("--recursive", action="store_true", help="list sub-directories too")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("synth", help="write a labelled synthetic slide dataset")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--n", type=int, default=40, help="number of slides")
    p.add_argument("--size", type=int, default=2048, help="slide side in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes writing slides")
    p.set_defaults(run=cmd_synth)

    p = sub.add_parser("train", help="train a classifier (resumes an existing run directory)")
    p.add_argument("--slides", required=True, metavar="DIR")
    p.add_argument("--labels", required=True, metavar="CSV", help="columns slide,label")
    p.add_argument("--out", required=True, metavar="RUN_DIR")
    T = TrainConfig
    p.add_argument("--epochs", type=int, help=_default(T, "epochs"))
    p.add_argument("--lr", type=float, help=f"learning rate {_default(T, 'lr')}")
    p.add_argument("--batch-size", type=int,
                   help=f"slides per optimizer step {_default(T, 'batch_size')}")
    p.add_argument("--val-fraction", type=float, help=_default(T, "val_fraction"))
    p.add_argument("--seed", type=int, help=_default(T, "seed"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    _add_model_options(p)
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("predict", parents=[common],
                       help="classify slides into CSV, heatmaps and GeoJSON")
    p.add_argument("--model", required=True, metavar="RUN_DIR")
    p.add_argument("--slides", nargs="+", default=[], metavar="DIR_OR_FILE")
    p.add_argument("--slides-csv", metavar="CSV",
                   help="a CSV naming the slides: column path, optional column slide (output name)")
    p.add_argument("--recursive", action="store_true", help="list sub-directories of --slides")
    p.add_argument("--out", required=True, metavar="OUT_DIR")
    p.add_argument("--overwrite", action="store_true",
                   help="redo slides already done; replace outputs made by another model or seed")
    p.add_argument("--seed", type=int, help=_default(PredictConfig, "seed"))
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if present)")
    cluster = p.add_mutually_exclusive_group()
    cluster.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler")
    cluster.add_argument("--workers", type=_positive_int, metavar="N",
                         help="local Dask worker processes")
    p.set_defaults(run=cmd_predict)

    p = sub.add_parser("demo", help="synthetic data, train, predict and a baseline, in minutes")
    d = DemoConfig
    p.add_argument("--out", dest="out_dir", metavar="DIR", help=_default(d, "out_dir"))
    p.add_argument("--n-train", type=int, help=f"training slides {_default(d, 'n_train')}")
    p.add_argument("--n-test", type=int, help=f"test slides {_default(d, 'n_test')}")
    p.add_argument("--size", type=int, help=f"slide side in pixels {_default(d, 'size')}")
    p.add_argument("--epochs", type=int, help=f"training epochs {_default(d, 'epochs')}")
    p.add_argument("--seed", type=int, help=f"dataset and training seed {_default(d, 'seed')}")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, _user_errors()):
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

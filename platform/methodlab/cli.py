"""The `methodlab` command.

    methodlab train <method> [-c config.yaml] [key=value ...]
    methodlab sweep <method> [-c sweep.yaml] [key=value ...]
    methodlab submit --address http://<head>:8265 train|sweep <method> [-c file] [key=value ...]
    methodlab promote <registered-model> [--metric test_acc] [--version N]
    methodlab serve models:/<registered-model>@<alias> [--port 5001] [--host 127.0.0.1]
    methodlab data prepare [name ...] | data list
    methodlab data import <image-folder> --out <path-or-s3> [--size 32] [--workers N] [--skip-bad]
    methodlab data import-<format> <source> --out <path-or-s3>   cifar10, cifar100, stl10, flowers102,
                                        casia-surf, nyuv2, xlsa17 (methodlab.data.importers)
    methodlab sync                      replay metrics kept while the MLflow server was down
    methodlab report                    HTML report of methods vs baselines, from MLflow
    methodlab models import <weights file> --from timm:vit_base_patch16_224 [--register NAME] [--out F]
    methodlab methods | models [list | sources]
    methodlab demo

Every user error prints one line, `error: ...`, and exits non-zero before cluster resources are
spent; tracebacks are for bugs, and are printed with credentials in URIs masked (`redact`).
`train`, `sweep`, `submit` and `demo` take `--verbose`: Ray's, Ray Tune's and MLflow's own lines
too (`methodlab.console`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

from methodlab.errors import ConfigError, MethodlabError
from methodlab.redact import redact_value

STARTED_AT = time.time()     # the command's start: the run logs start-up to its first step (startup_s)


def _train(args) -> int:
    from methodlab.config import load_config
    from methodlab.registry import get_method
    from methodlab.train.launch import train

    # A bare `resume` among the overrides: also pick up the checkpoint kept on local disk when S3
    # went away mid-run (a plain resubmit resumes from storage).
    resume = "resume" in args.overrides
    cfg = load_config(args.method, args.config, [o for o in args.overrides if o != "resume"])
    if args.print_config:
        # The layers merged and validated, nothing started: what `train` would run, and as what.
        print(f"# run name: {cfg.run_name}\n{cfg.to_yaml()}", end="")
        return 0
    summary = train(cfg, resume=resume, started_at=STARTED_AT)
    method = get_method(cfg.method_name)
    print(summary.line(method.test_metric))
    return 0


def _submit(args) -> int:
    from methodlab.submit import submit

    env_json = _verbose_job_env(args.runtime_env_json) if args.verbose else args.runtime_env_json
    return submit(args.address, args.job, args.method, args.config, args.overrides, wait=not args.no_wait,
                  runtime_env_json=env_json, submission_id=args.submission_id)


def _verbose_job_env(runtime_env_json: str | None) -> str | None:
    """`submit --verbose`: the job's runtime env with METHODLAB_VERBOSE=1 among its env_vars (JSON
    that is not an object is passed on as it is, for `submit` to refuse in its one line)."""
    import json

    from methodlab.console import VERBOSE_ENV

    try:
        env = json.loads(runtime_env_json) if runtime_env_json else {}
    except ValueError:
        return runtime_env_json
    if not isinstance(env, dict) or not isinstance(env.get("env_vars", {}), dict):
        return runtime_env_json
    return json.dumps({**env, "env_vars": {**env.get("env_vars", {}), VERBOSE_ENV: "1"}})


def _sweep(args) -> int:
    from methodlab.sweep import run_sweep

    print(run_sweep(args.method, args.config, args.overrides).line())
    return 0


def _promote(args) -> int:
    from methodlab.config import TrackingConfig, default_tracking_uri
    from methodlab.tracking import Tracker

    tracker = Tracker(args.tracking_uri or default_tracking_uri(), TrackingConfig().experiment)
    moved, message = tracker.promote(args.name, args.metric, args.mode, args.version)
    print(message)
    return 0 if moved else 1


def _serve(args) -> int:
    from methodlab.config import TrackingConfig, default_tracking_uri
    from methodlab.tracking import Tracker, serve_command

    if not args.model.startswith(("models:/", "runs:/")):
        raise ConfigError(f"model {args.model!r}: give a registered model, models:/NAME@ALIAS or models:/NAME/VERSION")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: give a port in 1..65535")
    uri = args.tracking_uri or default_tracking_uri()
    missing = Tracker(uri, TrackingConfig().experiment).missing_model(args.model)
    if missing:
        raise ConfigError(f"model {args.model} is not in {redact_value(uri)} ({missing}); "
                          "check the name and alias (methodlab train registers one)")
    argv, env = serve_command(args.model, uri, args.host, args.port)
    print(f"[methodlab] serving {args.model} on http://{args.host}:{args.port}/invocations "
          "(POST {\"inputs\": [raw rows]}); Ctrl-C stops it", flush=True)
    os.execve(argv[0], argv, env)       # the server, in this process: Ctrl-C and signals reach it


def _data(args) -> int:
    from methodlab.config import methodlab_home
    from methodlab.data.importers import IMPORTERS
    from methodlab.data import prepare_builtin
    from methodlab.registry import dataset_names

    root = args.root or str(methodlab_home() / "data")
    if args.action == "list":
        for name in dataset_names():
            print(name)
        return 0
    if args.action == "prepare":
        for name in args.names or dataset_names():
            info = prepare_builtin(name, root, force=args.force)
            sizes = ", ".join(f"{s}" for s in info.splits)
            print(f"{name}: {info.uri} ({sizes}; columns {', '.join(info.columns)})")
        return 0
    from methodlab.data.importing import summary

    _check_import_args(args)
    if args.action in IMPORTERS:
        return _import(args, IMPORTERS[args.action])
    from methodlab.data.imagefolder import import_image_folder

    if len(args.names) != 1 or not args.out:
        raise MethodlabError("usage: methodlab data import <image-folder> --out <path-or-s3-uri> "
                             "[--size 32] [--workers N] [--skip-bad]")
    done = import_image_folder(args.names[0], args.out, size=args.size or 32, workers=args.workers,
                               skip_bad=args.skip_bad)
    if done.skipped:
        shown = ", ".join(p for p, _ in done.skipped[:3]) + (", ..." if len(done.skipped) > 3 else "")
        print(f"skipped {len(done.skipped)} unreadable image(s): {shown}")
    print(f"{summary(done.info)} (uint8 {done.info.columns['image'].shape}, "
          f"{len(done.worker_pids)} worker process(es))")
    return 0


def _check_import_args(args) -> None:
    """The options every `data import*` shares, refused in one line before anything is read."""
    from methodlab.config import check_location

    for option in ("size", "workers"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise MethodlabError(f"--{option} {value}: must be at least 1 (e.g. --{option} "
                                 f"{32 if option == 'size' else 2})")
    if args.out:
        try:
            check_location(args.out)
        except ValueError as e:
            raise MethodlabError(f"--out {args.out}: {e}") from None


def _import(args, importer) -> int:
    """`data import-<format>`: the table's function with the options it takes, then the summary."""
    from methodlab.data.importing import summary

    if not 1 <= len(args.names) <= importer.max_sources or not args.out:
        raise MethodlabError(f"usage: methodlab data {args.action} {importer.sources} --out <path-or-s3-uri>")
    options = {k: getattr(args, k) for k in importer.options if getattr(args, k) is not None}
    sources = args.names if importer.max_sources > 1 else args.names[0]
    print(summary(importer.run(sources, args.out, **options)))
    return 0


def _sync(args) -> int:
    from methodlab.config import methodlab_home
    from methodlab.tracking import sync_spool

    lines = sync_spool(args.spool or methodlab_home() / "spool")
    print("\n".join(lines) if lines else "nothing to sync")
    return 0 if all("synced" in line for line in lines) else 1


def _report(args) -> int:
    from methodlab.config import default_tracking_uri
    from methodlab.report import write_report

    uri = args.tracking_uri or default_tracking_uri()
    print(f"report: {write_report(uri, args.out, ui_url=args.ui_url, record=not args.no_record)}")
    return 0


def _methods(args) -> int:
    from methodlab.registry import get_method, method_names

    rows = [("method", "stages", "metric", "dataset")]
    for name in method_names():
        m = get_method(name)
        rows.append((name, " > ".join(m.stages), f"{m.metric} ({m.mode})", m.default_dataset))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:<{width[2]}}  {r[3]}")
    return 0


def _models(args) -> int:
    from methodlab.models.sources import source_names
    from methodlab.registry import model_names

    if args.action == "list":
        print("\n".join(model_names()))
        return 0
    if args.action == "sources":
        print("\n".join(source_names()))
        return 0
    return _import_model(args)


def _import_model(args) -> int:
    import torch

    from methodlab.models.hub import save_pretrained
    from methodlab.models.sources import convert

    if not args.file or not args.source or not (args.register or args.out):
        raise MethodlabError("usage: methodlab models import <weights file> --from <library:model> "
                             "(--register NAME | --out model.pt) [--license TEXT] [--img-size N] [--mean R G B --std R G B]")
    # Everything that can be wrong with the file is found here, before MLflow is touched.
    converted = convert(args.file, args.source, args.img_size, args.mean, args.std, args.license or "")
    spec, model = converted.spec, converted.model
    params = sum(p.numel() for p in model.parameters())
    where = []
    if args.out:
        save_pretrained(model, spec, args.out)
        where.append(args.out)
    if args.register:
        from methodlab.config import TrackingConfig, default_tracking_uri
        from methodlab.tracking import Tracker

        tracker = Tracker(args.tracking_uri or default_tracking_uri(), TrackingConfig().experiment)
        example = torch.rand(1, *spec["input"]["shape"]).numpy()
        version = tracker.register_import(args.register, model, spec, example)
        where.append(f"models:/{args.register}/{version} (alias candidate)")
    shown = spec["input"]
    print(f"imported {args.source} as {spec['arch']} ({params / 1e6:.1f}M parameters, input "
          f"{'x'.join(map(str, shown['shape']))} in [0, 1], normalized by the model with mean {shown['mean']} "
          f"std {shown['std']}; {spec['kwargs']['num_classes']} classes) into {' and '.join(where)}")
    return 0


def _demo(args) -> int:
    from methodlab.demo import run_demo

    return run_demo(args.overrides)


VERBOSE_HELP = ("also show Ray's, Ray Tune's and MLflow's own INFO and WARNING lines and the ones methodlab "
                "drops as noise (same as METHODLAB_VERBOSE=1)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="methodlab", description="Train, sweep and ship vision methods on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a method (resumes a run of the same name)")
    t.add_argument("method")
    t.add_argument("-c", "--config", help="YAML config (e.g. jobs/configs/<method>.yaml)")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved config (defaults, then the YAML, then the overrides) and its "
                   "run name, and exit without training")
    t.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    t.add_argument("overrides", nargs="*", help="key=value, e.g. train.lr=3e-4 scaling.num_workers=2; a bare "
                   "`resume` also picks up the checkpoint kept locally during an S3 outage")
    t.set_defaults(func=_train)

    s = sub.add_parser("sweep", help="Ray Tune sweep of a method's hyperparameters")
    s.add_argument("method")
    s.add_argument("-c", "--config", help="sweep YAML (e.g. jobs/sweeps/<name>.yaml)")
    s.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(func=_sweep)

    su = sub.add_parser("submit", help="submit a train or sweep as a Ray job of a running cluster, from this "
                        "checkout (config checked first, git commit recorded)")
    su.add_argument("--address", help="the cluster's job server, e.g. http://127.0.0.1:8265 (default $RAY_ADDRESS)")
    su.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    su.add_argument("--runtime-env-json", help="more of the job's runtime env (env_vars are merged)")
    su.add_argument("--submission-id", help="the job's id (default: Ray's)")
    su.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    su.add_argument("job", choices=["train", "sweep"])
    su.add_argument("method")
    su.add_argument("-c", "--config")
    su.add_argument("overrides", nargs="*")
    su.set_defaults(func=_submit)

    pr = sub.add_parser("promote", help="move alias 'champion' to the candidate if its metric is better")
    pr.add_argument("name", help="registered model, e.g. methodlab-supervised")
    pr.add_argument("--metric", default="test_acc")
    pr.add_argument("--mode", choices=["max", "min"], default="max")
    pr.add_argument("--version", help="default: the version with alias 'candidate'")
    pr.add_argument("--tracking-uri", help="default: the local SQLite store")
    pr.set_defaults(func=_promote)

    sv = sub.add_parser("serve", help="serve a registered model over HTTP (MLflow's scoring server): POST "
                        "raw rows to /invocations, get labels and class probabilities")
    sv.add_argument("model", help="models:/NAME@ALIAS or models:/NAME/VERSION, e.g. models:/methodlab-supervised@candidate")
    sv.add_argument("--port", type=int, default=5001, help="default: 5001 (the MLflow UI has 5000)")
    sv.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1 (this machine only)")
    sv.add_argument("--tracking-uri", help="default: the local SQLite store")
    sv.set_defaults(func=_serve)

    from methodlab.data.importers import IMPORTERS

    d = sub.add_parser("data", help="prepare built-in datasets, or import an image folder or a paper's dataset "
                       "(decoded in parallel, streamed to sharded Parquet)")
    d.add_argument("action", choices=["prepare", "list", "import", *IMPORTERS],
                   help="import: a class-per-subfolder image folder; " + "; ".join(
                       f"{a}: {i.sources}" for a, i in IMPORTERS.items()))
    d.add_argument("names", nargs="*")
    d.add_argument("--root", help="prepare: where built-in datasets go (default .methodlab/data); "
                   "import-casia-surf: the directory the list's paths are relative to (default: the list's)")
    d.add_argument("--out", help="import: the output dataset path or s3:// URI")
    d.add_argument("--size", type=int, help="import, import-flowers102, import-casia-surf, import-nyuv2: images are "
                   "resized to size x size and stored as uint8 (default 32; 64 for the papers' formats)")
    d.add_argument("--workers", type=int, help="import: decoding processes (default: every CPU this process may use)")
    d.add_argument("--skip-bad", action="store_true", help="import: leave out unreadable or corrupt images "
                   "(listed in a summary line) instead of failing on the first one")
    d.add_argument("--no-unlabeled", dest="unlabeled", action="store_false", default=None,
                   help="import-stl10: leave out the 100,000 unlabeled images (a labelled-only train split)")
    d.add_argument("--splits", dest="splits_file", help="import-nyuv2: the standard splits.mat "
                   "(trainNdxs/testNdxs); default: a seeded stratified split")
    d.add_argument("--force", action="store_true", help="prepare: rebuild even if present")
    d.set_defaults(func=_data)

    sy = sub.add_parser("sync", help="replay metrics kept locally while the tracking server was down")
    sy.add_argument("--spool", help="default: $METHODLAB_HOME/spool")
    sy.set_defaults(func=_sync)

    rp = sub.add_parser("report", help="HTML report of every method against its baselines, from MLflow")
    rp.add_argument("--tracking-uri", help="default: the local SQLite store")
    rp.add_argument("--out", help="default: $METHODLAB_HOME/report/report.html")
    rp.add_argument("--ui-url", help="an MLflow UI serving the tracking store (e.g. http://127.0.0.1:5000 from "
                    "`mlflow ui`): runs are linked to it (a server tracking URI is linked without it)")
    rp.add_argument("--no-record", action="store_true", help="do not first record the committed "
                    "bench/results/*.json as runs of experiment methodlab-bench (once per file content)")
    rp.set_defaults(func=_report)

    sub.add_parser("methods", help="list registered methods").set_defaults(func=_methods)
    mo = sub.add_parser("models", help="list architectures (list) or weights sources (sources), or import "
                        "a timm/torchvision weights file (import)")
    mo.add_argument("action", nargs="?", choices=["list", "sources", "import"], default="list")
    mo.add_argument("file", nargs="?", help="import: a .pth, .pt, .bin or .safetensors state dict")
    mo.add_argument("--from", dest="source", help="import: the network the file is, e.g. timm:vit_base_patch16_224 "
                    "or torchvision:resnet50 (`methodlab models sources`)")
    mo.add_argument("--register", help="import: register in MLflow under this name (alias candidate)")
    mo.add_argument("--out", help="import: also write a methodlab model file (load it with method.backbone=<file>)")
    mo.add_argument("--license", help="import: the weights' license, recorded with the version")
    mo.add_argument("--img-size", type=int, help="import (ViT): another input size; position embeddings "
                    "are interpolated (bicubic)")
    mo.add_argument("--mean", type=float, nargs=3, help="import: the input mean the weights expect "
                    "(default: the source's published one)")
    mo.add_argument("--std", type=float, nargs=3, help="import: the input std the weights expect")
    mo.add_argument("--tracking-uri", help="default: the local SQLite store")
    mo.set_defaults(func=_models)
    dm = sub.add_parser("demo", help="train every method on built-in data and print the results")
    dm.add_argument("--verbose", action="store_true", help=VERBOSE_HELP)
    dm.add_argument("overrides", nargs="*")
    dm.set_defaults(func=_demo)
    p.subcommands = sub.choices           # name -> parser, for `train <method> --help`
    return p


def _config_help(argv: list[str], parser: argparse.ArgumentParser) -> int | None:
    """`train <method> --help` / `sweep <method> --help`: the command's options, then every config
    key of that method with its type, value and description (from the pydantic models)."""
    if len(argv) < 2 or argv[0] not in ("train", "sweep") or argv[1].startswith("-") \
            or not {"-h", "--help"} & set(argv[2:]):
        return None
    import methodlab.methods  # noqa: F401
    from methodlab.config import config_keys_help

    keys = config_keys_help(argv[1])      # an unknown method fails here, before anything prints
    print(parser.subcommands[argv[0]].format_help())
    print(keys)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    try:
        shown = _config_help(argv, parser)
    except MethodlabError as e:          # an unknown method: its one line
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if shown is not None:
        return shown
    # argparse stops filling a `nargs="*"` positional at the first option, so in
    # `train supervised -c x.yaml train.lr=3e-3` the overrides after -c come back as "unknown";
    # they are overrides all the same, wherever they stand.
    args, rest = parser.parse_known_args(argv)
    if rest:
        if not hasattr(args, "overrides") or any(a.startswith("-") for a in rest):
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        args.overrides = [*args.overrides, *rest]
    if getattr(args, "verbose", False):
        from methodlab.console import set_verbose

        set_verbose()
    try:
        import methodlab.methods  # noqa: F401  (fills the registries every command looks names up in)

        return args.func(args)
    except MethodlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:
        # A signal during a run (`train.signals.Interrupted`) says what became of the run and exits
        # 128 + its number; a bare Ctrl-C elsewhere has nothing to add.
        print(f"error: {e or 'interrupted; submit the same run again to resume it'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except Exception:
        # A bug, not bad input: the whole traceback, but an exception's text may quote a URI
        # with credentials in it (pyarrow's, botocore's, MLflow's), so it is redacted first.
        print(redact_value(traceback.format_exc()), end="", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

"""The `edgetl` command line: one short function per verb, each calling one stage function.

Only typer and rich are imported here; a stage imports its framework when it runs, so `edgetl --help`
stays fast and framework-free.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer

from edgetl.backbones import BACKBONES
from edgetl.errors import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_TERMINATED,
    EXIT_USAGE,
    UserError,
    exit_status,
    forget_interrupt,
    interrupt_requested,
    interruption_line,
    is_interruption,
    requested_status,
    watch_interrupts,
)
from edgetl.formats import FORMATS

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Fine-tune, compress, export, verify, benchmark and bundle MobileNet-family models for phones.",
)


FORMATS_HELP = (f"Comma list of {', '.join(FORMATS)} (default: "
                f"{','.join(name for name, record in FORMATS.items() if record.default)}).")
SETTINGS_HELP = ("KEY=VALUE: set any setting of this verb, also those without a flag of their own (repeatable; "
                 "an unknown key exits 2 with the valid ones).")
Settings = Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help=SETTINGS_HELP)]


def _given(ctx: typer.Context, params: dict[str, str] | None = None, **values: object) -> dict[str, object]:
    """`values` (keyed by setting), with None for each whose flag was not on the command line, so that a recipe
    or --set may set it; `params` names the flags whose parameter is not called as the setting is."""
    params = params or {}

    def defaulted(name: str) -> bool:  # by name: typer carries its own copy of click's ParameterSource
        source = ctx.get_parameter_source(params.get(name, name))
        return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")

    return {name: None if defaulted(name) else value for name, value in values.items()}


@app.command()
def finetune(
    ctx: typer.Context,
    data: Annotated[
        str,
        typer.Option(
            help="Image folder (one sub-folder per class, or train/val/test trees), "
            "or builtin:fashion-mnist-mini / builtin:shapes."
        ),
    ],
    run_dir: Annotated[
        Path | None, typer.Option("--out", help="Run folder; the checkpoint goes to OUT/checkpoint.")
    ] = None,
    backbone: Annotated[
        str, typer.Option(help=", ".join(BACKBONES) + ".")
    ] = "efficientnet_lite0",
    width: Annotated[float, typer.Option(help="Width multiplier (mobilenet_v2: 0.35, 0.5, 0.75, 1.0).")] = 1.0,
    image_size: Annotated[int | None, typer.Option(
        help="Square input size in pixels; default: the backbone's for large images, measured (128/160/224) "
             "for small ones.")
    ] = None,
    weights: Annotated[
        str, typer.Option(help="imagenet (torch hub / Hugging Face Hub / Keras cache), none (random init), "
                          "hf-hub:OWNER/NAME[@REVISION] (a safetensors state dict on the Hugging Face Hub), or a PATH "
                          "(torch state dict, .pt or .safetensors; keras: no-top .h5).")
    ] = "imagenet",
    epochs_finetune: Annotated[int | None, typer.Option(
        help="Stage 2 epochs (0: the stage-1 probe alone); default: at least 200 optimizer steps and 4 epochs.")
    ] = None,
    unfreeze: Annotated[int | None, typer.Option(
        help="Top blocks unfrozen in stage 2 (-1: all, the default; 0 skips stage 2).")] = None,
    batch_size: Annotated[int | None, typer.Option(
        help="Mini-batch size (global); default: 8 to 64, from the number of training images.")] = None,
    class_weights: Annotated[str, typer.Option(
        help="auto (balanced when the largest class has 1.5x the images of the smallest), balanced, none.")
    ] = "auto",
    lr_finetune: Annotated[float, typer.Option(help="Peak learning rate of stage 2.")] = 3e-4,
    patience: Annotated[int, typer.Option(
        help="Stage-2 early-stopping patience in epochs (only when the validation split is large enough to rank "
             "epochs by top-1).")] = 6,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation, shuffling and augmentation.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = 0,
    framework: Annotated[str, typer.Option(
        help="torch, or keras (tf_keras keras.applications MobileNets; needs the keras extra).")] = "torch",
    devices: Annotated[int, typer.Option(
        help="Data-parallel processes on this machine, one per GPU (torch: torchrun, NCCL; with --device cpu: "
        "gloo CPU processes). keras: MirroredStrategy over this many GPUs.")] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines in the run (torch; keras reads TF_CONFIG).")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's index, 0 to nnodes-1 (0 hosts the master).")] = 0,
    master: Annotated[str | None, typer.Option(
        help="ADDR:PORT of node rank 0, needed with --nnodes > 1.")] = None,
    master_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the master before stopping with an error.")] = 120.0,
    time_budget: Annotated[float | None, typer.Option(
        help="Minutes the whole run may take: a few real steps are timed first, then the stage-2 schedule (and a "
             "measured input size) is fitted to end within the budget; the plan is printed before training.")
    ] = None,
    recipe: Annotated[str | None, typer.Option(
        help="Named fine-tuning recipe from export/finetune (e.g. from-scratch) or a .toml path; flags and --set "
             "override it.")] = None,
    settings: Settings = None,
) -> None:
    """Fine-tune an ImageNet-pretrained backbone on a folder of labelled images.

    --batch-size is the global batch: with several processes each takes an equal share.
    """
    from edgetl.config import resolve
    from edgetl.finetune import run_finetune

    config = resolve("finetune", recipe, settings, **_given(
        ctx, data=data, backbone=backbone, width=width, image_size=image_size, weights=weights,
        epochs_finetune=epochs_finetune, unfreeze=unfreeze, batch_size=batch_size, class_weights=class_weights,
        lr_finetune=lr_finetune, patience=patience, seed=seed, device=device, workers=workers, framework=framework,
        devices=devices, nnodes=nnodes, node_rank=node_rank, master=master, master_timeout=master_timeout,
        time_budget=time_budget))
    run_finetune(config, run_dir)


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="RUN/checkpoint folder written by edgetl finetune.")],
    formats: Annotated[str | None, typer.Option(help=FORMATS_HELP)] = None,
    quant: Annotated[str | None, typer.Option(
        help="Comma list of fp32, int8 (default: both); keras checkpoints also fp16, dynamic.")] = None,
    prune: Annotated[str | None, typer.Option(
        help="channels:R removes a fraction R of channels for real (torch; speed), magnitude:S zeroes a fraction S "
             "of weights (size, see gzip); each with a short fine-tune. A bare number is magnitude (keras).")
    ] = None,
    qat: Annotated[bool | None, typer.Option(
        "--qat", help="Quantization-aware training before int8 (torch: PT2E QAT; keras: tfmot, prune-preserving "
                      "with --prune).")
    ] = None,
    int8: Annotated[str | None, typer.Option(
        "--int8", help="How int8 is made: auto (default: post-training, then for a file over --max-drop learned "
                       "weight rounding, float fallback of --float-layers, then QAT), ptq (post-training only) or "
                       "qat (same as --qat).")] = None,
    no_qat: Annotated[bool | None, typer.Option(
        "--no-qat", help="--int8 auto may not train (QAT uses labels); remedies stop at learned rounding.")] = None,
    rounding_layers: Annotated[int | None, typer.Option(
        help="torch: most sensitive layers whose int8 rounding --int8 auto learns (default 8; 0: none).")] = None,
    float_layers: Annotated[str | None, typer.Option(
        help="torch: comma list of layers (names as the int8 sensitivity table prints them) that --int8 auto may "
             "keep float, after learned rounding and before QAT, for a file still over --max-drop; input and "
             "output stay int8.")] = None,
    parts: Annotated[bool | None, typer.Option(
        "--parts", help="torch: also lower each network block of every .pte on its own (stem, each inverted-residual "
                        "block, head), for bench --breakdown on emulated ARM64.")] = None,
    debug_numerics: Annotated[bool | None, typer.Option(
        "--debug-numerics", help="torch: run a few calibration images through every block (stem, each "
                                 "inverted-residual block, head) of each int8 file in its runtime, of the PT2E Q/DQ "
                                 "graph and of the float model; a table, numerics.png and the figures in the manifest "
                                 "say where a runtime departs from the graph.")] = None,
    debug_blocks: Annotated[str | None, typer.Option(
        help="torch: with --debug-numerics, compare only these blocks in the runtimes (comma list, names as its table "
             "prints them; each alone on the graph's input). An unknown name exits 2 with the valid ones.")] = None,
    recovery_epochs: Annotated[int | None, typer.Option(
        help="Fine-tune epochs of --prune (default: torch 8 for channels, 4 for magnitude; keras 6).")] = None,
    qat_epochs: Annotated[int | None, typer.Option(
        help="Epochs of --qat (default 2; keras after --prune: 6).")] = None,
    distill: Annotated[float | None, typer.Option(
        help="Weight, 0 to 1, of the dense model's soft targets (distillation) in the --prune fine-tune and --qat "
             "on torch (default: 0.9 for channels, 0 otherwise).")] = None,
    calib: Annotated[
        int | None, typer.Option(help="Training images for int8 calibration (default 256, chosen by measurement).")
    ] = None,
    max_drop: Annotated[
        float | None, typer.Option(help="int8 budget: points of top-1 a file may lose; --int8 auto remedies files "
                            "over it, and the run fails (after writing) if one stays over (default 1.0).")
    ] = None,
    bias_correction: Annotated[
        bool | None, typer.Option("--bias-correction/--no-bias-correction", help="Correct int8 weight-rounding bias.")
    ] = None,
    recipe: Annotated[
        str | None, typer.Option(help="Named recipe from export/recipes (e.g. android-litert-int8) or a .toml path.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Runtime threads during verification (default: the runtime's).")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Export folder (default: RUN/export).")] = None,
    allow_modified: Annotated[bool, typer.Option(
        "--allow-modified", help="Export weights whose sha256 no longer matches the checkpoint's manifest (the "
                                 "export records the weights' own sha256 and marks them modified).")] = False,
    settings: Settings = None,
) -> None:
    """Export a checkpoint to TFLite and ExecuTorch (fp32/int8) and verify each file in its runtime."""
    from edgetl.export import resolve_config, run_export

    config = resolve_config(
        recipe, settings, formats=formats, quant=quant, calib=calib, max_drop=max_drop, bias_correction=bias_correction,
        prune=prune, qat=qat, recovery_epochs=recovery_epochs, qat_epochs=qat_epochs,
        distill=distill, threads=threads, int8=int8, no_qat=no_qat, rounding_layers=rounding_layers,
        float_layers=float_layers, parts=parts, debug_numerics=debug_numerics, debug_blocks=debug_blocks,
    )
    run_export(checkpoint, config, out, allow_modified=allow_modified)


@app.command()
def bench(
    ctx: typer.Context,
    export_dir: Annotated[Path | None, typer.Argument(
        help="Export folder (its *.tflite and *.pte files) or one model file.")] = None,
    target: Annotated[str, typer.Option(help="Comma-separated: host, arm64-a53, arm64-a55, arm64-a72, arm64-a76, "
                                             "arm64-n1, arm64-a710, ssh:[USER@]HOST[:PORT] (your own board, "
                                             "with your ssh keys and ~/.ssh/config), adb[:SERIAL].")] = "host",
    threads: Annotated[str, typer.Option(
        help="Host thread counts, comma-separated (ARM64 targets run 1 thread).")] = "1,2",
    inputs: Annotated[Path | None, typer.Option(
        help="Inputs .npz (x, y) for top-1; default: EXPORT_DIR/test_inputs.npz if present.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Results folder; default: RUN/bench beside RUN/export.")] = None,
    iters: Annotated[int, typer.Option(help="Timed invokes on the host.")] = 50,
    warmup: Annotated[int, typer.Option(help="Warm-up invokes on the host.")] = 5,
    samples: Annotated[int | None, typer.Option(help="Top-1 on the first N samples on the host (default all).")] = None,
    arm_iters: Annotated[int, typer.Option(help="Timed (and counted) invokes per emulated target.")] = 5,
    arm_samples: Annotated[int, typer.Option(help="Top-1 on the first N samples per emulated target.")] = 50,
    setup: Annotated[str | None, typer.Option(
        "--setup", help="Provision an emulated userland (arm64); exits after it when no EXPORT_DIR is given.")] = None,
    remote_python: Annotated[str, typer.Option(
        help="ssh: targets: the Python that runs device_bench there (e.g. ~/venv/bin/python).")] = "python3",
    taskset: Annotated[str | None, typer.Option(
        help="ssh: targets: pin device_bench to these CPUs (taskset -c), e.g. 4-7 for the big cores.")] = None,
    allow_modified: Annotated[bool, typer.Option(
        "--allow-modified", help="Benchmark a file whose sha256 no longer matches its export manifest (marked "
        "modified in the results) instead of refusing it.")] = False,
    breakdown: Annotated[bool, typer.Option(
        "--breakdown", help="Emulated ARM64 targets: guest instructions per network block (stem, each "
        "inverted-residual block, head) of each .tflite, each block cut out of the file and counted alone.")] = False,
    settings: Settings = None,
) -> None:
    """Benchmark exported files on the host CPU and on emulated ARM64 phone CPUs."""
    from edgetl.bench import run_bench, setup_userland
    from edgetl.config import resolve

    if setup is not None:
        setup_userland(setup)
    if export_dir is None:
        if setup is None:
            raise UserError("give an EXPORT_DIR to benchmark (or --setup arm64 to provision the ARM64 userland)")
        return
    options = resolve("bench", None, settings, validate=False, **_given(
        ctx, {"targets": "target"}, targets=target, threads=threads, inputs=inputs, out=out, iters=iters,
        warmup=warmup, samples=samples, arm_iters=arm_iters, arm_samples=arm_samples, allow_modified=allow_modified,
        remote_python=remote_python, taskset=taskset, breakdown=breakdown))
    run_bench(export_dir, options, strict=True)  # any failed row: exit 1, after publishing the rows that worked


@app.command()
def sweep(
    checkpoint: Annotated[Path, typer.Argument(help="RUN/checkpoint folder written by edgetl finetune (torch).")],
    recipe: Annotated[str | None, typer.Option(
        help="Sweep recipe from export/sweeps (default, small) or a .toml path; flags override it.")] = None,
    variants: Annotated[str | None, typer.Option(
        help="Comma list of fp32, int8-ptq, int8-qat, pruned30-int8, pruned50-int8 (or the recipe's own).")] = None,
    target: Annotated[str | None, typer.Option(
        help="Comma list of host, arm64-a53, arm64-a55, arm64-a72, arm64-a76, arm64-n1, arm64-a710, "
             "ssh:[USER@]HOST[:PORT].")] = None,
    threads: Annotated[str | None, typer.Option(
        help="Host thread counts; the first ranks the host (ARM64 runs 1 thread).")] = None,
    formats: Annotated[str | None, typer.Option(help=FORMATS_HELP)] = None,
    max_drop: Annotated[float | None, typer.Option(
        help="Accuracy budget: top-1 points a file may lose against the float checkpoint (default 1.0).")] = None,
    calib: Annotated[int | None, typer.Option(help="Training images for int8 calibration.")] = None,
    iters: Annotated[int | None, typer.Option(help="Timed invokes on the host.")] = None,
    samples: Annotated[int | None, typer.Option(
        help="Bench top-1 cross-check on the first N test images on the host (default 100).")] = None,
    arm_iters: Annotated[int | None, typer.Option(help="Counted invokes per emulated target.")] = None,
    arm_samples: Annotated[int | None, typer.Option(
        help="Top-1 cross-check on the first N samples per emulated target (default 5).")] = None,
    remote_python: Annotated[str | None, typer.Option(
        help="ssh: targets: the Python that runs device_bench there (default python3).")] = None,
    taskset: Annotated[str | None, typer.Option(
        help="ssh: targets: pin device_bench to these CPUs (taskset -c), e.g. 4-7.")] = None,
    breakdown: Annotated[bool | None, typer.Option(
        "--breakdown", help="Emulated ARM64 targets: count each network block of every .tflite (bench --breakdown); "
        "the report gets a table and a plot per file.")] = None,
    debug_numerics: Annotated[bool | None, typer.Option(
        "--debug-numerics", help="torch: every int8 variant's export runs the numerics debugger (export "
                                 "--debug-numerics); the report plots the first one's blocks.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Sweep folder (default: RUN/sweep).")] = None,
    reuse: Annotated[Path | None, typer.Option(
        help="Export folder of this checkpoint (e.g. RUN/export): variants with the same settings take its "
        "verified files instead of exporting again.")] = None,
    settings: Settings = None,
) -> None:
    """Export, verify and benchmark a grid of compressed variants; write report.md and report.html."""
    from edgetl.sweep import resolve_config, run_sweep

    config = resolve_config(recipe, settings, variants=variants, targets=target, threads=threads, formats=formats,
                            max_drop=max_drop, calib=calib, iters=iters, samples=samples, arm_iters=arm_iters,
                            arm_samples=arm_samples, remote_python=remote_python, taskset=taskset,
                            breakdown=breakdown, debug_numerics=debug_numerics)
    run_sweep(checkpoint, config, out, reuse)


@app.command()
def bundle(
    ctx: typer.Context,
    export_dir: Annotated[Path, typer.Argument(help="Export folder written by edgetl export.")],
    artifact: Annotated[str | None, typer.Option(
        help="File in EXPORT_DIR to bundle, e.g. efficientnet_lite0-224-int8.tflite (optional if only one, or when "
             "the run's sweep recommends one).")] = None,
    platform: Annotated[str, typer.Option(help="Comma list of android, ios.")] = "android,ios",
    out: Annotated[Path | None, typer.Option(
        "--out", help="Bundle folder (default: RUN/bundle/<artifact name>).")] = None,
    golden: Annotated[int, typer.Option(help="Golden images for the on-device self-test.")] = 5,
    top_k: Annotated[int, typer.Option(help="Top-k stored per golden image.")] = 3,
    metadata: Annotated[bool, typer.Option(
        "--metadata/--no-metadata", help="Write TFLite metadata (labels, normalisation) into a .tflite.")] = True,
    int8_io: Annotated[bool, typer.Option(
        help="Keep an int8 .tflite's int8 input/output (apps quantize; MediaPipe then refuses it).")] = False,
    settings: Settings = None,
) -> None:
    """Bundle an exported file into an Android module and an iOS package, with a golden self-test."""
    from edgetl.bundle import run_bundle
    from edgetl.config import resolve

    options = resolve("bundle", None, settings, **_given(
        ctx, {"platforms": "platform"}, artifact=artifact, platforms=platform, out=out, golden=golden, top_k=top_k,
        metadata=metadata, int8_io=int8_io))
    run_bundle(export_dir, options)


@app.command()
def demo(
    run_dir: Annotated[Path, typer.Option("--out", help="Run folder.")] = Path("runs/demo"),
    fast: Annotated[
        bool, typer.Option(help="Fewer epochs and a smaller input (a smoke run, not the figures).")
    ] = False,
    framework: Annotated[str, typer.Option(
        help="torch (pretrained efficientnet_lite0, .tflite and .pte) or keras (tf_keras mobilenet_v2, .tflite; "
        "offline it starts from --weights none and says so).")] = "torch",
) -> None:
    """The whole pipeline, offline, on builtin:fashion-mnist-mini with pretrained efficientnet_lite0."""
    from edgetl.demo import run_demo

    run_demo(run_dir, fast=fast, framework=framework)


def _usage_error_types() -> tuple[type[BaseException], ...]:
    """Usage errors come from typer's own copy of click (typer >= 0.29) or from click itself (older typer)."""
    found: list[type[BaseException]] = []
    try:
        from typer._click import exceptions as bundled

        found.append(bundled.ClickException)
    except ImportError:
        pass
    try:
        import click

        found.append(click.ClickException)
    except ImportError:
        pass
    return tuple(found)


def _given_value(error: BaseException, argv: list[str]) -> str | None:
    """The text the user gave for the option a BadParameter is about (some typer releases do not repeat it)."""
    param = getattr(error, "param", None)
    names = [name for name in getattr(param, "opts", []) if name.startswith("-")]
    for index, arg in enumerate(argv):
        for name in names:
            if arg == name and index + 1 < len(argv):
                return argv[index + 1]
            if arg.startswith(name + "="):
                return arg[len(name) + 1:]
    return None


def _usage_line(error: BaseException, argv: list[str]) -> str:
    """click's several-line usage message as one line that names the value given and says where the help is."""
    message = " ".join(str(error.format_message()).split())  # type: ignore[attr-defined]
    value = _given_value(error, argv)
    if value is not None and repr(value) not in message:
        message = message.rstrip(".") + f" (got {value!r})"
    context = getattr(error, "ctx", None)
    command = getattr(context, "command_path", None) or "edgetl"
    return f"{message} (see: {command} --help)"


def run(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit status (see edgetl.errors for what each one means)."""
    debug = os.environ.get("EDGETL_DEBUG") == "1"
    watch_interrupts()
    try:
        status = app(args=argv, prog_name="edgetl", standalone_mode=False)
    except SystemExit:
        raise
    except BaseException as error:
        from edgetl.paths import remove_empty_created

        remove_empty_created()
        usage = _usage_error_types()
        if usage and isinstance(error, usage):
            if type(error).__name__ == "NoArgsIsHelpError":  # plain `edgetl`: its help is the answer
                typer.echo(error.format_message())  # type: ignore[attr-defined]
                return EXIT_OK
            if debug:
                traceback.print_exception(error)
            typer.echo(f"edgetl: error: {_usage_line(error, sys.argv[1:] if argv is None else argv)}", err=True)
            return EXIT_USAGE
        known = exit_status(error)
        if known is None:
            raise
        if debug:  # the traceback is added; the status stays the one the error means
            traceback.print_exception(error)
        typer.echo(f"edgetl: {'' if is_interruption(known[0]) else 'error: '}{known[1]}", err=True)
        if is_interruption(known[0]):
            forget_interrupt()
        return known[0]
    if status == EXIT_INTERRUPTED:  # typer >= 0.29 turns Ctrl-C into Exit(130) and returns the code
        status = requested_status() or EXIT_INTERRUPTED
        typer.echo(f"edgetl: {interruption_line(status)}", err=True)
        forget_interrupt()
    elif interrupt_requested():  # pressed, but swallowed by a library after the last folder was published
        status = requested_status()
        what = "terminated (SIGTERM)" if status == EXIT_TERMINATED else "interrupted"
        typer.echo(f"edgetl: {what} after the stage had published its output (complete)", err=True)
        forget_interrupt()
    return status if isinstance(status, int) else EXIT_OK


def main() -> None:
    """Entry point: every error edgetl knows is one line and its exit status; EDGETL_DEBUG=1 shows tracebacks."""
    sys.exit(run())


if __name__ == "__main__":
    main()

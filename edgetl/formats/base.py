"""What a model format is to edgetl: one record per format, kept in the format's own module."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AppTemplates:
    """How `edgetl bundle` packages a format for apps. Text may hold `{executorch}` (the ExecuTorch version that
    wrote the file) and `{package}` (the iOS library's name); the Kotlin and Swift classifiers are the templates
    `ImageClassifier.<format>.kt` and `.swift`."""

    android_dependency: str  # the Gradle coordinate of the Android runtime
    android_note: str  # what the generated build file says about that runtime
    ios_manifest: str  # the template that packages the iOS library: Package.swift (SwiftPM) or a CocoaPods podspec
    ios_readme: tuple[str, ...]  # the bundle README's iOS section, one line each
    device_bench_readme: tuple[str, ...] = ()  # more lines for the README's device_bench section


@dataclass(frozen=True)
class Format:
    """One file format edgetl makes, runs and ships.

    The stages ask these fields instead of testing a format's name; a new format is a module that defines its
    record, `run` and `describe`, and one line in `edgetl.formats.MODULES`."""

    name: str  # what --formats and the manifests call it
    suffix: str  # the file name's ending
    runtime: str  # the runtime that runs it, as the manifests name it
    converters: dict[str, str]  # framework → how that framework's checkpoints are converted to it
    # how bench --breakdown gets a file's blocks: "cut" out of the file itself, or "lowered" one by one at export
    # (export --parts); None: not cut
    blocks: str | None = None
    # how device_bench runs it on an emulated or remote ARM64 CPU: "python" (the runtime's Python wheel, in the
    # guest) or "runner" (edgetl's native runner, cross-compiled by `edgetl bench --setup arm64`)
    arm64: str = "python"
    # with arm64 "python": the aarch64 wheel (pinned) the emulated guest installs, and the module that proves it
    # imports there (`edgetl bench --setup arm64`)
    guest: tuple[str, str] | None = None
    # with arm64 "python": other distributions that run it as well on a remote machine (`ssh:` targets), and the
    # machines (`uname -m`) its wheel is published for (empty: every machine pip serves)
    alternatives: tuple[str, ...] = ()
    wheel_machines: tuple[str, ...] = ()
    # with arm64 "runner": the machine the runner is built for, and the Python distributions that run the file on
    # any other machine instead (the first is the runtime; `pip install` gets them all)
    runner_machine: str = "aarch64"
    python_runtime: tuple[str, ...] = ()
    python_runtime_index: str | None = None  # the package index those come from, when it is not PyPI's
    # whether an int8 file takes float input and quantizes it inside the graph (its sidecar then says with what
    # scale and zero point, for apps that feed it int8 themselves)
    quantizes_inside: bool = False
    bundle: AppTemplates | None = None  # its Android/iOS templates; None: `edgetl bundle` does not ship it
    default: bool = True  # made when --formats is not given
    libraries: tuple[str, ...] = ()  # distributions (converter, runtime) whose versions the manifests record
    style: tuple[str, str] = ("tab:gray", "o")  # colour and marker in plots
    extra: dict[str, str] = field(default_factory=dict)  # anything else a table prints about it

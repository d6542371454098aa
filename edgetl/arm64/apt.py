"""A private apt: Debian package indexes, downloads and unpacking inside edgetl's cache folder.

Why: the emulated userland needs arm64 packages and the benchmark needs a qemu-user build and a cross
compiler, but nothing here may install into the system.  apt-get with its state, lists and cache
redirected into the cache folder resolves dependencies exactly as Debian does; `dpkg-deb -x` unpacks.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from edgetl.errors import UserError

DEBIAN_SUITE = "bookworm"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


def mirrors() -> tuple[str, str]:
    """Debian main and security mirrors; EDGETL_DEBIAN_MIRROR / EDGETL_DEBIAN_SECURITY override them."""
    return (os.environ.get("EDGETL_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
            os.environ.get("EDGETL_DEBIAN_SECURITY", "http://deb.debian.org/debian-security"))


def host_arch() -> str:
    """The host's Debian architecture name (amd64, arm64...)."""
    done = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "amd64"


def require_tools() -> None:
    """apt-get and dpkg-deb are what the set-up is built on; say so plainly when they are missing."""
    missing = [tool for tool in ("apt-get", "dpkg-deb", "dpkg") if shutil.which(tool) is None]
    if missing:
        raise UserError(f"arm64 set-up needs {', '.join(missing)} (a Debian or Ubuntu host); not found on PATH")
    if not KEYRING.is_file():
        raise UserError(f"arm64 set-up needs Debian's archive keyring {KEYRING} "
                        "(apt-get install debian-archive-keyring)")


class PrivateApt:
    """apt-get confined to one folder: its own sources, lists, download cache and (optionally) status."""

    def __init__(self, root: Path, arch: str, *, source_packages: bool = False, empty_status: bool = False):
        self.root = root
        self.arch = arch
        self.source_packages = source_packages
        self.empty_status = empty_status

    def _options(self) -> list[str]:
        r = self.root
        status = r / "status" if self.empty_status else Path("/var/lib/dpkg/status")
        options = {
            "Dir::State": r / "state", "Dir::State::Lists": r / "lists", "Dir::State::status": status,
            "Dir::Cache": r / "cache", "Dir::Cache::archives": r / "archives",
            "Dir::Etc::SourceList": r / "sources.list", "Dir::Etc::SourceParts": r / "sources.list.d",
            "Dir::Etc::Preferences": r / "preferences", "Dir::Etc::PreferencesParts": r / "preferences.d",
            "APT::Architecture": self.arch, "APT::Architectures": self.arch, "Debug::NoLocking": "1",
            "APT::Install-Recommends": "0", "Acquire::Languages": "none", "APT::Sandbox::User": "root",
        }
        if os.geteuid() != 0:
            options.pop("APT::Sandbox::User")
        return [part for key, value in options.items() for part in ("-o", f"{key}={value}")]

    def _run(self, *args: str, cwd: Path | None = None, what: str) -> str:
        cmd = ["apt-get", "-q", *self._options(), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, check=False)
        text = done.stdout + done.stderr
        # apt-get update exits 0 when every index failed to download: look at what it said too.
        fetch_failed = any(s in text for s in ("Failed to fetch", "Err:", "Could not resolve", "Temporary failure",
                                               "Connection failed", "Could not connect", "unreachable"))
        if done.returncode != 0 or (args[0] == "update" and fetch_failed):
            errors = [ln for ln in text.splitlines() if ln.startswith(("E:", "Err:", "W: Failed"))]
            why = "; ".join(errors[-2:]) or done.stderr.strip()[-300:]
            hint = (f" (offline? the arm64 set-up downloads from {mirrors()[0]}; set EDGETL_DEBIAN_MIRROR "
                    "to a reachable Debian mirror)") if fetch_failed else ""
            raise UserError(f"arm64 set-up: {what} failed{hint}: {why}")
        return done.stdout

    def update(self) -> None:
        """Write the sources and fetch the package indexes."""
        for sub in ("state", "lists/partial", "cache", "archives/partial", "sources.list.d", "preferences.d"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "preferences").write_text("")
        if self.empty_status:
            (self.root / "status").write_text("")
        main, security = mirrors()
        kind = "deb-src" if self.source_packages else "deb"
        suites = [(main, f"{DEBIAN_SUITE} {DEBIAN_SUITE}-updates")]
        if not self.source_packages:
            suites.append((security, f"{DEBIAN_SUITE}-security"))
        text = "".join(f"Types: {kind}\nURIs: {uri}\nSuites: {names}\nComponents: main\nSigned-By: {KEYRING}\n\n"
                       for uri, names in suites)
        (self.root / "sources.list.d" / "edgetl.sources").write_text(text)
        (self.root / "sources.list").write_text("")
        self._run("update", what=f"apt-get update ({self.arch}{' sources' if self.source_packages else ''})")

    def closure(self, packages: list[str]) -> list[str]:
        """The packages apt would install for these (dependencies included), against this apt's status."""
        out = self._run("-s", "install", *packages, what=f"resolving {' '.join(packages)}")
        return [m.group(1) for m in re.finditer(r"^Inst (\S+)", out, flags=re.M)]

    def download(self, packages: list[str], dest: Path) -> list[Path]:
        """Download .deb files into dest (apt-get download writes to its working folder)."""
        dest.mkdir(parents=True, exist_ok=True)
        self._run("download", *packages, cwd=dest, what=f"downloading {len(packages)} {self.arch} packages")
        return sorted(dest.glob("*.deb"))

    def source(self, package: str, dest: Path) -> None:
        """Download a source package (its .dsc, orig and debian tarballs) into dest."""
        dest.mkdir(parents=True, exist_ok=True)
        self._run("source", "--download-only", package, cwd=dest, what=f"downloading the {package} source")


def unpack(debs: list[Path], into: Path) -> None:
    """Unpack .deb files into a folder, as dpkg would lay them out, without running their scripts."""
    into.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        done = subprocess.run(["dpkg-deb", "-x", str(deb), str(into)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise UserError(f"arm64 set-up: cannot unpack {deb.name}: {done.stderr.strip()}")


def package_versions(debs: list[Path]) -> dict[str, str]:
    """name → version, read from the .deb file names apt wrote (name_version_arch.deb, version %-escaped)."""
    from urllib.parse import unquote

    versions = {}
    for deb in debs:
        name, version, _ = deb.name[:-4].split("_", 2)
        versions[name] = unquote(version)
    return versions

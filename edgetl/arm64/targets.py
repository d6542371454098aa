"""Benchmark targets: the host CPU and emulated ARM64 phone CPUs.

Why each ARM target is what it is: instruction counts need the TCG plugin, which only the dynamic
qemu-user 7.2 build loads, and 7.2 models a53, a72, a76, neoverse-n1 and max.  A count depends on the
instruction set and on which kernels the runtime picks, and runtimes pick kernels from the CPU's
features (the auxiliary vector qemu fills from the CPU model) and from its part number (read from
/proc/cpuinfo, which edgetl writes per target).  So a Cortex-A55 is emulated as qemu's cortex-a76 (the
same ARMv8.2-A + dotprod instruction set) with an A55 /proc/cpuinfo, and an ARMv9 Cortex-A710 as qemu's
`max` with SVE and SME switched off (phones' runtimes don't use them; max adds i8mm and bf16 as the
A710 has) with an A710 /proc/cpuinfo.  The JSON says which qemu model gave each count.
"""

from __future__ import annotations

from dataclasses import dataclass

_V80 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"
_V82_DOT = _V80 + " atomics fphp asimdhp asimdrdm lrcpc dcpop asimddp"
_V9 = (_V82_DOT + " jscvt fcma sha3 sm3 sm4 sha512 asimdfhm dit uscat ilrcpc flagm ssbs sb paca pacg dcpodp"
       " flagm2 frint i8mm bf16 bti")


@dataclass(frozen=True)
class Target:
    """Where a benchmark runs: `host`, or an emulated ARM64 CPU."""

    name: str
    description: str
    qemu_cpu: str | None = None  # the -cpu argument of qemu-aarch64 7.2
    part: int = 0  # MIDR part number written to the fake /proc/cpuinfo
    variant: int = 0
    revision: int = 0
    architecture: int = 8
    features: str = ""
    note: str = ""

    @property
    def emulated(self) -> bool:
        return self.qemu_cpu is not None

    def cpuinfo(self, processors: int) -> str:
        """An ARM /proc/cpuinfo as a kernel on this CPU prints it (LiteRT crashes on qemu's x86 one)."""
        block = (f"BogoMIPS\t: 50.00\nFeatures\t: {self.features}\nCPU implementer\t: 0x41\n"
                 f"CPU architecture: {self.architecture}\nCPU variant\t: 0x{self.variant:x}\n"
                 f"CPU part\t: 0x{self.part:03x}\nCPU revision\t: {self.revision}\n\n")
        return "".join(f"processor\t: {i}\n{block}" for i in range(processors))

    def midr(self) -> str:
        """MIDR_EL1 as Linux exposes it in sysfs (ExecuTorch's cpuinfo reads this file)."""
        value = (0x41 << 24) | (self.variant << 20) | (0xF << 16) | (self.part << 4) | self.revision
        return f"0x{value:016x}\n"


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("host", "this machine's CPU, real time"),
    Target("arm64-a53", "Cortex-A53 (ARMv8.0, in-order little core, no dotprod)", "cortex-a53", 0xD03, 0, 4,
           features=_V80),
    Target("arm64-a55", "Cortex-A55 (ARMv8.2 + dotprod little core)", "cortex-a76", 0xD05, 2, 0,
           features=_V82_DOT, note="qemu 7.2 has no cortex-a55: its cortex-a76 model has the same "
           "ARMv8.2-A + dotprod instruction set; /proc/cpuinfo says A55 so runtimes pick A55 kernels"),
    Target("arm64-a72", "Cortex-A72 (ARMv8.0 big core, no dotprod)", "cortex-a72", 0xD08, 0, 3, features=_V80),
    Target("arm64-a76", "Cortex-A76 (ARMv8.2 + dotprod big core)", "cortex-a76", 0xD0B, 4, 1, features=_V82_DOT),
    Target("arm64-n1", "Neoverse-N1 (ARMv8.2 + dotprod server core)", "neoverse-n1", 0xD0C, 4, 1,
           features=_V82_DOT),
    Target("arm64-a710", "Cortex-A710 (ARMv9 + i8mm big core)", "max,sve=off,sme=off", 0xD47, 2, 0,
           architecture=8, features=_V9, note="qemu 7.2 has no cortex-a710: counted on `max` with SVE and SME "
           "off (ARMv9 features incl. i8mm, bf16); /proc/cpuinfo says A710"),
)}

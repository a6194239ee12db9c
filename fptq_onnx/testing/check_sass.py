#!/usr/bin/env python3
"""Checks the machine code of the W4A8 CUDA kernels without a GPU (cuobjdump / nvdisasm only).

    python -m fptq_onnx.testing.check_sass LIB [--ptxas-log build/cuda_standalone/ptxas.log] [--json OUT]

LIB: libfptq_ops.so (pip install) or build/cuda_standalone/libfptq_cuda_standalone.so. Asserts:

* every kernel of every target: no local memory (cuobjdump -res-usage STACK:0 LOCAL:0, no LDL/STL
  in the SASS), at most 255 registers;
* sm_80 and sm_90 code: int8 mma.sync (IMMA.16832.S8.S8) in the mma.sync GEMM;
* sm_90a code (when the library has it): the TMA kernel (w4a8_cuda_sm90_tma.cu,
  `w4a8_tma_kernel<BT, OVERLAP, FUSEQ>`): in every instance int8 wgmma (IGMMA ... .S8.S8),
  bulk copies (UBLKCP: the TMA engine), mbarrier waits and transaction arrives (SYNCS.PHASECHK,
  SYNCS.ARRIVE.TRANS64), register reallocation (USETMAXREG), wgmma with its A operand in
  registers (`IGMMA... Rd, Ra, gdesc[..]`), and the OVERLAP instances two accumulator sets
  (two distinct IGMMA destination bases);
* with --ptxas-log (the -Xptxas -v output of the build): no spill bytes, and no ptxas note
  that wgmma was serialized or setmaxnreg ignored (C7508, C7510, C7512, C7517-C7518) for the
  TMA kernel.

Exit status 0 when all hold, 1 otherwise (each failure printed); prints a per-kernel table.
tests/test_build_cuda.py runs the same checks on the installed library.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

# ptxas notes that mean the TMA kernel's wgmmas or register plan did not come out as written.
BAD_PTXAS_NOTES = ("C7508", "C7510", "C7512", "C7517", "C7518")


def find_tool(name: str) -> str | None:
    """A CUDA binary tool from PATH, the CUDA install or the nvidia-cu13 wheel of this Python."""
    found = shutil.which(name)
    if found:
        return found
    purelib = sysconfig.get_paths()["purelib"]
    for pattern in (f"/usr/local/cuda/bin/{name}", f"{purelib}/nvidia/cu*/bin/{name}",
                    f"{purelib}/nvidia/cuda_{name}/bin/{name}"):
        for candidate in sorted(glob.glob(pattern)):
            if os.access(candidate, os.X_OK):
                return candidate
    return None


def short_name(mangled: str) -> str:
    """A readable kernel name: the template name and its integer / bool arguments."""
    m = re.search(r"\d(w4a8_tma_kernel|w4a8_gemm_kernel|quantize_rows_kernel|"
                  r"splitk_reduce_kernel|repack_weights_kernel|repack_scales_kernel)(I.*)?$", mangled)
    if not m:
        return mangled[-60:]
    args = re.findall(r"Li(\d+)E|Lb(\d)E", m.group(2) or "")
    flat = [a or b for a, b in args]
    return m.group(1) + (f"<{','.join(flat)}>" if flat else "")


def per_function(text: str, function_re: str):
    """Yields (arch, mangled function, line) for the lines of cuobjdump output that follow a
    function header (matched by function_re, group 1 the name) under an `arch = sm_XX` line."""
    arch, fn = None, None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(function_re, line)
        if m:
            fn = m.group(1)
            yield arch, fn, None
            continue
        if fn is not None:
            yield arch, fn, line


def parse_sass(text: str) -> dict:
    """{(arch, mangled function): [instruction lines]} from cuobjdump -sass output."""
    out: dict = {}
    for arch, fn, line in per_function(text, r"\s*Function : (\S+)"):
        instrs = out.setdefault((arch, fn), [])
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line or "")
        if m:
            instrs.append(m.group(1).strip())
    return out


def parse_res_usage(text: str) -> dict:
    """{(arch, mangled function): {'REG': .., 'STACK': .., 'LOCAL': ..}} from cuobjdump -res-usage."""
    out: dict = {}
    for arch, fn, line in per_function(text, r"\s*Function (\S+):"):
        if line and "REG:" in line and (arch, fn) not in out:
            out[(arch, fn)] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
    return out


def opcode(instr: str) -> str:
    """The mnemonic of an instruction line (predicate guard dropped)."""
    parts = instr.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def check(lib: str, ptxas_log: str | None = None) -> tuple[list[str], list[dict]]:
    """Returns (failures, rows): one row per (arch, kernel) with what was found."""
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        raise FileNotFoundError("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm)")
    env = dict(os.environ, PATH=f"{os.environ.get('PATH', '')}:{Path(cuobjdump).parent}")  # nvdisasm
    sass = subprocess.run([cuobjdump, "-sass", lib], capture_output=True, text=True, env=env, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", lib], capture_output=True, text=True, env=env, check=True).stdout
    funcs, usage = parse_sass(sass), parse_res_usage(res)
    failures: list[str] = []
    rows: list[dict] = []
    archs = {arch for arch, _ in funcs}
    for (arch, fn), instrs in sorted(funcs.items()):
        name = short_name(fn)
        ops = [opcode(i) for i in instrs]
        u = usage.get((arch, fn), {})
        row = dict(arch=arch, kernel=name, regs=u.get("REG"), stack=u.get("STACK"), local=u.get("LOCAL"),
                   imma=sum(o.startswith("IMMA") for o in ops), igmma=sum(o.startswith("IGMMA") for o in ops),
                   ublkcp=sum(o.startswith("UBLKCP") for o in ops), utmaldg=sum(o.startswith("UTMALDG") for o in ops),
                   syncs=sum(o.startswith("SYNCS") for o in ops), setmaxreg=sum(o.startswith("USETMAXREG") for o in ops),
                   lmem=sum(o in ("LDL", "STL") or o.startswith(("LDL.", "STL.")) for o in ops),
                   # highest register used + 1: above `regs` (the count at entry) where setmaxnreg
                   # gave a warpgroup more
                   max_reg=1 + max((int(r) for i in instrs for r in re.findall(r"\bR(\d+)\b", i)), default=-1))
        rows.append(row)
        where = f"{arch} {name}"
        if row["lmem"] or u.get("STACK", 0) or u.get("LOCAL", 0):
            failures.append(f"{where}: local memory (LDL/STL {row['lmem']}, stack {u.get('STACK')}, local {u.get('LOCAL')})")
        if u.get("REG", 0) > 255:
            failures.append(f"{where}: {u['REG']} registers")
        if name.startswith("w4a8_gemm_kernel") and arch in ("sm_80", "sm_90") and not any(
                o.startswith("IMMA.16832.S8.S8") for o in ops):
            failures.append(f"{where}: no IMMA.16832.S8.S8 (int8 mma.sync)")
        if name.startswith("w4a8_tma_kernel") and arch == "sm_90a":
            if not any(o.startswith("IGMMA") and o.endswith(".S8.S8") for o in ops):
                failures.append(f"{where}: no int8 IGMMA")
            for what, ok in (("UBLKCP (bulk copy)", row["ublkcp"] > 0),
                             ("SYNCS.PHASECHK (mbarrier wait)", any(o.startswith("SYNCS.PHASECHK") for o in ops)),
                             ("SYNCS.ARRIVE.TRANS64 (mbarrier arrive / expect_tx)",
                              any(o.startswith("SYNCS.ARRIVE.TRANS64") for o in ops)),
                             ("USETMAXREG (setmaxnreg)", row["setmaxreg"] >= 2)):
                if not ok:
                    failures.append(f"{where}: no {what}")
            gmma = [i for i in instrs if opcode(i).startswith("IGMMA")]
            reg_a = [i for i in gmma if re.search(r"IGMMA\S*\s+R\d+,\s*R\d+,\s*gdesc", i)]
            if not reg_a or len(reg_a) != len(gmma):
                failures.append(f"{where}: {len(gmma) - len(reg_a)} of {len(gmma)} IGMMA do not take A from registers")
            bases = {re.search(r"IGMMA\S*\s+(R\d+),", i).group(1) for i in gmma}
            row["acc_sets"] = len(bases)
            targs = re.findall(r"\d+", name.split("<", 1)[1]) if "<" in name else []
            overlap = len(targs) >= 2 and targs[1] == "1"  # w4a8_tma_kernel<BT, OVERLAP, FUSEQ>
            if overlap and len(bases) < 2:
                failures.append(f"{where}: OVERLAP instance with {len(bases)} accumulator set(s)")
    for arch in ("sm_80", "sm_90"):
        if arch not in archs:
            failures.append(f"no {arch} machine code in {lib}")
    if "sm_90a" in archs and not any(r["kernel"].startswith("w4a8_tma_kernel") for r in rows if r["arch"] == "sm_90a"):
        failures.append("sm_90a code without the TMA kernel (w4a8_cuda_sm90_tma.cu)")
    if ptxas_log:
        text = Path(ptxas_log).read_text()
        for line in text.splitlines():
            m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if m and (int(m.group(1)) or int(m.group(2))):
                failures.append(f"ptxas: {line.strip()}")
            if "w4a8_tma_kernel" in line and any(code in line for code in BAD_PTXAS_NOTES):
                failures.append(f"ptxas: {line.strip()[:200]}")
    return failures, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("lib")
    ap.add_argument("--ptxas-log", default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    failures, rows = check(args.lib, args.ptxas_log)
    cols = ["arch", "kernel", "regs", "max_reg", "imma", "igmma", "ublkcp", "syncs", "setmaxreg", "lmem"]
    print("  ".join(f"{c:>8}" if c != "kernel" else f"{c:<34}" for c in cols))
    for r in rows:
        if r["imma"] or r["igmma"] or r["ublkcp"]:
            print("  ".join(f"{str(r[c]):>8}" if c != "kernel" else f"{r[c]:<34}" for c in cols))
    if args.json:
        args.json.write_text(json.dumps(dict(failures=failures, kernels=rows), indent=1))
    for f in failures:
        print(f"FAIL: {f}")
    print("SASS checks: " + ("PASS" if not failures else f"{len(failures)} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

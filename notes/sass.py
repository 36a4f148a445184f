"""
Offline look at the scan kernels' machine code, no GPU needed: compiles one of them for sm_90 (an H100 /
H200) with the installed Triton's own ptxas, as the launchers would call it at d_state 16 (BD 32, one warp,
bf16 activations, z, D, delta bias and pos present), and prints its registers and stack, an instruction
histogram of each loop, and (--waits) where a loop waits on a scoreboard whose latest producer is a load.

ptxas gives a loop's loads one or a few scoreboards, and an instruction that waits on one waits for every
load on it: a wait a few instructions after a load exposes that load's whole latency, however early the
value it needs was loaded (notes/perf.md). Counts differ between Triton versions (notes/perf.md's are from
Triton 3.6, what the H200 runs). Run from the repository root:
    python notes/sass.py adjoint --waits
    python notes/sass.py adjoint --maxnreg 168   # as _bwd_grid caps it where whole rows underfill the GPU
    python notes/sass.py fwd --kernels path/to/other/kernels.py   # another version of the file
    python notes/sass.py carry --reverse
"""
import argparse
import collections
import importlib.util
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = {"fwd": "_scan_fwd_kernel", "states": "_scan_bwd_states_kernel", "adjoint": "_scan_bwd_adjoint_kernel",
           "carry": "_scan_carry_kernel"}
BF16 = {"u_ptr", "dl_ptr", "z_ptr", "out_ptr", "dout_ptr", "du_ptr", "ddl_ptr", "dz_ptr"}


def compile_kernel(module, which, reverse, maxnreg=None):
    """The cubin of one scan kernel, with the constants and argument types its launcher gives it."""
    backward = which in ("states", "adjoint") or (which == "carry" and reverse)
    # the backward's carry pass: since v17 a kernel of its own, summing tiles of T tokens on num_warps warps
    tiles = getattr(module, "SCAN_CARRY_BWD_CONFIG", None) if which == "carry" and reverse else None
    fn = getattr(module, "_scan_carry_bwd_kernel" if tiles else KERNELS[which])
    bc_lanes = backward  # as SCAN_*_CONFIG choose at d_state 16
    # EVEN_D: the backward's launcher drops the channel masks at d_inner a multiple of 32, the forward's does not
    consts = dict(N=16, BD=32, CHUNK=module.CHUNK, LOG2_N=4, LOG2_BD=5, HAS_D=True, HAS_Z=True, EVEN=True,
                  EVEN_D=backward, HAS_BIAS=True, HAS_POS=True, SOFTPLUS=True, BC_LANES=bc_lanes,
                  ATOMIC=True)  # dB and dC added up in place (no torch.use_deterministic_algorithms)
    if tiles:
        consts["T"] = tiles["T"]
    # after the states pass, the backward reads dt and dL/dy (fp32) in delta's and dout's place
    bf16 = BF16 - {"dl_ptr", "dout_ptr"} if backward and which != "states" else BF16
    # the forward's launcher copies B and C to fp32 where every lane reads all of them (not BC_LANES)
    bc_type = "*bf16" if bc_lanes else "*fp32"
    signature, constexprs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            constexprs[(i,)] = consts[name]
        elif name in ("B_ptr", "C_ptr"):
            signature[name] = bc_type
        elif name == "pos_ptr":
            signature[name] = "*i32"
        elif name.endswith("_ptr"):
            signature[name] = "*bf16" if name in bf16 else "*fp32"
        else:
            signature[name] = "i32"
    src = ASTSource(fn, signature=signature, constexprs=constexprs)
    options = dict(num_warps=tiles["num_warps"] if tiles else 1, maxnreg=maxnreg)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


def instructions(sass):
    """(address, text, write scoreboard, wait mask) of each instruction in a cuobjdump listing. The control
    bits sit at 105-125 of the 128-bit word: 4 stall, 1 yield, 3 write scoreboard, 3 read scoreboard, 6 wait."""
    lines = sass.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);\s+/\* (0x[0-9a-f]+) \*/", line)
        if m:
            ctrl = (int(re.search(r"/\* (0x[0-9a-f]+) \*/", lines[i + 1]).group(1), 16) >> 41) & 0x1FFFFF
            out.append((int(m.group(1), 16), m.group(2).strip(), (ctrl >> 5) & 7, (ctrl >> 11) & 0x3F))
    return out


def loops(ins):
    """[(first, last) address] of every backward branch's loop."""
    found = []
    for addr, text, _, _ in ins:
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            found.append((int(m.group(1), 16), addr))
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=list(KERNELS), help="which scan kernel")
    parser.add_argument("--reverse", action="store_true", help="carry: the backward's (adjoint) version")
    parser.add_argument("--maxnreg", type=int, help="a register cap, as the launch option")
    parser.add_argument("--waits", action="store_true", help="list the waits on loads inside each loop")
    parser.add_argument("--kernels", default="kernels.py", help="the kernels.py to compile (default: this one)")
    args = parser.parse_args()
    if not os.path.isfile(args.kernels):
        parser.error(f"--kernels {args.kernels}: no such file")
    spec = importlib.util.spec_from_file_location("kernels_under_test", args.kernels)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cubin = compile_kernel(module, args.kernel, args.reverse, args.maxnreg)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    print(f"{KERNELS[args.kernel]}{' (reverse)' if args.reverse else ''}, sm_90, triton {triton.__version__}:",
          " ".join(re.findall(r"REG:\d+|STACK:\d+", usage)))
    ins = instructions(sass)
    for lo, hi in loops(ins):
        body = [x for x in ins if lo <= x[0] <= hi]
        ops = collections.Counter(text.split()[1 if text.startswith("@") else 0].split(".")[0]
                                  for _, text, _, _ in body)
        print(f"loop {lo:#x}-{hi:#x}: {len(body)} instructions;", " ".join(f"{k}:{v}" for k, v in ops.most_common(12)))
        if not args.waits:
            continue
        for k, (addr, text, _, wait) in enumerate(body):
            for sb in range(6):
                if wait >> sb & 1:
                    back = next((j for j in range(1, len(body) + 1) if body[(k - j) % len(body)][2] == sb), None)
                    producer = body[(k - back) % len(body)][1] if back else ""
                    if re.search(r"\bLD[GL]", producer):
                        print(f"    {addr:#07x} waits on scoreboard {sb}, {back} instructions after "
                              f"its latest load ({producer[:44]}): {text[:40]}")


if __name__ == "__main__":
    main()

"""
Offline look at the scan kernels' machine code, no GPU needed: compiles one of them for sm_90 (an H100 /
H200) with the installed Triton's own ptxas, exactly as its launcher calls it at bench.py's shape (8 x 2048
tokens, d_state 16, bf16 activations, z, D, delta bias and pos present, --width d_inner; the launch is
recorded on CPU tensors, its arguments specialized as Triton's launcher does), and prints its registers and
stack, an instruction histogram of each loop, and (--waits) where a loop waits on a scoreboard whose latest
producer is a load. (Before v21 it compiled without the launcher's specializations, which for the forward
and its carry pass gave other code than the GPU ran: notes/perf.md v21.)

ptxas gives a loop's loads one or a few scoreboards, and an instruction that waits on one waits for every
load on it: a wait a few instructions after a load exposes that load's whole latency, however early the
value it needs was loaded (notes/perf.md). Counts differ between Triton versions (notes/perf.md's are from
Triton 3.6, what the H200 runs). Run from the repository root:
    python notes/sass.py adjoint --waits
    python notes/sass.py adjoint --maxnreg 168   # as _bwd_grid caps it where whole rows underfill the GPU
    python notes/sass.py fwd --kernels path/to/other/kernels.py   # another version of the file
    python notes/sass.py carry --reverse
    python notes/sass.py states --width 1536
"""
import argparse
import collections
import importlib.util
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend

KERNELS = {"fwd": "_scan_fwd_kernel", "states": "_scan_bwd_states_kernel", "adjoint": "_scan_bwd_adjoint_kernel",
           "carry": "_scan_carry_kernel"}
CARRY_BWD = "_scan_carry_bwd_kernel"  # carry --reverse: the backward's carry pass, a kernel of its own since v17


class Recorder:
    """Stands in for a Triton kernel: records each launch's arguments instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def launches(module, width):
    """Each scan kernel's launches [(args, kwargs)] as module's launchers make them for one forward and backward
    at bench.py's shape (8 rows x 2048 tokens, documents of 300 tokens, d_inner width, d_state 16, bf16, z, D and
    delta bias present) on an H200 (132 multiprocessors): CPU tensors that no kernel reads."""
    names = [*KERNELS.values(), CARRY_BWD, "_scan_combine_kernel"]
    saved = {name: getattr(module, name) for name in names}
    saved_sm = module._sm_count
    recorders = {name: Recorder() for name in names}
    try:
        for name, recorder in recorders.items():
            setattr(module, name, recorder)
        module._sm_count = lambda device: 132
        Bb, L, N = 8, 2048, 16
        act = dict(dtype=torch.bfloat16)
        u, delta, z, dout = (torch.empty(Bb, L, width, **act) for _ in range(4))
        A, D, bias = torch.empty(width, N), torch.empty(width), torch.empty(width)
        B, C = torch.empty(Bb, L, N, **act), torch.empty(Bb, L, N, **act)
        pos = (torch.arange(L, dtype=torch.int32) % 300).expand(Bb, L).contiguous()
        _, states = module.scan_fwd_triton(u, delta, A, B, C, D, z, bias, pos, True)
        module.scan_bwd_triton(dout, u, delta, A, B, C, D, z, bias, pos, states, True)
    finally:
        for name, fn in saved.items():
            setattr(module, name, fn)
        module._sm_count = saved_sm
    return {name: recorder.launches for name, recorder in recorders.items()}


def compile_kernel(module, which, reverse, maxnreg=None, width=4096):
    """The cubin of one scan kernel as the GPU runs it: compiled for its first launch at bench.py's shape
    (launches), every argument specialized as Triton's launcher does (pointers 16-byte aligned, integers
    divisible by 16 marked so, an integer 1 a constant): without that, the forward and its carry pass
    compiled to other code than the GPU ran (notes/perf.md v21). maxnreg: a register cap instead of the
    launcher's."""
    name = CARRY_BWD if which == "carry" and reverse else KERNELS[which]
    runs = launches(module, width)[name]
    if not runs:
        raise SystemExit(f"{name} is not launched at d_inner {width} (rows whole: no carry pass); try --width 1536")
    args, kwargs = runs[0]
    fn = getattr(module, name)
    backend = make_backend(GPUTarget("cuda", 90, 32))
    values = dict(zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, arg in enumerate(fn.arg_names):
        if fn.params[i].is_constexpr:
            signature[arg], constexprs[(i,)] = "constexpr", values[arg]
            continue
        kind, key = native_specialize_impl(backend, values[arg], False, True, True)
        signature[arg] = kind
        if kind == "constexpr":
            constexprs[(i,)] = key
        else:
            attrs[(i,)] = backend.parse_attr(key)
    options = {k: v for k, v in kwargs.items() if k not in fn.arg_names}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    src = ASTSource(fn, signature=signature, constexprs=constexprs, attrs=attrs)
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
    parser.add_argument("--maxnreg", type=int, help="a register cap instead of the launcher's")
    parser.add_argument("--width", type=int, help="d_inner of the launch compiled (default: 1536 for the carry "
                        "passes, which whole rows at 4096 do not launch; else 4096)")
    parser.add_argument("--waits", action="store_true", help="list the waits on loads inside each loop")
    parser.add_argument("--kernels", default="kernels.py", help="the kernels.py to compile (default: this one)")
    args = parser.parse_args()
    if not os.path.isfile(args.kernels):
        parser.error(f"--kernels {args.kernels}: no such file")
    spec = importlib.util.spec_from_file_location("kernels_under_test", args.kernels)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    width = args.width or (1536 if args.kernel == "carry" else 4096)
    cubin = compile_kernel(module, args.kernel, args.reverse, args.maxnreg, width)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", f.name],
                              capture_output=True, text=True, check=True).stdout
    print(f"{KERNELS[args.kernel]}{' (reverse)' if args.reverse else ''}, d_inner {width}, sm_90, "
          f"triton {triton.__version__}:",
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

"""
Where a packed training step's time goes: wall time per pass of bench.py's packed steps against the
time the host takes to queue them and the GPU kernel time torch.profiler records, for three ways of
compiling (bench.py's --compile blocks, the whole model, the whole model with CUDA graphs), and the
top kernels of each. Results: notes/results/prof_130m_h200.json, discussed in notes/perf.md. Run from
the repository root on a GPU:
    python notes/prof_step.py out_dir [preset]     # preset: 130m by default
"""
import collections
import json
import statistics
import sys
import time
import types

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, ".")
import bench  # noqa: E402
from model import MambaConfig, MambaLM  # noqa: E402

out = sys.argv[1]
preset = sys.argv[2] if len(sys.argv) > 2 else "130m"
args = types.SimpleNamespace(dist="d1", max_tokens=131072, data_dir="", seq_len=2048, batch_size=8,
                             vocab_size=50257, steps=0)
docs, vs, eot, _ = bench.make_documents(args)
res = {}
for variant in ["blocks", "on", "reduce-overhead"]:
    torch._dynamo.reset()
    model = MambaLM(MambaConfig.from_preset(preset, vocab_size=vs)).cuda()
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4, betas=(0.9, 0.95), fused=True)
    if variant == "blocks":
        run = model
        for layer in model.layers:
            layer.compile()
        model.head = torch.compile(model.head)
    else:
        run = torch.compile(model, mode=None if variant == "on" else variant)
    steps, _ = bench.make_batches("packed", docs, eot, vs, args, "cuda")
    real = sum(int((y != -1).sum()) for _, y, _ in steps)

    def one_pass():
        """-> (seconds until every step is queued, seconds until the GPU is done)"""
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x, y, pos in steps:
            if variant == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast("cuda", torch.bfloat16):
                _, loss = run(x, y, pos)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        return t1 - t0, time.perf_counter() - t0

    one_pass(), one_pass()  # compile, warm up
    passes = [one_pass() for _ in range(5)]
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        one_pass()
    kernels = collections.Counter()
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:90]] += e.device_time_total
    wall, host = statistics.median(p[1] for p in passes), statistics.median(p[0] for p in passes)
    res[variant] = {"wall_s": wall, "host_s": host, "gpu_kernel_ms": sum(kernels.values()) / 1e3,
                    "tokens_per_s": real / wall, "top": [(k, v / 1e3) for k, v in kernels.most_common(25)]}
    del model, opt, run
    torch.cuda.empty_cache()
res["env"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": bench.triton.__version__}
json.dump(res, open(f"{out}/prof_{preset}.json", "w"), indent=1)
for v in ("blocks", "on", "reduce-overhead"):
    r = res[v]
    print(f"{v:16s} wall {r['wall_s'] * 1e3:6.1f} ms/pass  host {r['host_s'] * 1e3:6.1f}  "
          f"GPU kernels {r['gpu_kernel_ms']:6.1f}  {r['tokens_per_s']:,.0f} tokens/s")

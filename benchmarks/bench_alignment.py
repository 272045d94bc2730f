"""G_ReLU-CKA: the batched kernel against modelsym's per-sample loop, and the whole measure at
its old and new default settings. Ratios are medians of interleaved runs (other jobs share the
machine); absolute times are only indicative.

1. Kernel, 2,000 samples of a 64-channel 16x16 layer (float32): batched Gram matrices with a
   running max over channel chunks (``kernel_of``) against the loop of modelsym's code, which
   forms column ``j`` of ``K_ij = max_c <H_ic, H_jc>`` as one elementwise product of the rows
   ``i < j`` with sample ``j`` (the lower triangle: ``N^2 / 2`` products, the same work as the
   batched side's block triangle). The loop is warmed up and timed on ``NAIVE_COLUMNS`` columns
   spread evenly over ``j`` (a column costs ``j`` rows), so ``N x`` their mean time estimates
   the whole kernel; the columns are checked against the batched kernel. Target: >= 20x.
2. The whole G_ReLU-CKA of two such layers of 5,000 samples streamed from HDF5 (two kernels
   and the unbiased HSIC), each run in its own process for its peak resident memory: the old
   default (float64, blocks sized by the 256 MiB budget: 2,048 rows here) against the new one
   (float32 kernels from 500-row blocks, float64 moments and sums), with the values' relative
   difference.

    python benchmarks/bench_alignment.py [repeats] [naive_columns] [samples]
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

N, C, S = 2000, 64, 16
SETTINGS = {  # label -> grelu_cka options
    "old default (float64, budget blocks)": {"dtype": "float64", "rows": 0},
    "new default (float32, 500 rows)": {},
}


def features(n, seed, shared=None):
    """ReLU features ``[n, C, S, S]``; with ``shared``, correlated with those (so CKA is far
    from 0 and its relative difference means something)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, C, S, S, generator=gen)
    if shared is not None:
        z = 0.6 * shared + 0.8 * z
    return torch.relu(z + 0.2), z


def standardise(x):
    """Per-channel centring and normalisation (as the batched kernel does)."""
    mean = x.mean((0, 2, 3), keepdim=True)
    z = x - mean
    return z / z.pow(2).sum((0, 2, 3), keepdim=True).sqrt()


def naive_columns(h, columns):
    """modelsym's loop on standardised ``h [N, C, S*S]``: column ``j`` from rows ``i < j``."""
    return {j: (h[:j] * h[j]).sum(-1).amax(1) for j in columns}


def kernel_part(repeats: int, naive_count: int) -> None:
    from pipeline.modelsym.cka import kernel_of

    x, _ = features(N, 0)
    columns = [round((k + 0.5) * N / naive_count) for k in range(naive_count)]
    naive_columns(standardise(x).reshape(N, C, -1), columns[-2:])  # warm-up
    kernel_of(x[:200], "grelu", channel_chunk=8, dtype=torch.float32)
    batched, naive, cpu_ratios = [], [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        K = kernel_of(x, "grelu", channel_chunk=8, dtype=torch.float32)
        batched.append(time.perf_counter() - start)
        batched_cpu = time.process_time() - cpu
        start, cpu = time.perf_counter(), time.process_time()
        h = standardise(x).reshape(N, C, -1)
        prepared, prepared_cpu = time.perf_counter(), time.process_time()
        cols = naive_columns(h, columns)
        naive.append(prepared - start + (time.perf_counter() - prepared) * N / naive_count)
        naive_cpu = prepared_cpu - cpu + (time.process_time() - prepared_cpu) * N / naive_count
        cpu_ratios.append(naive_cpu / batched_cpu)
    err = max((col - K[j, :j]).abs().max().item() for j, col in cols.items() if j)
    ratios = [n / b for n, b in zip(naive, batched, strict=True)]
    print(f"1. G_ReLU kernel, N={N}, C={C}, {S}x{S}, float32; median of {repeats} interleaved")
    print(f"  batched (bmm + running max):   {statistics.median(batched):8.2f} s")
    print(
        f"  modelsym loop (rows i < j):    {statistics.median(naive):8.2f} s  "
        f"(timed {naive_count} columns spread over j, extrapolated)"
    )
    print(
        f"  speed-up:                      {statistics.median(ratios):8.1f}x   (target >= 20x; "
        f"CPU time {statistics.median(cpu_ratios):.1f}x)"
    )
    print(f"  max |loop - batched| on the timed columns: {err:.2e}")


def peak_rss_gib() -> float:
    """This process's peak resident memory (``VmHWM``: unlike ``ru_maxrss`` it does not carry
    the forking parent's peak over ``exec``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def one_setting(options: str, folder: str) -> None:
    """Child process: one G_ReLU-CKA; prints wall, CPU seconds, peak RSS and the value."""
    from pipeline.modelsym.similarity import Pair, compare

    d = Path(folder)
    t0, c0 = time.perf_counter(), time.process_time()
    table = compare("grelu_cka", Pair(features_a=d / "a.h5", features_b=d / "b.h5"), options)
    result = {
        "wall": time.perf_counter() - t0,
        "cpu": time.process_time() - c0,
        "rss": peak_rss_gib(),
        "value": float(table.similarity.iloc[0]),
    }
    print(json.dumps(result))


def whole_part(repeats: int, samples: int) -> None:
    from pipeline.modelsym.features import write_feature_file

    runs = {label: [] for label in SETTINGS}
    with tempfile.TemporaryDirectory() as tmp:
        xa, z = features(samples, 0)
        write_feature_file(Path(tmp) / "a.h5", {"layer": xa})
        write_feature_file(Path(tmp) / "b.h5", {"layer": features(samples, 1, z)[0]})
        del xa, z
        for _ in range(repeats):
            for label, options in SETTINGS.items():
                out = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(options), tmp],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs[label].append(json.loads(out.stdout.splitlines()[-1]))
    print(
        f"2. G_ReLU-CKA of two layers of {samples} samples ({C}x{S}x{S}) from HDF5; "
        f"median of {repeats} interleaved runs, each its own process"
    )
    med = {
        label: {k: statistics.median(r[k] for r in rs) for k in ("wall", "cpu", "rss")}
        for label, rs in runs.items()
    }
    for label, m in med.items():
        print(
            f"  {label:38s} wall {m['wall']:7.2f} s  CPU {m['cpu']:7.2f} s  "
            f"peak RSS {m['rss']:5.2f} GiB  value {runs[label][0]['value']:.12f}"
        )
    old, new = (runs[label] for label in SETTINGS)
    wall = statistics.median(o["wall"] / n["wall"] for o, n in zip(old, new, strict=True))
    cpu = statistics.median(o["cpu"] / n["cpu"] for o, n in zip(old, new, strict=True))
    rel = abs(new[0]["value"] - old[0]["value"]) / abs(old[0]["value"])
    print(
        f"  old / new: wall {wall:.2f}x, CPU {cpu:.2f}x, peak RSS "
        f"{med[next(iter(SETTINGS))]['rss'] / med[list(SETTINGS)[1]]['rss']:.2f}x; "
        f"relative difference of the values {rel:.1e}"
    )


def main():
    if sys.argv[1:2] == ["--one"]:
        one_setting(json.loads(sys.argv[2]), sys.argv[3])
        return
    repeats = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    naive_count = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    samples = int(sys.argv[3]) if len(sys.argv) > 3 else 5000
    print(f"{torch.get_num_threads()} threads")
    kernel_part(repeats, naive_count)
    whole_part(repeats, samples)


if __name__ == "__main__":
    main()

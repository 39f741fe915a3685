"""Device memory a new thread costs on CUDA: torch gives each thread that runs a matmul its own
cuBLAS handle and workspace, and keeps them for the life of the process (a later thread reuses a
finished one's). Scoring runs each forward in a thread of its own (runtime.lockstep), so
runtime.allowance.CUDA_THREAD counts this per forward in flight; this script measured it.

Usage (a machine with an NVIDIA GPU): python benchmarks/cuda_threads.py
Raw output: benchmarks/results/cuda_threads_h200.txt.
"""
import threading

import torch


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("Error: no CUDA device; this script measures what CUDA takes per thread")
    d = torch.device("cuda", 0)
    a = torch.randn(48, 8192, device=d, dtype=torch.half)
    b = torch.randn(8192, 8192, device=d, dtype=torch.half)
    q = torch.randn(48, 32, 16, 128, device=d, dtype=torch.half)
    a @ b
    torch.nn.functional.scaled_dot_product_attention(q, q, q)  # the main thread's handle and kernels first
    torch.cuda.synchronize()
    run(d, 4, lambda: a + 1, "elementwise")
    run(d, 4, lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), "sdpa")
    run(d, 1, lambda: a @ b, "matmul")
    run(d, 4, lambda: a @ b, "matmul")
    run(d, 16, lambda: a @ b, "matmul")
    run(d, 16, lambda: a @ b, "matmul again (pool reuse)")
    run(d, 24, lambda: a @ b, "matmul, more threads")
    f0, a0 = state(d)
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    f1, a1 = state(d)
    print(f"clearCublasWorkspaces: free +{(f1 - f0) / 2**20:.1f} MiB, allocated -{(a0 - a1) / 2**20:.1f} MiB")
    print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name(d))


def state(d):
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info(d)[0], torch.cuda.memory_allocated(d)


def run(d, n, op, label):
    """`n` threads alive at once (so none hands its handle on to another), each running `op` once."""
    f0, a0 = state(d)
    bar = threading.Barrier(n)

    def work():
        bar.wait()
        op()
        torch.cuda.synchronize()
        bar.wait()

    ts = [threading.Thread(target=work) for _ in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    f1, a1 = state(d)
    print(f"{label:28s} {n:2d} threads: free -{(f0 - f1) / 2**20:7.1f} MiB ({(f0 - f1) / 2**20 / n:6.1f}/thread), "
          f"allocated +{(a1 - a0) / 2**20:6.1f} MiB", flush=True)


if __name__ == "__main__":
    main()

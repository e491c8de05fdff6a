"""Run by test_attention.py under Triton's CPU interpreter: the one-query attention kernel
against a float64 reference (fp32 and fp16: the interpreter's bf16 dot is not the GPU's)."""

from __future__ import annotations

import torch

from premoe.serve import attention


def reference(q, k, v, mask, scale):  # [B, Hq, 1, D] ... -> [B, 1, Hq, D] float64
    g = q.shape[1] // k.shape[1]
    kk, vv = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ kk.transpose(-1, -2) * scale
    if mask is not None:
        s = s + mask.double()
    return (s.softmax(-1) @ vv).transpose(1, 2)


def main() -> None:
    # one-shot wide blocks, the 64-column loop, and short contexts split over many programs
    # (narrow blocks, many splits merged), the splits merged in the kernel and by the merge kernel
    wide_cols, programs_default = attention.WIDE_COLUMNS, attention.PROGRAMS or 32
    for wide, programs in ((wide_cols, 0), (0, 0), (wide_cols, programs_default)):
        for merge_in_kernel in (True, False):
            attention.WIDE_COLUMNS, attention.PROGRAMS = wide, programs
            attention.MERGE_IN_KERNEL = merge_in_kernel
            check()
            assert not attention._tickets(torch.device("cpu")).any()  # every counter back at 0
    print("decode attention ok")


def check() -> None:
    torch.manual_seed(0)
    # (rows, query heads, KV heads, KV columns, head dim): one split, several, odd sizes
    for b, hq, hk, n, d in [(1, 32, 4, 256, 128), (3, 8, 2, 700, 64), (2, 4, 4, 37, 80),
                            (1, 16, 4, 1500, 128), (1, 8, 2, 20000, 64)]:  # fmt: skip
        dtype = torch.float32 if b == 3 else torch.float16
        cache = torch.randn(2, b + 1, hk, n + 5, d, dtype=dtype)
        k, v = cache[0, :b, :, :n], cache[1, :b, :, :n]  # strided views, as the slot cache's
        q = torch.randn(b, 1, hq, d, dtype=dtype).transpose(1, 2)
        pos = torch.randint(0, n, (b, 1))
        mask = torch.where(torch.arange(n)[None, :] <= pos, 0.0, torch.finfo(dtype).min)
        mask = mask.to(dtype)[:, None, None, :]
        for m in (mask, None, mask[:1]):
            got = attention.decode_attention(q, k, v, m, d**-0.5)
            full = m if m is None else m.expand(b, -1, -1, -1)
            want = reference(q, k, v, full, d**-0.5)
            err = (got.double() - want).abs().max().item()
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            assert got.shape == (b, 1, hq, d) and err < tol, ((b, hq, hk, n, d), err)


if __name__ == "__main__":
    main()

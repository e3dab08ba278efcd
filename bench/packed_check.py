"""The packed-batch kernels on a GPU (issue 8): FlashAttention 2 varlen (golf/attention.py's "fa2") and
torch._grouped_mm (per-window LoRA) against plain references, in bf16 at TTT's shapes, then timed
against the padded-rows layout they replace (cuDNN SDPA on [rows, width], bmm per row).

  python bench/packed_check.py            # prints check/time lines; exits 1 when a check fails
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golf.attention import _flash2_varlen  # noqa: E402
from kernels.segment_mm import segment_mm  # noqa: E402
from flex_tune import timed  # noqa: E402  (bench/ is the script's own directory)


def windows(total: int, seed: int) -> np.ndarray:
    """Window lengths (1..2048 tokens, unaligned as packed TTT windows are) filling `total` tokens."""
    rng, out = np.random.default_rng(seed), []
    while sum(out) < total:
        out.append(min(total - sum(out), int(rng.integers(1, 2049))))
    return np.array(out)


def main() -> None:
    dev, bf = torch.device("cuda"), torch.bfloat16
    ok = True
    lens = windows(65536, 0)
    cu = torch.tensor(np.concatenate(([0], np.cumsum(lens))), dtype=torch.int32, device=dev)
    T, H, Hkv, D = int(lens.sum()), 8, 4, 64
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(T, h, D, device=dev, dtype=bf, generator=g).requires_grad_() for h in (H, Hkv, Hkv))
    out = _flash2_varlen(q, k, v, cu, 2048)
    dout = torch.randn_like(out)
    out.backward(dout)
    grads = [t.grad.clone() for t in (q, k, v)]
    # reference: SDPA per window in fp32 (the first 40 windows)
    worst = [0.0] * 4
    for s, e in zip(cu[:41].tolist(), cu[1:41].tolist()):
        qs, ks, vs = (t.detach()[s:e].float().transpose(0, 1).requires_grad_() for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0), is_causal=True)
        ref.backward(dout[s:e].float().transpose(0, 1))
        for i, (a, b) in enumerate([(out[s:e], ref.transpose(0, 1))] + [(gr[s:e], t.grad.transpose(0, 1)) for gr, t in zip(grads, (qs, ks, vs))]):
            worst[i] = max(worst[i], (a.float() - b).abs().max().item())
    good = max(worst) < 0.1
    ok &= good
    print(f"check fa2_varlen T:{T} windows:{len(lens)} max_err out/dq/dk/dv:{'/'.join(f'{w:.3g}' for w in worst)} {'ok' if good else 'FAIL'}", flush=True)

    # query rows (TTT's pruned last layer): each window's last 48 rows at most, against the same rows of
    # the full output; gradients against the full backward of those rows' output gradient
    nq = np.minimum(lens, 48)
    index = torch.from_numpy(np.concatenate([np.arange(e - m, e) for e, m in zip(np.cumsum(lens), nq)])).to(dev)
    q_cu = torch.tensor(np.concatenate(([0], np.cumsum(nq))), dtype=torch.int32, device=dev)
    qq = q.detach()[index].requires_grad_()
    kk, vv = k.detach().requires_grad_(), v.detach().requires_grad_()
    some = _flash2_varlen(qq, kk, vv, cu, 2048, q_cu, 2048)
    some.backward(dout[index])
    q.grad = k.grad = v.grad = None
    full_dout = torch.zeros_like(dout).index_copy_(0, index, dout[index])
    _flash2_varlen(q, k, v, cu, 2048).backward(full_dout)
    errs = [(a.float() - b.float()).abs().max().item()
            for a, b in ((some, out[index]), (qq.grad, q.grad[index]), (kk.grad, k.grad), (vv.grad, v.grad))]
    good = max(errs) < 0.1
    ok &= good
    print(f"check fa2_varlen query rows:{index.numel()} max_err out/dq/dk/dv vs every row:"
          f"{'/'.join(f'{e:.3g}' for e in errs)} {'ok' if good else 'FAIL'}", flush=True)

    def fa2_fb():
        o = _flash2_varlen(q, k, v, cu, 2048)
        o.backward(dout)
    W = int(lens.max())
    rows = len(lens)
    qp, kp, vp = (torch.randn(rows, h, W, D, device=dev, dtype=bf, generator=g).requires_grad_() for h in (H, Hkv, Hkv))
    dp = torch.randn(rows, H, W, D, device=dev, dtype=bf, generator=g)

    def padded_fb():
        o = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
        o.backward(dp)
    print(f"time attention fwd+bwd packed fa2 {timed(fa2_fb, 20):.3f} ms ({T} tokens) | padded rows cudnn "
          f"{timed(padded_fb, 20):.3f} ms ({rows}x{W} = {rows * W} tokens)", flush=True)
    for rep in (1, 2):  # cuDNN's varlen (nested-tensor) path: grouped-query heads as they are, then repeated
        try:
            kk, vv = (t.detach().repeat_interleave(rep, 1).requires_grad_() for t in (k, v))
            qq = q.detach().requires_grad_()

            def cudnn_fb():
                o = torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cu, cu, 2048, 2048, True, 0.0, True)
                lse, seed, offset = o[1], o[6], o[7]
                return torch.ops.aten._cudnn_attention_backward(dout, qq, kk, vv, o[0], lse, seed, offset, torch.empty(0, device=dev),
                                                                cu, cu, 2048, 2048, 0.0, True)
            o = torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cu, cu, 2048, 2048, True, 0.0, True)
            dq, dk, dv = cudnn_fb()
            errs = [(o[0].float() - out.float()).abs().max().item(), (dq.float() - grads[0].float()).abs().max().item()]
            print(f"check cudnn_varlen kv_repeat:{rep} max_err out/dq vs fa2:{errs[0]:.3g}/{errs[1]:.3g} "
                  f"lse:{tuple(o[1].shape)} time fwd+bwd {timed(cudnn_fb, 20):.3f} ms", flush=True)
        except Exception as e:  # noqa: BLE001 - a probe: report what the kernel refused
            print(f"check cudnn_varlen kv_repeat:{rep} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)

    # grouped LoRA matmuls: x [T, 512] @ A[g] [512, 96] @ B[g] [96, 2048] per window
    G = 64
    ends = torch.full((G,), T, dtype=torch.int32, device=dev)
    ends[: len(lens)] = cu[1:]
    x = torch.randn(T, 512, device=dev, dtype=bf, generator=g).requires_grad_()
    A = (torch.randn(G, 512, 96, device=dev, dtype=bf, generator=g) * 0.05).requires_grad_()
    B = (torch.randn(G, 96, 2048, device=dev, dtype=bf, generator=g) * 0.05).requires_grad_()
    y = segment_mm(segment_mm(x, A, ends), B, ends)
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [y.detach(), x.grad.clone(), A.grad.clone(), B.grad.clone()]
    x.grad = A.grad = B.grad = None
    group = torch.searchsorted(ends, torch.arange(T, device=dev, dtype=torch.int32), right=True)
    ref = torch.cat([(x[s:e].float() @ A[i].float()).to(bf).float() @ B[i].float()
                     for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))])
    ref.backward(dy.float())
    errs = [((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
            for a, b in zip(got, [ref, x.grad, A.grad, B.grad])]
    good = max(errs) < 0.05 and int(group.max()) == len(lens) - 1
    ok &= good
    print(f"check grouped_mm rel_err y/dx/dA/dB:{'/'.join(f'{e:.3g}' for e in errs)} {'ok' if good else 'FAIL'}", flush=True)
    x.grad = A.grad = B.grad = None

    def grouped_fb():
        segment_mm(segment_mm(x, A, ends), B, ends).backward(dy)
    xp = torch.randn(rows, W, 512, device=dev, dtype=bf, generator=g).requires_grad_()
    Ap, Bp = A[:rows].detach().clone().requires_grad_(), B[:rows].detach().clone().requires_grad_()
    dyp = torch.randn(rows, W, 2048, device=dev, dtype=bf, generator=g)

    def bmm_fb():
        ((xp @ Ap) @ Bp).backward(dyp)
    print(f"time lora 512->96->2048 fwd+bwd packed grouped_mm {timed(grouped_fb, 20):.3f} ms | padded rows bmm "
          f"{timed(bmm_fb, 20):.3f} ms", flush=True)

    # both under torch.compile with dynamic shapes, at two packed lengths
    @torch.compile(dynamic=True, fullgraph=True)
    def layer(x, A, B, ends, q, k, v, cu, wy, wo):  # weighted sums: gradients of real (strided) layouts
        return ((segment_mm(segment_mm(x, A, ends), B, ends) * wy).sum()
                + (_flash2_varlen(q, k, v, cu, 2048) * wo).float().sum())
    for n in (4096, 8192):
        sub_cu = cu.clamp_max(n)
        sub_ends = ends.clamp_max(n)
        r = layer(x[:n], A, B, sub_ends, q[:n], k[:n], v[:n], sub_cu, dy[:n], dout[:n])
        r.backward()
        print(f"check compiled dynamic T:{n} value:{r.item():.4g} finite:{bool(torch.isfinite(r))}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

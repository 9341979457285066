"""Circuits at GPT-2 scale: qkov against TransformerLens on the same random weights.

    python benchmarks/circuits_scale.py            # GPT-2 small shapes (TransformerLens part: minutes, GBs)
    python benchmarks/circuits_scale.py --quick    # small shapes, a smoke run in seconds
    python benchmarks/circuits_scale.py --skip-tl  # qkov only

Random float32 weights shaped like GPT-2 small (12 layers × 12 heads, d_model 768, d_head 64,
vocab 50257, n_ctx 1024; attention and embeddings only, since nothing here reads the MLPs).
Three measurements, each in its own subprocess so that memory is measured in isolation:

1. qkov: ``copying_scores`` for all 144 heads + ``composition_scores`` for Q, K and V;
2. qkov: ``ov_self_stats`` (top-1 / top-5) of one head, streamed over its 50257 × 50257 full OV;
3. TransformerLens (``HookedTransformer`` built from a ``HookedTransformerConfig`` and loaded with
   the same state dict): ``(W_E @ OV @ W_U).eigenvalues`` and ``all_composition_scores`` for Q, K, V.

Memory is the growth of peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``
once the weights are built) over the resident memory at that point: "beyond the weights".
Timings are medians over ``--repeats`` runs. The script also checks that qkov's scores equal
TransformerLens's and prints the largest difference.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

FULL = dict(n_layers=12, n_heads=12, d_model=768, d_head=64, d_vocab=50257, n_ctx=1024)
QUICK = dict(n_layers=4, n_heads=4, d_model=128, d_head=32, d_vocab=5000, n_ctx=128)
GOALS = dict(seconds=5.0, mem_gb=1.0, ratio=0.1)


# ------------------------------------------------------------------------ memory
def _status(key: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _reset_peak() -> int:
    """Reset the peak-RSS counter; return the resident memory now."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


# ----------------------------------------------------------------------- weights
def random_state(shape: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """TransformerLens state-dict tensors (attention-only, no LayerNorm), N(0, 0.02)."""
    gen = torch.Generator().manual_seed(seed)
    L, H, d, e, v, n = (shape[k] for k in ("n_layers", "n_heads", "d_model", "d_head", "d_vocab", "n_ctx"))

    def r(*s):
        return torch.randn(*s, generator=gen) * 0.02

    sd = {"embed.W_E": r(v, d), "pos_embed.W_pos": r(n, d)}
    for l in range(L):
        p = f"blocks.{l}.attn."
        sd.update({p + "W_Q": r(H, d, e), p + "W_K": r(H, d, e), p + "W_V": r(H, d, e), p + "W_O": r(H, e, d)})
        sd.update({p + "b_Q": torch.zeros(H, e), p + "b_K": torch.zeros(H, e), p + "b_V": torch.zeros(H, e),
                   p + "b_O": torch.zeros(d)})
    sd.update({"unembed.W_U": r(d, v), "unembed.b_U": torch.zeros(v)})
    return sd


def qkov_model(shape: dict, seed: int = 0):
    """A minimal object with the stacked weight properties and a qkov ModelConfig."""
    from qkov.config import ModelConfig

    sd = random_state(shape, seed)
    L = shape["n_layers"]

    def stack(name):
        return torch.stack([sd.pop(f"blocks.{l}.attn.{name}") for l in range(L)])

    cfg = ModelConfig(**shape)                                        # attention-only, no LayerNorm
    return SimpleNamespace(
        cfg=cfg, W_E=sd.pop("embed.W_E"), W_pos=sd.pop("pos_embed.W_pos"), W_U=sd.pop("unembed.W_U"),
        b_U=sd.pop("unembed.b_U"), **{k: stack(k) for k in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")},
    )


def tl_model(shape: dict, seed: int = 0):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(**shape, act_fn="relu", attn_only=True, normalization_type=None,
                                  init_weights=False, dtype=torch.float32, device="cpu")
    model = HookedTransformer(cfg)
    missing, unexpected = model.load_state_dict(random_state(shape, seed), strict=False)
    assert not unexpected and all(k.endswith(("mask", "IGNORE")) for k in missing), (missing, unexpected)
    return model.eval()


# ----------------------------------------------------------------------- workers
def work_qkov(m):
    import qkov.circuits as C

    scores = C.copying_scores(m)
    comps = {mode: C.composition_scores(m, mode) for mode in "QKV"}
    return scores, comps


def work_ov_stats(m):
    import qkov.circuits as C

    return C.ov_self_stats(m, 0, 0, ks=(1, 5))


def work_tl(m):
    full = m.W_E @ m.OV @ m.W_U                                       # TL FactoredMatrix [L, H, v, v]
    lam = full.eigenvalues
    scores = lam.sum(-1).real / lam.abs().sum(-1)
    comps = {mode: m.all_composition_scores(mode) for mode in "QKV"}
    return scores, comps


def worker(kind: str, shape: dict, repeats: int, out: str) -> None:
    import qkov.circuits  # noqa: F401  (imports are not part of the measured work)

    with torch.no_grad():
        model = tl_model(shape) if kind == "tl" else qkov_model(shape)
        fn = {"qkov": work_qkov, "ov_stats": work_ov_stats, "tl": work_tl}[kind]
        times, peak = [], 0
        for _ in range(repeats):
            base = _reset_peak()
            t0 = time.perf_counter()
            result = fn(model)
            times.append(time.perf_counter() - t0)
            peak = max(peak, _status("VmHWM") - base)
            if kind == "ov_stats":
                stats = {k: float(v) for k, v in result.items()}
            else:
                torch.save(result, out + ".pt")
                stats = None
            del result
    with open(out, "w") as f:
        json.dump(dict(times=times, median_s=statistics.median(times), peak_gb=peak / 2**30, stats=stats), f)


def run_worker(kind: str, args, shape: dict, repeats: int, tmp: str) -> dict:
    out = os.path.join(tmp, kind + ".json")
    cmd = [sys.executable, __file__, "--worker", kind, "--repeats", str(repeats), "--out", out,
           "--shape", json.dumps(shape)]
    env = dict(os.environ)
    if args.threads:
        env["QKOV_BENCH_THREADS"] = str(args.threads)
    subprocess.run(cmd, check=True, env=env)
    with open(out) as f:
        res = json.load(f)
    if os.path.exists(out + ".pt"):
        res["result"] = torch.load(out + ".pt")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    ap.add_argument("--repeats", type=int, default=3, help="qkov runs per measurement (median)")
    ap.add_argument("--tl-repeats", type=int, default=1, help="TransformerLens runs (it takes minutes at full size)")
    ap.add_argument("--skip-tl", action="store_true", help="measure qkov only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, all cores)")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    threads = os.environ.get("QKOV_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    if args.worker:
        worker(args.worker, json.loads(args.shape), args.repeats, args.out)
        return

    shape = QUICK if args.quick else FULL
    print(f"shapes: {shape}  threads: {args.threads or torch.get_num_threads()}  float32")
    with tempfile.TemporaryDirectory() as tmp:
        q = run_worker("qkov", args, shape, args.repeats, tmp)
        s = run_worker("ov_stats", args, shape, max(1, min(args.repeats, 2)), tmp)
        t = None if args.skip_tl else run_worker("tl", args, shape, args.tl_repeats, tmp)

    L, H, v = shape["n_layers"], shape["n_heads"], shape["d_vocab"]
    print(f"\nqkov  copying scores ({L * H} heads) + Q/K/V composition:  {q['median_s']:.2f} s  "
          f"(goal < {GOALS['seconds']:g} s)   peak memory beyond weights {q['peak_gb']:.3f} GB (goal < 1)")
    print(f"qkov  OV self top-1/top-5 of head 0.0, streamed over {v} × {v}:  {s['median_s']:.2f} s   "
          f"peak memory beyond weights {s['peak_gb']:.3f} GB (goal < 1)   "
          f"top1={s['stats']['top1']:.4f} top5={s['stats']['top5']:.4f}")
    summary = dict(shape=shape, qkov=dict(seconds=q["median_s"], times=q["times"], peak_gb=q["peak_gb"]),
                   ov_stats=dict(seconds=s["median_s"], peak_gb=s["peak_gb"], **s["stats"]))
    if t is not None:
        ratio = q["median_s"] / t["median_s"]
        (qs, qc), (ts, tc) = q["result"], t["result"]
        diff = max([float((qs - ts).abs().max())] + [float((qc[m] - tc[m]).abs().max()) for m in "QKV"])
        print(f"TL    (W_E @ OV @ W_U).eigenvalues + all_composition_scores:  {t['median_s']:.2f} s   "
              f"peak memory beyond weights {t['peak_gb']:.3f} GB")
        print(f"ratio qkov / TransformerLens time: {ratio:.4f} (goal <= {GOALS['ratio']:g});  "
              f"largest |qkov - TL| over all scores: {diff:.2e}")
        summary["tl"] = dict(seconds=t["median_s"], peak_gb=t["peak_gb"])
        summary.update(ratio=ratio, max_abs_diff=diff)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()

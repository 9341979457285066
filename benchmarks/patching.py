"""Activation patching on the trained `induction` model, qkov against TransformerLens 3.9; exact
patching of every edge, and how well attribution patching (EAP, EAP-IG) ranks the edges.

    python benchmarks/patching.py                       # trains induction (~1 min), 7 repeats
    python benchmarks/patching.py --run runs/induction  # a trained run instead
    python benchmarks/patching.py --repeats 11 --threads 2

The model is the reference `induction` model (2 layers, 2 heads, attention-only, d_model 64,
vocab 256, n_ctx 32), trained with seed 0 or read from ``--run``, and loaded into TransformerLens
3.9's ``HookedTransformer`` through its state dict. The 32 prompt pairs: a clean prompt ``[x, x]``
(16 random tokens, repeated) and its corrupted twin ``[x, y]`` (the repeat replaced by 16 other
random tokens); the metric is the mean log-probability of the clean next token over the second
half. Both libraries get the same tokens, clean cache (each from its own model) and metric.

- ``resid_pre`` grid (``get_act_patch_resid_pre``, ``[2, 32]``) and ``attn_head_out_by_pos``
  grid (``get_act_patch_attn_head_out_by_pos``, ``[2, 32, 2]``): qkov's functions against
  ``transformer_lens.patching``'s (its progress bar switched off), repeats interleaved, medians and
  the ratio of medians; the largest relative difference between the two grids.
  Half of each grid patches a position where clean and corrupted runs are equal (the shared
  first half): TransformerLens runs those forwards, qkov does not (its result is the corrupted
  run's, exactly). ``--corrupt-all`` corrupts the first half too, so every variant runs.
- ``edge_patching``: all 42 edges of the graph (embeddings, heads' q/k/v inputs, logits), exact.
- ``eap`` and ``eap_ig``: their time and Spearman correlation with the exact edge scores.

Timings are medians of interleaved repeats in one run; wall time and CPU time
(``time.process_time``) are both printed, with the load average, as the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

import qkov
from qkov import edges, patching

TARGET_RATIO, TARGET_EDGES_S = 0.1, 10.0
GRIDS = ("get_act_patch_resid_pre", "get_act_patch_attn_head_out_by_pos")


def to_transformer_lens(model):
    """TransformerLens 3.9's HookedTransformer with a qkov model's config and weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    c = model.cfg
    cfg = HookedTransformerConfig(
        n_layers=c.n_layers, n_heads=c.n_heads, d_model=c.d_model, d_head=c.head_dim, d_mlp=c.d_mlp or 1,
        attn_only=c.d_mlp is None, d_vocab=c.d_vocab, d_vocab_out=c.vocab_out, n_ctx=c.n_ctx, act_fn=c.act_fn,
        normalization_type=c.normalization, device="cpu", seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # 3.9 marks HookedTransformer as deprecated in favour of 4.x
        ref = HookedTransformer(cfg)
    ref.load_state_dict(model.state_dict(), strict=True)
    return ref.eval()


def prompts(n: int, half: int, vocab: int, seed: int, corrupt_all: bool):
    g = torch.Generator().manual_seed(seed)
    x, y, w = (torch.randint(0, vocab, (n, half), generator=g) for _ in range(3))
    clean = torch.cat([x, x], 1)
    corrupted = torch.cat([w if corrupt_all else x, y], 1)
    targets = clean[:, half + 1:]

    def metric(logits):
        return logits[:, half:-1].log_softmax(-1).gather(-1, targets[..., None]).mean()
    return clean, corrupted, metric


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a trained induction run directory (default: train one, seed 0)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--pairs", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--corrupt-all", action="store_true", help="corrupt the first half too: no variant is skipped")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformer_lens.patching as tlp

    tlp.tqdm = lambda rows, **kw: rows    # no progress bar in the timed runs
    task = qkov.get_task("induction")
    model = (qkov.load(args.run) if args.run else qkov.train(task, seed=0, quiet=True).model).eval()
    ref = to_transformer_lens(model)
    clean, corrupted, metric = prompts(args.pairs, task.n_ctx // 2, task.vocab, 0, args.corrupt_all)
    with torch.no_grad():
        _, q_cache = model.run_with_cache(clean)
        _, t_cache = ref.run_with_cache(clean)
        ends = float(metric(model(clean))), float(metric(model(corrupted)))
    load0 = os.getloadavg()[0]
    print(f"induction model, {args.pairs} prompt pairs of {2 * (task.n_ctx // 2)} tokens; {args.threads} thread(s), "
          f"torch {torch.__version__}; clean metric {ends[0]:.3f}, corrupted {ends[1]:.3f}", flush=True)
    result: dict = {"pairs": args.pairs, "threads": args.threads, "corrupt_all": args.corrupt_all}
    for name in GRIDS:
        rows = {"qkov": [], "TransformerLens": []}
        ours, theirs = getattr(patching, name), getattr(tlp, name)
        for _ in range(args.repeats):
            q, qw, qc = timed(lambda: ours(model, corrupted, q_cache, metric))       # noqa: B023
            t, tw, tc = timed(lambda: theirs(ref, corrupted, t_cache, metric))       # noqa: B023
            rows["qkov"].append((qw, qc))
            rows["TransformerLens"].append((tw, tc))
        diff = float(((q - t).abs() / t.abs().clamp(min=1e-12)).max())
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
        ratio = med["qkov"][0] / med["TransformerLens"][0]
        result[name] = {"shape": list(q.shape), "max_rel_diff": diff, "ratio_wall": round(ratio, 4),
                        "ratio_cpu": round(med["qkov"][1] / med["TransformerLens"][1], 4),
                        **{f"{k}_wall_s": round(v[0], 4) for k, v in med.items()},
                        **{f"{k}_cpu_s": round(v[1], 4) for k, v in med.items()}}
        print(f"{name} {tuple(q.shape)}: qkov {med['qkov'][0] * 1e3:.1f} ms wall ({med['qkov'][1] * 1e3:.1f} CPU), "
              f"TransformerLens {med['TransformerLens'][0] * 1e3:.1f} ms ({med['TransformerLens'][1] * 1e3:.1f} CPU); "
              f"ratio {ratio:.3f} (CPU {result[name]['ratio_cpu']:.3f}); goal <= {TARGET_RATIO}; "
              f"largest relative difference {diff:.1e}", flush=True)
    exact, ew, _ = timed(lambda: edges.edge_patching(model, corrupted, q_cache, metric))
    print(f"edge_patching: {len(exact.edges)} edges exactly in {ew:.3f} s (goal < {TARGET_EDGES_S:.0f} s); "
          f"strongest: " + ", ".join(f"{u}->{r} {s:+.2f}" for u, r, s in exact.top(4)), flush=True)
    result["edges"] = {"n": len(exact.edges), "wall_s": round(ew, 4), "top": exact.top(6)}
    for label, fn in (("EAP", edges.eap), ("EAP-IG", edges.eap_ig)):
        approx, aw, _ = timed(lambda fn=fn: fn(model, corrupted, q_cache, metric))
        rho = edges.spearman(approx.scores, exact.scores)
        result[label] = {"wall_s": round(aw, 4), "spearman": round(rho, 4), "top": approx.top(6)}
        print(f"{label}: {aw:.3f} s; Spearman correlation with the exact edge scores {rho:.3f}", flush=True)
    result["loadavg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
    print(f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

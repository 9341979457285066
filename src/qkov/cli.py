"""The ``qkov`` command. Thin: it parses arguments, calls the public API and prints.

User mistakes print one line, ``qkov: <what was wrong, what was expected, how to fix it>``,
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .errors import QkovError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line and exit 2, not usage + traceback
        raise QkovError(f"{message} (see: {self.prog} --help)")


def _parse_sets(items: list[str]) -> dict[str, str]:
    sets = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise QkovError(f"--set expects key=value, got '{item}'; e.g. --set lr=3e-3")
        sets[key.strip()] = value
    return sets


def format_eval(m: dict[str, Any], name: str = "") -> str:
    """Accuracy and loss as lines of text, with each breakdown (by length, position, kind, ...)."""
    from .tasks import breakdowns

    head = f"{name + ': ' if name else ''}accuracy {m['accuracy']:.2%}  loss {m['loss']:.4g}"
    if "train_accuracy" in m:
        head += f"  (test split; train accuracy {m['train_accuracy']:.2%}, loss {m['train_loss']:.4g})"
    lines = [head]
    for group, groups in breakdowns(m):
        for k, g in groups.items():
            lines.append(f"  {group} {k}: accuracy {g['accuracy']:.2%}  loss {g['loss']:.4g}  (n={g['n']})")
    if "loss_rest" in m:
        lines.append(f"  loss on the rest of the sequence: {m['loss_rest']:.4g}")
    if "repeated" in m:
        r = m["repeated"]
        lines.append(
            f"  on [x, x] repeats: accuracy {r['accuracy']:.2%}, loss {r['loss']:.4g} "
            f"(first half {r['loss_first_half']:.4g})"
        )
    return "\n".join(lines)


def cmd_train(args) -> int:
    from .store import RunConfig
    from .tasks import configure
    from .train import RESUME_FIX, check_setup, resume, train

    if args.resume:
        if args.task or args.sets or args.out:
            raise QkovError("--resume DIR continues a run with its own config; pass only --resume DIR [--steps N]")
        from . import store

        rc = store.read_config(args.resume)
        check_setup(rc, what=f"resuming {args.resume}", fix=RESUME_FIX)  # before the lock sweeps anything
        with store.run_lock(args.resume, create=False):
            run = resume(args.resume, steps=args.steps, quiet=args.quiet)
        out = args.resume
    else:
        if not args.task:
            raise QkovError("qkov train needs a TASK (add, fib, induction, max, min, modadd, an entry point's "
                          "name, module:Class or ./file.py:Class) or --resume DIR")
        task, model_cfg, train_cfg = configure(args.task, _parse_sets(args.sets), args.steps)
        if args.show_config:
            print(format_config(task, model_cfg, train_cfg))
            return 0
        from . import store

        check_setup(RunConfig(task, model_cfg, train_cfg, args.seed))  # before --out is made
        out = args.out or f"runs/{task.name}"
        with store.run_lock(out):  # a second `qkov train --out` the same folder refuses
            run = train(task, out=out, seed=args.seed, model_config=model_cfg, train_config=train_cfg,
                        quiet=args.quiet)
    print(format_eval(run.final, run.task.name))
    print(format_target(run.metrics, run.config.train.target_accuracy, run.config.train.steps))
    print(f"saved to {out} (step {run.final['step']})")
    return 0


def format_target(metrics: list[dict[str, Any]], target: float | None, steps: int) -> str:
    """When the run's accuracy target was first reached (every group, as the trainer checks), or,
    with no target set, when 99% was: the line that says how many steps were needed."""
    from .evaluation import target_reached

    bar = 0.99 if target is None else target
    first = next((m["step"] for m in metrics if target_reached(m, bar)), None)
    if target is not None:
        if first is None:
            return f"target accuracy {bar:g} not reached in {metrics[-1]['step']:,} steps"
        return f"target accuracy {bar:g} first reached at step {first:,}; training stopped there"
    if first is None:
        return f"accuracy {bar:.0%} not reached (no --set target_accuracy; ran all {steps:,} steps)"
    return (f"accuracy {bar:.0%} first reached at step {first:,} of {steps:,} "
            f"(--set target_accuracy={bar:g} stops there)")


def format_config(task, model_cfg, train_cfg) -> str:
    """Every ``--set`` key of a run and the value it would use: task, model and train fields.
    A model or train key that a task parameter shadows is shown with its prefix."""
    lines = [f"qkov train {task.name}: every --set key and its value for this run"]
    for scope, values in (("task", task.params), ("model", model_cfg.to_dict()), ("train", train_cfg.to_dict())):
        lines.append(f"{scope}:")
        for key, value in values.items():
            shadowed = scope != "task" and key in task.params
            value = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else value
            lines.append(f"  {scope + '.' if shadowed else ''}{key}={value}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .store import load_run

    loaded = load_run(args.dir)
    print(format_eval(loaded.task.evaluate(loaded.model), loaded.task.name))
    return 0


def format_summary(d: dict[str, Any]) -> str:
    """The human-readable form of ``qkov analyze``: findings, eval, per-head scores."""
    lines = [f"{d['task']['name']}: " + ", ".join(f"{k}={v}" for k, v in d["task"].items() if k != "name")]
    lines += ["findings:"] + [f"  - {f['text']}" for f in d["findings"]]
    if d.get("checks"):
        lines += ["does the story hold?"] + [f"  [{'holds' if c['holds'] else 'FAILS'}] {c['id']}: {c['text']}"
                                            for c in d["checks"]]
    lines.append(format_eval(d["eval"]))
    lines.append("heads:")
    for h in d["heads"]:
        scores = "  ".join(f"{k} {v:.3f}" for k, v in h.items() if k not in ("layer", "head"))
        lines.append(f"  {h['layer']}.{h['head']}  {scores}")
    mlp = d.get("mlp")
    if mlp and mlp.get("kind") == "fourier_zp":
        n = mlp["neurons"]
        lines.append(f"mlp: key frequencies {mlp['key_frequencies']}, logit FVE {mlp['logit_fve']:.3f}, "
                     f"{n['frac_fve_ge_0.85']:.1%} of neurons with FVE >= 0.85; restricted loss "
                     f"{mlp['restricted_loss']}, excluded loss {mlp['excluded_loss']}")
    elif mlp and mlp.get("kind") == "token_spectrum":
        top = ", ".join(f"k={f['k']} (period {f['period']}, {f['share']:.1%})" for f in mlp["dominant_frequencies"])
        lines.append(f"mlp: dominant neuron-input frequencies {top}")
    cmp = d.get("compare")
    if cmp:
        shared = ", ".join(map(str, cmp["shared_dominant_frequencies"])) or "none"
        lines.append(f"compared with {cmp['dir']} ({cmp['task']}): neuron-input spectra overlap "
                     f"{cmp['frequency_overlap']:.1%} over tokens 0..{cmp['n_tokens'] - 1}; "
                     f"shared dominant frequencies: {shared}")
    return "\n".join(lines)


def cmd_analyze(args) -> int:
    from .analyze import analyze, frequency_comparison
    from .store import load_run

    loaded = load_run(args.dir)
    other = load_run(args.compare) if args.compare else None  # fail on a bad path before the work
    summary = analyze(loaded.model, loaded.task, checkpoints=loaded.checkpoints())
    d = summary.to_dict()
    if other is not None:
        d["compare"] = {"dir": str(args.compare), "task": other.task.name,
                        **frequency_comparison(loaded.model, other.model)}
    print(json.dumps(d, indent=2) if args.json else format_summary(d))
    return 0


def cmd_report(args) -> int:
    from .report import write_report
    from .store import check_writable, ensure_dir, is_run_dir

    if args.output and is_run_dir(args.dir):  # before the analysis, not after it
        check_writable(args.output)
    if args.png:
        ensure_dir(args.png)
    path = write_report(args.dir, out=args.output, png=args.png, inputs=args.inputs)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)" + (f"; PNGs in {args.png}" if args.png else ""))
    return 0


def cmd_certify(args) -> int:
    from .certify import certify
    from .store import load_run

    loaded = load_run(args.dir)
    cert = certify(loaded.model, loaded.task, length=args.length, exact_limit=args.exact_limit)
    print(json.dumps(cert.to_dict(), indent=2) if args.json else cert.format())
    return 0


def cmd_show(args) -> int:
    from .show import show
    from .store import check_writable, load_run

    loaded = load_run(args.dir)
    if args.html:
        check_writable(args.html)
    shown = show(loaded.model, loaded.task, *args.inputs)
    print(shown.to_json() if args.json else shown)
    if args.html:
        from .report import write_inputs_page

        path = write_inputs_page(shown, args.html, title=f"qkov show: {loaded.task.name} ({args.dir})")
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_sweep(args) -> int:
    from .sweep import parse_grid, parse_seeds, sweep

    try:
        result = sweep(args.task, parse_seeds(args.seeds), parse_grid(args.sets), out=args.out, jobs=args.jobs,
                       backend=args.backend, address=args.address, retries=args.retries, quiet=args.quiet)
    except KeyboardInterrupt:
        print("qkov: sweep interrupted; the runs already finished are kept: run the same command again to finish",
              file=sys.stderr)
        return 130
    print(result.text())
    return 1 if result.failed else 0


def cmd_runs(args) -> int:
    from . import registry

    if args.rebuild:
        if not registry.is_sweep_dir(args.dir):
            raise QkovError(f"{args.dir} holds no runs to rebuild a registry from; expected a qkov sweep directory")
        with registry.writer_lock(args.dir):
            reg = registry.Registry(args.dir, write=True)
            rows = reg.rebuild()
            reg.close()
    else:
        if not registry.is_sweep_dir(args.dir):
            raise QkovError(f"{args.dir} is not a sweep directory (no {registry.DB}, no run directories); "
                            f"run one with: qkov sweep TASK --seeds 0:10 --out {args.dir}")
        rows = registry.read_rows(args.dir)
    rows = registry.query(rows, where=args.where, sort=args.sort)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.csv:
        sys.stdout.write(registry.to_csv(rows))
    else:
        print(registry.to_table(rows) if rows else "no runs match")
    return 0


def cmd_tour(args) -> int:
    from .config import parse_value
    from .tour import tour

    sets = _parse_sets(args.sets)
    other = sorted(k for k in sets if k not in ("threads", "train.threads"))
    if other:
        raise QkovError(f"qkov tour trains the reference settings and takes only --set threads=N; "
                        f"got {', '.join(other)}")
    threads = parse_value(sets.get("threads", sets.get("train.threads", "0")), 0, "threads")
    result = tour(args.output, quiet=args.quiet, threads=threads)
    print(f"wrote {result.index} in {result.elapsed_s:.0f} s; reports: "
          + ", ".join(str(x.report) for x in result.entries))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qkov", description="Train small transformers and read their QK/OV circuits.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model on an algorithmic task")
    t.add_argument("task", nargs="?", help="add, fib, induction, max, min or modadd; a task of your own as "
                   "module:Class or ./file.py:Class, or by its qkov.tasks entry point's name")
    t.add_argument("--out", help="run directory (default runs/TASK)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, help="total optimizer steps (overrides the task's default)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task, model or train config field, e.g. --set p=23 --set lr=3e-3 "
                        "(--show-config lists every key with its value)")
    t.add_argument("--show-config", action="store_true",
                   help="print every --set key of TASK with the value the run would use, and exit")
    t.add_argument("--resume", metavar="DIR", help="continue a stopped run bit-exactly")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained run: accuracy and loss")
    e.add_argument("dir")
    e.set_defaults(fn=cmd_eval)
    a = sub.add_parser("analyze", help="circuit analysis of a trained run: per-head scores, composition, findings")
    a.add_argument("dir")
    a.add_argument("--json", action="store_true", help="print the Summary as one JSON object")
    a.add_argument("--compare", metavar="OTHER_DIR",
                   help="another MLP run (e.g. fib against add): overlap of the two models' neuron-input frequencies")
    a.set_defaults(fn=cmd_analyze)
    r = sub.add_parser("report", help="write a self-contained HTML report of a trained run")
    r.add_argument("dir")
    r.add_argument("-o", "--output", metavar="FILE", help="the HTML file (default DIR/report.html)")
    r.add_argument("--png", metavar="PNG_DIR",
                   help="also write each figure as a PNG into this folder (needs matplotlib)")
    r.add_argument("--inputs", nargs="+", metavar="INPUT",
                   help='examples whose attention the report draws, as the task writes them, e.g. "52 59" "46 41 41"')
    r.set_defaults(fn=cmd_report)
    ce = sub.add_parser("certify", help="prove lower bounds on a max model's accuracy over every input, per length")
    ce.add_argument("dir")
    ce.add_argument("--json", action="store_true",
                    help="print one JSON object: {task, lengths: {N: {exact, bounds, flops, seconds, failing_cases}}}")
    ce.add_argument("--length", type=int, metavar="N", help="certify this length only (default: each the task scores)")
    ce.add_argument("--exact-limit", type=int, default=64 ** 4, metavar="INPUTS",
                    help="brute-force the exact accuracy where d_vocab**length is at most this (default 64**4; "
                         "64**5 = 1073741824 takes about a minute)")
    ce.set_defaults(fn=cmd_certify)
    sh = sub.add_parser("show", help="what a trained model does on inputs you write: answer, top logits, attention")
    sh.add_argument("dir")
    sh.add_argument("inputs", nargs="+", metavar="INPUT",
                    help='one example as the task writes it, e.g. "35 14 47 61 38 54"')
    sh.add_argument("--json", action="store_true", help="print a JSON list, one object per input")
    sh.add_argument("--html", metavar="FILE", help="also write every head's attention on the inputs as an HTML page")
    sh.set_defaults(fn=cmd_show)
    tr = sub.add_parser("tour", help="train max, add and fib, analyse them and write reports with an index page")
    tr.add_argument("-o", "--output", metavar="DIR", default="tour", help="folder for runs and reports (default tour)")
    tr.add_argument("--quiet", action="store_true", help="no progress messages")
    tr.add_argument("--set", dest="sets", action="append", default=[], metavar="threads=N",
                    help="torch threads while training (default 0: chosen as each run trains)")
    tr.set_defaults(fn=cmd_tour)
    sw = sub.add_parser("sweep", help="train and analyse a grid of seeds and settings; killed, it resumes when rerun")
    sw.add_argument("task", help="add, fib, induction, max or modadd")
    sw.add_argument("--seeds", required=True, metavar="A:B", help="seeds A..B-1 (or N, or a list: 0:10,42)")
    sw.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=V1,V2",
                    help="a setting and its values (the grid is the product of all), e.g. --set lr=1e-3,3e-3")
    sw.add_argument("--jobs", type=int, help="runs at a time (default: the cores, or the Ray cluster's CPUs)")
    sw.add_argument("--backend", choices=("local", "ray", "serial"), default="local",
                    help="local worker processes (default), Ray tasks, or one run at a time in this process")
    sw.add_argument("--address", help="the Ray cluster to use (--backend ray), e.g. ray://head:10001 or auto")
    sw.add_argument("--out", help="the sweep directory (default sweeps/TASK)")
    sw.add_argument("--retries", type=int, default=2, help="tries after a failed run (default 2)")
    sw.add_argument("--quiet", action="store_true", help="no line per finished run")
    sw.set_defaults(fn=cmd_sweep)
    ru = sub.add_parser("runs", help="the run registry of a sweep directory: one row per run")
    ru.add_argument("dir")
    ru.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                    help="keep rows where KEY=VALUE (also !=, <, >, <=, >=), e.g. --where status=failed")
    ru.add_argument("--sort", metavar="KEY", help="sort by KEY (--sort=-KEY: descending)")
    fmt = ru.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the rows as a JSON list")
    fmt.add_argument("--csv", action="store_true", help="print the rows as CSV")
    ru.add_argument("--rebuild", action="store_true", help="rebuild the registry from the run directories first")
    ru.set_defaults(fn=cmd_runs)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            print("qkov: no COMMAND given; pick one of those above, e.g. qkov train max", file=sys.stderr)
            return 2
        return args.fn(args)
    except QkovError as e:
        print(f"qkov: {one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `qkov analyze DIR | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("qkov: interrupted; files already written are complete (writes are atomic)", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the last edge: one line, never a traceback
        return _unexpected(e)


def one_line(text: str) -> str:
    """``text`` with its line breaks and control characters escaped (a message that echoes what
    was typed stays one line on a terminal).

    >>> one_line("unknown task 'a\\nb\\x85'")
    "unknown task 'a\\\\nb\\\\x85'"
    """
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _unexpected(e: Exception) -> int:
    """One line for what no check caught: an OS error (exit 2, with the path), memory that ran
    out (exit 2), or a bug in qkov (exit 1; QKOV_TRACEBACK=1 prints the traceback)."""
    if os.environ.get("QKOV_TRACEBACK"):
        raise e
    text = one_line(str(e).splitlines()[0][:300]) if str(e).strip() else type(e).__name__
    if isinstance(e, OSError):
        where = f" {one_line(str(e.filename))}" if e.filename else ""
        print(f"qkov: cannot use{where} ({e.strerror or text}); check the path, its permissions and free space",
              file=sys.stderr)
        return 2
    if isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and "alloc" in text + str(type(e))
                                      or "out of memory" in text):
        print(f"qkov: out of memory ({text}); choose smaller sizes or batch_size", file=sys.stderr)
        return 2
    print(f"qkov: internal error {type(e).__name__}: {text} (a bug in qkov; rerun with QKOV_TRACEBACK=1 "
          f"for the traceback and report it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``qkov`` command. Thin: it parses arguments, calls the public API and prints.

User mistakes print one line, ``qkov: <what was wrong, what was expected, how to fix it>``,
and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
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
    """Accuracy and loss as lines of text, with the by-length / by-position breakdown."""
    head = f"{name + ': ' if name else ''}accuracy {m['accuracy']:.2%}  loss {m['loss']:.4g}"
    if "train_accuracy" in m:
        head += f"  (test split; train accuracy {m['train_accuracy']:.2%}, loss {m['train_loss']:.4g})"
    lines = [head]
    for group in ("length", "position"):
        for k, g in m.get(f"by_{group}", {}).items():
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
    from .tasks import configure
    from .train import resume, train

    if args.resume:
        if args.task or args.sets or args.out:
            raise QkovError("--resume DIR continues a run with its own config; pass only --resume DIR [--steps N]")
        run = resume(args.resume, steps=args.steps, quiet=args.quiet)
        out = args.resume
    else:
        if not args.task:
            raise QkovError("qkov train needs a TASK (add, fib, induction, max, modadd) or --resume DIR")
        task, model_cfg, train_cfg = configure(args.task, _parse_sets(args.sets), args.steps)
        out = args.out or f"runs/{task.name}"
        run = train(task, out=out, seed=args.seed, model_config=model_cfg, train_config=train_cfg, quiet=args.quiet)
    print(format_eval(run.final, run.task.name))
    print(f"saved to {out} (step {run.final['step']})")
    return 0


def cmd_eval(args) -> int:
    from .store import load_run

    loaded = load_run(args.dir)
    print(format_eval(loaded.task.evaluate(loaded.model), loaded.task.name))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qkov", description="Train small transformers and read their QK/OV circuits.")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    t = sub.add_parser("train", help="train a model on an algorithmic task")
    t.add_argument("task", nargs="?", help="add, fib, induction, max or modadd")
    t.add_argument("--out", help="run directory (default runs/TASK)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--steps", type=int, help="total optimizer steps (overrides the task's default)")
    t.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a task, model or train config field, e.g. --set p=23 --set lr=3e-3")
    t.add_argument("--resume", metavar="DIR", help="continue a stopped run bit-exactly")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="evaluate a trained run: accuracy and loss")
    e.add_argument("dir")
    e.set_defaults(fn=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return args.fn(args)
    except QkovError as e:
        print(f"qkov: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkov: interrupted; files already written are complete (writes are atomic)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

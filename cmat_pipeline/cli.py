"""`cmat`: one command for every stage, the same functions DVC and Airflow call.

    cmat params [--profile gpu] > params.yaml     # write a resolved profile
    cmat prepare-model [--set model.base=tiny-random]
    cmat collect [--set collect.shard=2026-11-16]   # then: filter, augment, distill, general, mix
    cmat sft [--set sft.method=ptuning]
    cmat cmat [--set cmat.iterations=1]             # CMAT actor-critic tuning (tune.py)
    cmat evaluate [--set evaluate.policy=oracle --set db.backend=mysql]
    cmat report                                       # git-tracked metrics, plots, report.md of the run
    cmat evaluate-os | cmat evaluate-kg [--set kg.policy=oracle]   # AgentBench OS and KG
    cmat pull --alias production --what adapter      # artifacts from the S3 registry
    cmat serve [--set serve.adapter='']               # an OpenAI-compatible endpoint (docs/SERVING.md)
    cmat checker-eval | cmat prompt-eval              # the paper's Table I and Table III
Every stage reads params.yaml (`--params` for another file) and takes `--set KEY=VALUE` overrides.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cmat_pipeline.config import Params, dump_params, load_params, profile_params
from cmat_pipeline.errors import CmatError

STAGES = {
    "prepare-model": "cmat_pipeline.prepare_model",
    "collect": "cmat_pipeline.collect",
    "filter": "cmat_pipeline.filtering",
    "augment": "cmat_pipeline.augment",
    "distill": "cmat_pipeline.distill",
    "general": "cmat_pipeline.general",
    "mix": "cmat_pipeline.mix",
    "sft": "cmat_pipeline.sft",
    "cmat": "cmat_pipeline.tune",
    "evaluate": "cmat_pipeline.evaluate",
    "report": "cmat_pipeline.report",
    "evaluate-os": "cmat_pipeline.evaluate_os",
    "evaluate-kg": "cmat_pipeline.evaluate_kg",
    "pull": "cmat_pipeline.registry",
    "serve": "cmat_pipeline.serve",
    "checker-eval": "cmat_pipeline.checker_eval",
    "prompt-eval": "cmat_pipeline.prompt_eval",
}


def stage_args(description: str, argv: list[str] | None,
               extra: "callable | None" = None) -> tuple[Params, argparse.Namespace]:
    """Parse the options every stage shares; returns the validated params and the namespace."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one param for this run, e.g. --set evaluate.limit=10 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    if extra:
        extra(parser)
    args = parser.parse_args(argv)
    return load_params(args.params, args.set), args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "params":
            parser = argparse.ArgumentParser(prog="cmat params", description="print a resolved params profile")
            parser.add_argument("--profile", default="default")
            print(dump_params(profile_params(parser.parse_args(rest).profile)), end="")
        elif command in STAGES:
            importlib.import_module(STAGES[command]).main(rest)
        else:
            print(f"cmat: unknown command {command!r}; choose one of params, {', '.join(STAGES)}", file=sys.stderr)
            return 2
    except CmatError as err:
        print(f"cmat {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``glmserve bench``: benchmarks, one module per concern.

* ``serving`` -- the default mode: glmserve against vLLM's own OpenAI server on the same model
  (``glmserve bench [--workloads plain,tools] ...``).
* ``parser_cost`` -- ``glmserve bench parser-cost``: the streaming tool-call parsers' cost per delta.
* ``router`` -- ``glmserve bench router``: replicas behind vllm-router, the prefix-cache share per policy.
* ``workloads`` -- what traffic a level sends (add a workload there: it shows up in ``--workloads``);
  ``client`` -- the streaming HTTP client that times it; ``servers`` -- starting and stopping the
  servers; ``stats`` -- summaries and ratios; ``report`` -- table, JSON, plot and machine record.

Results go to ``bench/results/`` (see ``bench/README.md``).
"""

from __future__ import annotations

import sys

MODES = {"parser-cost": "time the streaming tool-call parsers per delta (glmserve bench parser-cost --help)",
         "router": "replicas behind vllm-router: the prefix-cache share per routing policy (glmserve bench router --help)"}


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``glmserve bench [MODE] ...``; without a mode, the serving comparison."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "parser-cost":
        from glmserve.bench import parser_cost

        return parser_cost.main(argv[1:])
    if argv and argv[0] == "router":
        from glmserve.bench import router

        return router.main(argv[1:])
    from glmserve.bench import serving

    return serving.main(argv)

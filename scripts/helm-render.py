#!/usr/bin/env python3
"""Render or lint a Helm chart with real Helm (v4, as a library).

    helm-render.py render CHART_DIR VALUES_JSON   # {template path: manifest}
    helm-render.py lint   CHART_DIR VALUES_JSON   # the lint report

Both print JSON on stdout. VALUES_JSON is a JSON object of values overriding
the chart's values.yaml ("{}" for the defaults; "-" reads it from stdin).
The release is named "tlsmesh" in namespace "tlsmesh-system", as the chart
test renderer in tests/tests/support/helm_mini.rs assumes.

Helm comes from helm-python-sdk (its libhelm_c.so), installed by
scripts/bootstrap.sh into target/tools/helm-venv: run this script with that
venv's python. A lint report lists findings (severity 0 unknown, 1 info,
2 warning, 3 error) and still exits 0; a render or lint that Helm refuses
(template error, `fail`, `required`, malformed values or chart) exits 1 with
Helm's message on stderr. Usage errors exit 2.
"""

from __future__ import annotations

import json
import sys

RELEASE = "tlsmesh"
NAMESPACE = "tlsmesh-system"


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] not in ("render", "lint"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    _, command, chart_dir, values_text = argv
    if values_text == "-":
        values_text = sys.stdin.read()
    try:
        values = json.loads(values_text)
    except json.JSONDecodeError as e:
        print(f"helm-render: VALUES_JSON is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(values, dict):
        print("helm-render: VALUES_JSON must be a JSON object", file=sys.stderr)
        return 2

    try:
        from helm_python.chart import Chart, lint
        from helm_python.errors import HelmError
    except ImportError as e:
        print(
            f"helm-render: {e}: run with target/tools/helm-venv/bin/python "
            "(created by: bash scripts/bootstrap.sh)",
            file=sys.stderr,
        )
        return 1

    try:
        if command == "render":
            with Chart.load(chart_dir) as chart:
                out = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
        else:
            out = lint(chart_dir, values, namespace=NAMESPACE)
    except HelmError as e:
        print(f"helm-render: {command} {chart_dir}: {e}", file=sys.stderr)
        return 1
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

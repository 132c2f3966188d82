#!/usr/bin/env python3
"""Install (or upgrade) and uninstall a Helm release with real Helm (v4, as a library).

    helm-install.py install   KUBECONFIG CHART_DIR VALUES_JSON   # install, or upgrade if it exists
    helm-install.py uninstall KUBECONFIG

The release is "tlsmesh" in namespace "tlsmesh-system" (deploy/README.md).
Helm comes from helm-python-sdk in target/tools/helm-venv (scripts/bootstrap.sh
installs it): run this with that venv's python. Used by scripts/cluster.sh
(`cargo xtask cluster install`). Prints the release's status; exits 1 with
Helm's message on stderr when Helm refuses, 2 on a usage error.
"""

from __future__ import annotations

import json
import sys

RELEASE = "tlsmesh"
NAMESPACE = "tlsmesh-system"
TIMEOUT_SECONDS = 300


def main(argv: list[str]) -> int:
    usage = (len(argv) == 5 and argv[1] == "install") or (len(argv) == 3 and argv[1] == "uninstall")
    if not usage:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    command, kubeconfig = argv[1], argv[2]
    chart_dir, values_text = (argv[3], argv[4]) if command == "install" else ("", "{}")
    try:
        from helm_python.config import Config
        from helm_python.errors import HelmError
    except ImportError as e:
        print(
            f"helm-install: {e}: run with target/tools/helm-venv/bin/python "
            "(created by: bash scripts/bootstrap.sh)",
            file=sys.stderr,
        )
        return 1
    try:
        with Config(kubeconfig_path=kubeconfig, namespace=NAMESPACE) as cfg:
            if command == "uninstall":
                cfg.uninstall(RELEASE)
                print(f"helm-install: uninstalled {RELEASE}")
                return 0
            values = json.loads(values_text)
            installed = any(r.get("name") == RELEASE for r in cfg.list(all_states=True))
            if installed:
                cfg.upgrade(chart_dir, RELEASE, values, namespace=NAMESPACE,
                                      timeout=TIMEOUT_SECONDS)
            else:
                cfg.install(chart_dir, RELEASE, values, namespace=NAMESPACE,
                                      timeout=TIMEOUT_SECONDS)
    except HelmError as e:
        print(f"helm-install: {command} {chart_dir or RELEASE}: {e}", file=sys.stderr)
        return 1
    print(f"helm-install: {RELEASE} {'upgraded' if installed else 'installed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

#!/usr/bin/env bash
# Render the Helm chart with Helm's own code and check the result (helm/ci/check_chart.py):
# helm lint, the values schema, every object against the Kubernetes schemas (strict), the
# pieces the chart promises, promguard's own check-config and policy check on the config
# and policies it renders, and the Dockerfile through Docker's parser.
#
#   scripts/check-chart.sh
#
# Needs python3 (3.10 or later, with venv) and cargo. Installs the pinned Python packages
# of helm/ci/requirements.txt from PyPI into a virtualenv under cargo's target directory,
# again only when that file changes. PROMGUARD_BIN names an already built promguard
# (the end-to-end tests pass theirs); otherwise it is built here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

target=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
venv=$target/check-chart-venv
if ! cmp -s helm/ci/requirements.txt "$venv/requirements.txt" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r helm/ci/requirements.txt
  cp helm/ci/requirements.txt "$venv/requirements.txt"
fi
promguard=${PROMGUARD_BIN:-}
if [[ -z $promguard ]]; then
  cargo build --quiet --bin promguard
  promguard=$target/debug/promguard
fi
# Helm notes every symlink it follows; the chart's dashboards/ and policies/ are symlinks
# to the repository's on purpose.
"$venv/bin/python" helm/ci/check_chart.py . "$promguard" \
  2> >(grep -v 'found symbolic link in path' >&2)

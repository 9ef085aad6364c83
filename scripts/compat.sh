#!/usr/bin/env bash
# The Hugging Face-facing tests (`pytest -m hf`, the modules listed in tests/conftest.py) on each
# supported transformers version, each in a throwaway venv; prints the Markdown table that README.md's
# support table is made from.
#
#   bash scripts/compat.sh [VERSION ...]     default: 4.56.2 4.57.6 5.23.0 5.24.0 newest
#
# VERSION is a transformers release, or `newest` (whatever the registry offers now). Each venv is made
# with --system-site-packages from $PYTHON (default: python), so it reuses that environment's torch,
# pytest and fastmem's other dependencies (set it up the README way first); into it go
# transformers==VERSION and the newest peft and datasets pip finds compatible with it ($PEFT overrides the peft
# requirement, e.g. PEFT="peft==0.17.1"), with torch held at the installed version. The tests run
# from this checkout. Venvs are deleted as each version finishes; the pip and pytest logs stay in the
# folder printed at the end. Set JOBS for pytest-xdist workers (default 2).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "${root}"

PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
if (($#)); then versions=("$@"); else versions=(4.56.2 4.57.6 5.23.0 5.24.0 newest); fi

if ! "${PYTHON}" -c "import torch, pytest, xdist" 2>/dev/null; then
    echo "compat.sh: ${PYTHON} needs torch, pytest and pytest-xdist: set it up as README.md says first" >&2
    exit 2
fi
torch_version=$("${PYTHON}" -c "import torch; print(torch.__version__.split('+')[0])")
venvs=$(mktemp -d "${TMPDIR:-/tmp}/fastmem-compat-venvs.XXXXXX")
logs=$(mktemp -d "${TMPDIR:-/tmp}/fastmem-compat-logs.XXXXXX")
trap 'rm -rf "${venvs}"' EXIT
echo "torch==${torch_version}" > "${logs}/torch-constraint.txt"

# passed failed skipped, from a pytest JUnit XML file (errors count as failed)
count() {
    "${PYTHON}" - "$1" <<'EOF'
import sys
import xml.etree.ElementTree as ET

root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
total = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
failed = total["failures"] + total["errors"]
print(total["tests"] - failed - total["skipped"], failed, total["skipped"])
EOF
}

rows=()
status=0
for version in "${versions[@]}"; do
    venv="${venvs}/${version}"
    log="${logs}/${version}"
    if [[ "${version}" == newest ]]; then request=transformers; else request="transformers==${version}"; fi
    echo "compat.sh: ${request} ..." >&2
    "${PYTHON}" -m venv --system-site-packages "${venv}"
    if ! "${venv}/bin/python" -m pip install --quiet --upgrade -c "${logs}/torch-constraint.txt" \
            "${request}" "${PEFT:-peft}" datasets > "${log}-pip.log" 2>&1; then
        echo "compat.sh: installing ${request} failed: ${log}-pip.log" >&2
        rows+=("| ${version} | | install failed | | |")
        status=1
        rm -rf "${venv}"
        continue
    fi
    installed() { "${venv}/bin/python" -c "import importlib.metadata as m; print(m.version('$1'))"; }
    transformers=$(installed transformers)
    if [[ "${version}" == newest ]]; then transformers="${transformers} (newest)"; fi
    peft=$(installed peft)
    "${venv}/bin/python" -m pytest -q -n "${JOBS}" -m hf -p no:cacheprovider -rfE \
        --junitxml="${log}-junit.xml" tests > "${log}-pytest.log" 2>&1 || status=1
    if [[ -s "${log}-junit.xml" ]]; then
        read -r passed failed skipped < <(count "${log}-junit.xml")
    else
        passed="" failed="pytest did not run" skipped=""
    fi
    rows+=("| ${transformers} | ${peft} | ${passed} | ${failed} | ${skipped} |")
    echo "compat.sh: transformers ${transformers}, peft ${peft}: ${passed} passed, ${failed} failed," \
         "${skipped} skipped ($(tail -n 1 "${log}-pytest.log"))" >&2
    rm -rf "${venv}"
done

echo
echo "Hugging Face-facing tests (\`pytest -m hf\`), torch ${torch_version}, fastmem" \
     "$(git -C "${root}" describe --always --dirty 2>/dev/null || echo '(not a git checkout)'), $(date -u +%Y-%m-%d):"
echo
echo "| transformers | peft | passed | failed | skipped |"
echo "| --- | --- | ---: | ---: | ---: |"
printf '%s\n' "${rows[@]}"
echo
echo "logs: ${logs}" >&2
exit "${status}"

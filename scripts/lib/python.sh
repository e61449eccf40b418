# Shared by install.sh and lib/dev-venv.sh (sourced, not run): find a supported Python.
# shellcheck shell=bash

# True if "$1" runs and is Python 3.10-3.12.
python_supported() { "$1" -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))' 2>/dev/null; }

# Print the first supported interpreter: "$1" if given (or fail), else python3.12 ... python3.
find_python() {
    if [[ -n "${1:-}" ]]; then
        python_supported "$1" || { echo "$1 is not Python 3.10-3.12" >&2; return 1; }
        command -v "$1"
        return 0
    fi
    local candidate
    for candidate in python3.12 python3.11 python3.10 python3; do
        if command -v "$candidate" >/dev/null && python_supported "$candidate"; then
            # The real interpreter, not a version manager's shim.
            "$candidate" -c 'import sys; print(sys.executable)'
            return 0
        fi
    done
    echo "no Python 3.10-3.12 found; install one or pass --python" >&2
    return 1
}

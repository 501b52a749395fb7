#!/usr/bin/env bash
# Set up (first run only) and run the demo: synthetic EM -> train -> predict -> evaluate.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec jaxem demo "$@"

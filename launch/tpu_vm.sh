#!/usr/bin/env bash
# Cloud TPU launcher: the same as launch/tpu_vm.py (see its --help), kept so
# that `launch/tpu_vm.sh ...` works too.
exec python3 "$(dirname "$0")/tpu_vm.py" "$@"

# Sourced by the benchmarks' device scripts, from the repository root: the GPU machine has no
# package registry, so the wheels a call needs travel in .whl/ (megatron-core, pytest, ...;
# torchao in .whl/extra/) and are installed offline.
#
#   install_wheels TARGET WHEEL...   the wheels into the folder TARGET (no dependencies, quiet);
#                                    pip's exit status
#   use_carried_wheels               .whl/*.whl into /tmp/site, which goes on PYTHONPATH with
#                                    the repository; nothing where .whl/ was not carried
#   pack_logs DIR                    DIR's *.log files into DIR/logs.tgz (a device call returns
#                                    at most 8 files: the logs travel as one)

install_wheels() {
  local target=$1
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$target" "$@" 2>&1 \
    | grep -v WARNING
  return "${PIPESTATUS[0]}"
}

use_carried_wheels() {
  [ -d .whl ] || return 0
  install_wheels /tmp/site .whl/*.whl || return
  export PYTHONPATH=/tmp/site:$PWD
}

pack_logs() {
  local dir=$1
  compgen -G "$dir/*.log" > /dev/null || return 0
  (cd "$dir" && tar -czf logs.tgz ./*.log && rm -f ./*.log)
}

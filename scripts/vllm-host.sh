#!/usr/bin/env bash
# Set vLLM up on an offline GPU host from a vLLM bundle, then start it through Rolecast
# (`rolecast serve --engine vllm`, which builds the `vllm serve` command line from the settings
# and the adapter registry).
#
#   scripts/vllm-host.sh [options] BUNDLE_DIR [-- ROLECAST_SERVE_OPTIONS...]
#
# BUNDLE_DIR holds the bundle: one xz-packed tree of Python packages (vLLM and the small
# packages it needs beyond what the host has) split into parts, `site.tar.xz.part00`,
# `site.tar.xz.part01`, ... in any folders under BUNDLE_DIR (e.g. p1/ and p2/), and
# `site.tar.xz.sha256` (`sha256sum` output for site.tar.xz) beside one of them.
#
# Options:
#   --prefix DIR     where to unpack and install (default: <Rolecast cache>/vllm-host,
#                    i.e. ${ROLECAST_CACHE_DIR:-${XDG_CACHE_HOME:-~/.cache}/rolecast}/vllm-host)
#   --wheels DIR     wheels to install with `pip --no-index --no-deps` into PREFIX/python: every
#                    NAME.whl under DIR, or its parts NAME.whl.part00, NAME.whl.part01, ... (with
#                    an optional NAME.whl.sha256). A rolecast wheel among them is used instead of
#                    the checkout this script is in. The host's own packages (torch above all)
#                    are never touched: nothing is installed into its site-packages.
#   --extras LIST    the Rolecast extras whose requirements must be met (default: serve;
#                    `serve,train,dev` for training and the tests on the host too)
#   --python PY      the interpreter that has torch (default: $PYTHON, else python3)
#   --dry-run        set everything up, check it, then print the command it would exec (and the
#                    `vllm serve` command line that one builds) instead of converting the model
#                    and starting vLLM
#   --env            set everything up, check it, then print `export` lines for PATH, PYTHONPATH
#                    and VLLM_USE_FLASHINFER_SAMPLER, so that other Rolecast commands run on the
#                    host the same way: eval "$(scripts/vllm-host.sh --env ... BUNDLE_DIR)"
#
# Steps, each done once (a second run finds it done, so the script can be run at every start):
#   1. join the parts in name order and check the sha256 (a bad or missing part stops here);
#   2. unpack into PREFIX/site (a stamp there records the sha256 that was unpacked);
#   3. write PREFIX/bin/vllm, which runs `PY -m vllm.entrypoints.cli.main "$@"`;
#   4. install the --wheels, if any, into PREFIX/python;
#   5. check that Rolecast's requirements are met and that the host's torch is the one the
#      bundle's vLLM was built for (scripts/host_check.py);
#   6. convert the default model once if it is the model served
#      (`rolecast serve --engine vllm --prepare-only`; nothing to do for another model);
#   7. exec `rolecast serve --engine vllm ROLECAST_SERVE_OPTIONS` with PREFIX/bin on PATH, the
#      packages on PYTHONPATH and VLLM_USE_FLASHINFER_SAMPLER=0 (flashinfer is not in a bundle).
#
# The settings come from the options after `--` and from the environment as for any
# `rolecast serve` (ROLECAST_SERVE_*, ROLECAST_ADAPTERS_DIR, ROLECAST_CACHE_DIR, ...).
set -euo pipefail

say() { printf 'vllm-host: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
checkout=$(dirname "$here")
cache_root=${ROLECAST_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rolecast}
prefix=$cache_root/vllm-host
wheels=""
extras=serve
py=${PYTHON:-python3}
dry_run=0
env_only=0
bundle=""
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) prefix=$2; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    --extras) extras=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --env) env_only=1; shift ;;
    --help|-h) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$bundle" ] || die "one BUNDLE_DIR only (got $bundle and $1)"; bundle=$1; shift ;;
  esac
done
serve_args=("$@")
[ -n "$bundle" ] || die "usage: $0 [options] BUNDLE_DIR [-- ROLECAST_SERVE_OPTIONS...]"
[ -d "$bundle" ] || die "no bundle folder $bundle"
py=$(command -v "$py") || die "no Python interpreter ${PYTHON:-python3}"
mkdir -p "$prefix"
prefix=$(cd "$prefix" && pwd)

# sorted_parts DIR PATTERN: the files under DIR whose name matches PATTERN, in name order
# (part00 before part01, whatever folder each is in).
sorted_parts() { find "$1" -type f -name "$2" -printf '%f\t%p\n' | sort | cut -f2; }

# no_duplicates FILE...: two files of one name (the same part carried twice) are an error.
no_duplicates() {
  local dup
  dup=$(for f in "$@"; do basename "$f"; done | sort | uniq -d | head -n1)
  [ -z "$dup" ] || die "$dup is there twice; keep one"
}

# join_checked OUT SHA256|"" PART...: the parts joined into OUT, whose sha256 must be SHA256.
join_checked() {
  local out=$1 want=$2
  shift 2
  cat "$@" > "$out.tmp"
  if [ -n "$want" ]; then
    local got
    got=$(sha256sum "$out.tmp" | cut -d' ' -f1)
    if [ "$got" != "$want" ]; then
      rm -f "$out.tmp"
      die "$(basename "$out"): sha256 is $got, expected $want (a part is missing, damaged or from another build)"
    fi
  fi
  mv "$out.tmp" "$out"
}

# --- 1, 2: the bundle ------------------------------------------------------------------------
mapfile -t parts < <(sorted_parts "$bundle" 'site.tar.xz.part*')
[ ${#parts[@]} -gt 0 ] || die "no site.tar.xz.part* under $bundle"
no_duplicates "${parts[@]}"
mapfile -t sums < <(find "$bundle" -type f -name 'site.tar.xz.sha256')
[ ${#sums[@]} -eq 1 ] || die "expected one site.tar.xz.sha256 under $bundle, found ${#sums[@]}"
want=$(awk 'NR == 1 { print $1 }' "${sums[0]}")
[[ $want =~ ^[0-9a-f]{64}$ ]] || die "${sums[0]} holds no sha256"
site=$prefix/site
if [ -f "$site/.bundle-sha256" ] && [ "$(cat "$site/.bundle-sha256")" = "$want" ]; then
  say "bundle $want already unpacked in $site"
else
  say "joining ${#parts[@]} parts: ${parts[*]}"
  join_checked "$prefix/site.tar.xz" "$want" "${parts[@]}"
  say "sha256 OK ($want)"
  rm -rf "$site.tmp" && mkdir -p "$site.tmp"
  tar -xJf "$prefix/site.tar.xz" -C "$site.tmp"
  rm -rf "$site" && mv "$site.tmp" "$site"
  echo "$want" > "$site/.bundle-sha256"
  rm -f "$prefix/site.tar.xz"
  say "unpacked into $site"
fi

# --- 3: the vllm entry point ---------------------------------------------------------------
mkdir -p "$prefix/bin"
printf '#!/bin/sh\nexec %q -m vllm.entrypoints.cli.main "$@"\n' "$py" > "$prefix/bin/vllm.tmp"
chmod +x "$prefix/bin/vllm.tmp" && mv "$prefix/bin/vllm.tmp" "$prefix/bin/vllm"

# --- 4: Rolecast and the packages the host lacks ---------------------------------------------
target=$prefix/python
if [ -n "$wheels" ]; then
  [ -d "$wheels" ] || die "no wheel folder $wheels"
  mkdir -p "$prefix/wheels"
  mapfile -t whole < <(sorted_parts "$wheels" '*.whl')
  mapfile -t pieces < <(sorted_parts "$wheels" '*.whl.part*')
  no_duplicates "${whole[@]}" "${pieces[@]}"
  declare -A split=()
  for piece in "${pieces[@]}"; do
    name=$(basename "$piece"); name=${name%.part*}
    split[$name]+="$piece"$'\n'
  done
  for name in "${!split[@]}"; do
    mapfile -t its_parts < <(printf '%s' "${split[$name]}")
    sum_file=$(find "$wheels" -type f -name "$name.sha256" -print -quit)
    sum=""
    [ -z "$sum_file" ] || sum=$(awk 'NR == 1 { print $1 }' "$sum_file")
    join_checked "$prefix/wheels/$name" "$sum" "${its_parts[@]}"
    say "joined $name from ${#its_parts[@]} parts"
    whole+=("$prefix/wheels/$name")
  done
  [ ${#whole[@]} -gt 0 ] || die "no wheels under $wheels"
  stamp=$(sha256sum "${whole[@]}" | awk '{ print $1 }' | sort | sha256sum | cut -d' ' -f1)
  if [ -f "$target/.wheels-sha256" ] && [ "$(cat "$target/.wheels-sha256")" = "$stamp" ]; then
    say "${#whole[@]} wheels already installed in $target"
  else
    rm -rf "$target.tmp"
    "$py" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
      --no-cache-dir --target "$target.tmp" "${whole[@]}"
    rm -rf "$target" && mv "$target.tmp" "$target"
    echo "$stamp" > "$target/.wheels-sha256"
    say "installed ${#whole[@]} wheels into $target"
  fi
fi
pythonpath=()
check=(--extras "$extras")
if [ -f "$target/rolecast/__init__.py" ]; then
  say "Rolecast from its wheel in $target"
else
  [ -f "$checkout/rolecast/__init__.py" ] || die "no rolecast wheel given and $checkout is no checkout"
  pythonpath+=("$checkout")
  check+=(--source "$checkout")
  say "Rolecast from the checkout $checkout"
fi
[ "$dry_run" = 1 ] || [ "$env_only" = 1 ] || check+=(--require-vllm)
[ -d "$target" ] && pythonpath+=("$target")
pythonpath+=("$site")
PYTHONPATH=$(IFS=:; echo "${pythonpath[*]}")${PYTHONPATH:+:$PYTHONPATH}
PATH=$prefix/bin:$PATH
export PYTHONPATH PATH VLLM_USE_FLASHINFER_SAMPLER=0

# --- 5: check ----------------------------------------------------------------------------------
"$py" "$here/host_check.py" "${check[@]}" \
  || die "the host is missing what is listed above (carry those wheels, --wheels)"

if [ "$env_only" = 1 ]; then
  printf 'export PATH=%q PYTHONPATH=%q VLLM_USE_FLASHINFER_SAMPLER=0\n' "$PATH" "$PYTHONPATH"
  exit 0
fi

# --- 6, 7: prepare the model, then become `rolecast serve --engine vllm` -----------------------
run=("$py" -m rolecast serve --engine vllm "${serve_args[@]}")
if [ "$dry_run" = 1 ]; then
  say "dry run: this is the command, and the vLLM command line it builds"
  printf 'PATH=%q PYTHONPATH=%q VLLM_USE_FLASHINFER_SAMPLER=0 %s\n' "$PATH" "$PYTHONPATH" \
    "$(printf '%q ' "${run[@]}" | sed 's/ $//')"
  "${run[@]}" --print-command
  exit 0
fi
"${run[@]}" --prepare-only >&2
say "starting: ${run[*]}"
exec "${run[@]}"

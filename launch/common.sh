# shellcheck shell=bash disable=SC2088
# (SC2088: a literal "~/" is on purpose here: remote paths keep their ~ for the remote side to expand.)
# Helpers shared by launch/tpu_pod.sh and launch/xpk.sh. Sourced, never executed.
#
# The local side of the launch scripts must also run under the bash 3.2 that macOS ships, so: no associative
# arrays, no ${x^^}, no mapfile, and empty arrays are expanded as ${a[@]+"${a[@]}"} (set -u).

PROG=${PROG:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}

# Exit 2 with a usage hint: a flag is missing, unknown or malformed.
usage_error() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# Exit 1: the arguments were fine but something went wrong.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 1
}

info() {
  printf '[%s] %s\n' "$PROG" "$*" >&2
}

# Quote one word for a POSIX shell (sh, dash, bash, zsh): bare when it holds only safe characters, else in single
# quotes with each ' written as '\''. The result is one line only if the word is.
shquote() {
  case $1 in
    '' | *[!A-Za-z0-9_@%+=:,./-]*)
      printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"
      ;;
    *) printf '%s' "$1" ;;
  esac
}

# Quote a whole argv, words joined by single spaces.
quote_argv() {
  local out='' word
  for word in "$@"; do
    out="$out${out:+ }$(shquote "$word")"
  done
  printf '%s' "$out"
}

# Quote a path for a remote shell, leaving a leading ~ unquoted so that the remote shell expands it.
quote_remote_path() {
  case $1 in
    '~') printf '~' ;;
    '~/'*) printf '~/%s' "$(shquote "${1#\~/}")" ;;
    *) shquote "$1" ;;
  esac
}

# Expand a leading ~ (the launch scripts pass remote paths through unexpanded).
expand_home() {
  case $1 in
    '~') printf '%s' "$HOME" ;;
    '~/'*) printf '%s/%s' "$HOME" "${1#\~/}" ;;
    *) printf '%s' "$1" ;;
  esac
}

# Run a command, or with DRY_RUN=1 print it as "+ <quoted argv>" on stdout instead. Real runs echo the command
# to stderr first, so a log shows what was done.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '+ %s\n' "$(quote_argv "$@")"
  else
    info "+ $(quote_argv "$@")"
    "$@"
  fi
}

# A comment line in the dry-run transcript (stdout), or an info line (stderr) in a real run.
note() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '# %s\n' "$*"
  else
    info "$*"
  fi
}

# The repository root (the parent of launch/).
repo_root() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Write a gzipped tarball of the code in $1 to $2: the files git tracks plus untracked files that are not ignored,
# as they are in the working tree (uncommitted edits included; .venv, runs/, caches excluded by .gitignore).
# Without git, the directory minus .git, .venv and runs.
make_code_tarball() {
  local src=$1 out=$2
  if git -C "$src" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    (
      cd "$src" || exit 1
      git ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          # Files deleted in the working tree are still in the index; skip them.
          if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
        done |
        COPYFILE_DISABLE=1 tar --null -T - -czf "$out"
    )
  else
    COPYFILE_DISABLE=1 tar -C "$src" --exclude=./.git --exclude=./.venv --exclude=./runs -czf "$out" .
  fi
}

# Describe make_code_tarball for a dry run.
print_code_tarball() {
  printf '+ cd %s && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf %s\n' \
    "$(shquote "$1")" "$(shquote "$2")"
}

# Shell helpers the launch scripts source (slurm_h100.sbatch keeps its own: sbatch runs a copy of the script, away
# from this file).
show() {  # the command as one line; arguments with spaces in single quotes
  local words=() word
  for word in "$@"; do if [[ "$word" == *" "* ]]; then words+=("'$word'"); else words+=("$word"); fi; done
  echo "${words[*]}"
}
quote_all() {  # the arguments quoted for a remote shell, each after a space; nothing for none
  if (( $# )); then printf ' %q' "$@"; fi
}

#!/usr/bin/env bash
# Installs the Debian packages whose files make up the bundled emo_jax corpus
# (see docs_data.md for what each domain reads and its licence).
#   sudo bash launch/install_corpus_sources.sh        (about 1 minute; idempotent)
# A package that this distribution does not have is reported and skipped; the corpus
# builder then leaves that domain out (it needs at least 3 domains).
set -u

PACKAGES=(
  bible-kjv        # the `bible` program: reads the KJV text (its data file is compressed)
  bible-kjv-text   # King James Bible (public domain)
  dict-gcide       # Webster's 1913 via GCIDE (GPL-3+)
  dict-foldoc      # Free On-line Dictionary of Computing (GFDL)
  dict-jargon      # Jargon File 4.4.7 (public domain)
  fortunes         # fortune cookies by category (BSD/various)
  fortunes-min
  manpages         # Linux man-pages (various free licences)
  manpages-dev
  python3-doc      # Python documentation (PSF licence)
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

missing=()
for pkg in "${PACKAGES[@]}"; do
  if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    echo "already installed: $pkg"
  else
    missing+=("$pkg")
  fi
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "corpus sources ready"
  exit 0
fi

$SUDO apt-get update -qq || echo "apt-get update failed; trying with the existing package lists"

available=()
for pkg in "${missing[@]}"; do
  if apt-cache show "$pkg" >/dev/null 2>&1; then
    available+=("$pkg")
  else
    echo "not available, skipped: $pkg"
  fi
done

if [ "${#available[@]}" -gt 0 ]; then
  $SUDO apt-get install -y -qq --no-install-recommends "${available[@]}" \
    || echo "some packages failed to install; the corpus builder will report missing domains"
fi
echo "corpus sources ready"

# shellcheck shell=bash disable=SC2034  # the globals set here are read by install.sh
# The machine checks of infra/install.sh, sourced by it (and by tests/unit/test_install_script.py, with
# stubbed commands on PATH). Only functions and constants: sourcing it changes no shell option and runs
# nothing. Each check says plainly what it found; `die` ends the script with a reason and what to do.

say() { printf '[setup] %s\n' "$*"; }
warn() { printf '[setup] WARNING: %s\n' "$*" >&2; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- sizes (MB), measured on Debian 12 (installed size with dependencies, rounded up) ----------------
# The project's own downloads, measured with `du -sh` after a full `make setup`: .venv 2.4 GB (PyFlink
# alone is most of it, CatBoost 0.3) plus pip's cache ~0.1 GB, .stack/lib 53 MB (Kafka 43, Flink connector 11),
# .stack/opensearch-2.19.4 60 MB plus its zip 57 MB in .stack/downloads, the face photos 2.3 MB,
# ~/.m2 (Maven's local repository) 129 MB. The figures below add about 20% for temporary files.
SIZE_VENV_MB=2900
SIZE_KAFKA_MB=60
SIZE_FLINK_MB=30
SIZE_FLINK_EXT_MB=5
SIZE_OPENSEARCH_MB=150
SIZE_FACES_MB=10
SIZE_M2_MB=160

# Rough installed size of an apt package with the dependencies a bare Debian 12 lacks (MB).
apt_size_mb() {
  case "$1" in
    openjdk-*-jdk-headless) echo 280 ;; # the JDK and its JRE
    maven) echo 20 ;;
    chromium) echo 450 ;; # chromium + chromium-common + fonts and X libraries
    mosquitto) echo 3 ;;
    kcat) echo 4 ;; # with librdkafka
    unzip) echo 1 ;;
    npm) echo 150 ;; # with nodejs and its node-* libraries
    prometheus) echo 100 ;; # the server and its web assets (without recommends)
    python3*-venv) echo 8 ;;
    *) echo 10 ;;
  esac
}

# --- the operating system ---------------------------------------------------------------------------
# Reads os-release ($1, default /etc/os-release) into OS_ID, OS_VERSION_ID, OS_PRETTY; warns when it is
# not Debian or Ubuntu (or a Debian older than 12), saying what setup then assumes. Never fails.
check_os() {
  local file="${1:-/etc/os-release}" id="" like="" version="" pretty=""
  if [[ -r "$file" ]]; then
    id="$(sed -n 's/^ID=//p' "$file" | tr -d '"')"
    like="$(sed -n 's/^ID_LIKE=//p' "$file" | tr -d '"')"
    version="$(sed -n 's/^VERSION_ID=//p' "$file" | tr -d '"')"
    pretty="$(sed -n 's/^PRETTY_NAME=//p' "$file" | tr -d '"')"
  fi
  OS_ID="${id:-unknown}" OS_VERSION_ID="$version" OS_PRETTY="${pretty:-unknown system (no $file)}"
  case "$OS_ID" in
    debian)
      if [[ "$version" =~ ^[0-9]+$ ]] && ((version < 12)); then
        warn "$OS_PRETTY: setup is written for Debian 12 or later; older package names may be missing"
      fi
      ;;
    ubuntu) ;;
    *)
      if [[ " $like " == *" debian "* || " $like " == *" ubuntu "* ]]; then
        warn "$OS_PRETTY is not Debian or Ubuntu: assuming it is Debian-like (ID_LIKE=$like), with apt-get and Debian's package names"
      else
        warn "$OS_PRETTY is not Debian or Ubuntu: assuming apt-get and Debian's package names anyway; install what is listed yourself if that fails"
      fi
      ;;
  esac
}

# --- Python -----------------------------------------------------------------------------------------
# The project's requires-python (pyproject.toml, e.g. ">=3.11,<3.13") as "MIN MAX_EXCLUSIVE".
python_range() {
  local spec lo hi
  spec="$(sed -n 's/^requires-python = "\(.*\)"$/\1/p' "${1:-pyproject.toml}")"
  lo="$(sed -n 's/.*>=\([0-9]*\.[0-9]*\).*/\1/p' <<<"$spec")"
  hi="$(sed -n 's/.*<\([0-9]*\.[0-9]*\).*/\1/p' <<<"$spec")"
  printf '%s %s' "${lo:-3.11}" "${hi:-4.0}"
}

# Is the dotted version $1 within [$2, $3)?
version_in_range() {
  local v="$1" lo="$2" hi="$3"
  [[ "$(printf '%s\n%s\n' "$lo" "$v" | sort -V | head -n1)" == "$lo" ]] &&
    [[ "$v" != "$hi" && "$(printf '%s\n%s\n' "$v" "$hi" | sort -V | head -n1)" == "$v" ]]
}

# Sets PYTHON, PYTHON_VERSION (major.minor) and PYTHON_SYS_VERSION (its sys.version) to $PYTHON when it is set, else to the first of python3,
# python3.11, python3.12 whose version fits requires-python; dies naming what it found otherwise.
pick_python() {
  local range lo hi py v out found=() tries=(python3 python3.11 python3.12)
  range="$(python_range "${1:-pyproject.toml}")"
  lo="${range% *}" hi="${range#* }"
  if [[ -n "${PYTHON:-}" ]]; then tries=("$PYTHON"); fi
  for py in "${tries[@]}"; do
    command -v "$py" >/dev/null 2>&1 || continue
    out="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2]); print(sys.version)' 2>/dev/null)" || continue
    v="${out%%$'\n'*}"
    if version_in_range "$v" "$lo" "$hi"; then
      PYTHON="$py" PYTHON_VERSION="$v" PYTHON_SYS_VERSION="${out#*$'\n'}"
      return 0
    fi
    found+=("$py=$v")
  done
  die "Python >=$lo,<$hi is needed (pyproject.toml requires-python); found: ${found[*]:-no python3 at all}." \
    "Install Debian 12's python3 (3.11), or set PYTHON=/path/to/python3.11"
}

# --- the JDK ----------------------------------------------------------------------------------------
# Sets JAVAC_MAJOR to the major version of the javac binary $1 (17 for "javac 17.0.15", 8 for
# "javac 1.8.0_292") and JAVAC_OUTPUT to what `javac -version` printed; returns 1 when it tells none.
javac_major() {
  local line major
  JAVAC_MAJOR="" JAVAC_OUTPUT=""
  JAVAC_OUTPUT="$("$1" -version 2>&1)" || return 1
  line="$(grep -m1 '^javac ' <<<"$JAVAC_OUTPUT")" || return 1
  major="${line#javac }"
  major="${major%%[._-]*}"
  if [[ "$major" == 1 ]]; then major="$(sed -n 's/^javac 1\.\([0-9]*\).*/\1/p' <<<"$line")"; fi
  [[ "$major" =~ ^[0-9]+$ ]] || return 1
  JAVAC_MAJOR="$major"
}

# Finds a JDK 17..21 -- a `javac`, not only a `java`: a JRE has no compiler. Looks at the javac on PATH,
# then at <dir>/*/bin/javac for each dir given (install.sh passes /usr/lib/jvm). On success sets
# JDK_HOME, JAVAC (its javac) and JAVAC_VERSION_LINE (what `javac -version` printed); otherwise returns
# 1 with JDK_PROBLEM saying what was found instead.
find_jdk() {
  local candidates=() javac home dir seen=""
  JDK_HOME="" JAVAC="" JAVAC_VERSION_LINE="" JDK_PROBLEM=""
  if javac="$(command -v javac 2>/dev/null)"; then candidates+=("$(readlink -f "$javac")"); fi
  for dir in "$@"; do
    for javac in "$dir"/*/bin/javac; do [[ -x "$javac" ]] && candidates+=("$(readlink -f "$javac")"); done
  done
  for javac in "${candidates[@]}"; do
    [[ " $seen " == *" $javac "* ]] && continue
    seen+=" $javac"
    if javac_major "$javac" && ((JAVAC_MAJOR >= 17 && JAVAC_MAJOR <= 21)); then
      home="$(dirname "$(dirname "$javac")")"
      JDK_HOME="$home" JAVAC="$javac" JAVAC_VERSION_LINE="$JAVAC_OUTPUT"
      return 0
    fi
    JDK_PROBLEM+="${JDK_PROBLEM:+; }$javac is Java ${JAVAC_MAJOR:-of unknown version} (17..21 needed)"
  done
  if ((${#candidates[@]} == 0)); then
    if command -v java >/dev/null 2>&1; then
      JDK_PROBLEM="java is there but no javac: a JRE only, the job's operators cannot be compiled"
    else
      JDK_PROBLEM="no java and no javac"
    fi
  fi
  return 1
}

# --- disk space -------------------------------------------------------------------------------------
# Free MB on the filesystem holding $1 (or its nearest existing parent).
free_mb() {
  local dir="$1"
  while [[ ! -e "$dir" && "$dir" != / ]]; do dir="$(dirname "$dir")"; done
  df -Pk "$dir" | awk 'NR == 2 { print int($4 / 1024) }'
}

# Mount point of the filesystem holding $1 (or its nearest existing parent).
mount_of() {
  local dir="$1"
  while [[ ! -e "$dir" && "$dir" != / ]]; do dir="$(dirname "$dir")"; done
  df -Pk "$dir" | awk 'NR == 2 { print $6 }'
}

# Dies unless the filesystem of $1 has $2 MB free; $3 says what needs it.
check_disk() {
  local dir="$1" need="$2" what="$3" free
  free="$(free_mb "$dir")"
  [[ "$free" =~ ^[0-9]+$ ]] || die "cannot tell the free disk space of $dir (df printed nothing usable)"
  if ((free < need)); then
    die "not enough disk space on $(mount_of "$dir") (for $dir): $what needs about $(human_mb "$need"), only $(human_mb "$free") free"
  fi
}

human_mb() { if (($1 >= 1024)); then printf '%d.%d GB' $(($1 / 1024)) $(($1 % 1024 * 10 / 1024)); else printf '%d MB' "$1"; fi; }

# --- root -------------------------------------------------------------------------------------------
# Sets SUDO (an array: empty as root, (sudo) otherwise) to install "$@"; dies naming them when there is
# neither root nor sudo.
need_root_for() {
  SUDO=()
  if [[ "$(id -u)" -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 ||
      die "root or sudo is needed to install the Debian packages $*: run 'apt-get install $*' as root, or make setup as root"
    SUDO=(sudo)
  fi
}

# --- the browser ------------------------------------------------------------------------------------
# CG_SETUP__BROWSER: auto (default: install chromium when apt can, never fail setup over it), yes (it
# must be installed), no (never). Without chromium the browser tests skip, saying why.
browser_mode() {
  local mode="${CG_SETUP__BROWSER:-auto}"
  case "$mode" in
    auto | yes | no) echo "$mode" ;;
    *) die "CG_SETUP__BROWSER must be auto, yes or no (got '$mode')" ;;
  esac
}

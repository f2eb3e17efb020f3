#!/usr/bin/env bash
# Installs everything the local stack and the project need, from package registries only:
#   - Debian packages (mosquitto, kcat, unzip; a JDK, Maven and python3-venv if missing)
#   - the Python virtualenv .venv with the project installed editable (pyproject.toml, extra "dev")
#   - the Kafka broker classpath (infra/kafka/pom.xml)          -> <stack>/lib/kafka
#   - the Flink SQL Kafka connector jar                          -> <stack>/lib/flink
#   - the job's own Flink operators (jobs/flink/java, javac)           -> <stack>/lib/flink-ext
#   - the OpenSearch integ-test distribution                     -> <stack>/opensearch-<version>
#
# Idempotent: each step writes a stamp (under <stack>/stamps; the venv's in .venv) keyed by a hash
# of what it installs (pinned versions, pom.xml, pyproject.toml); it is skipped while that matches.
# <stack> is $CG_STACK_DIR or .stack in the repo root. Pinned versions live in infra/stack.py.
set -euo pipefail

START_NS=$(date +%s%N)
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="$(realpath -m "${CG_STACK_DIR:-$REPO_ROOT/.stack}")"
PYTHON="${PYTHON:-python3}"
cd "$REPO_ROOT"

say() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# --- pinned versions: the single declaration is in infra/stack.py --------------------------------
pin() {
  local v
  v="$(sed -n "s/^$1 = \"\(.*\)\"$/\1/p" infra/stack.py)"
  [[ -n "$v" ]] || die "cannot read $1 from infra/stack.py"
  printf '%s' "$v"
}
OPENSEARCH_VERSION="$(pin OPENSEARCH_VERSION)"
FLINK_KAFKA_CONNECTOR="$(pin FLINK_KAFKA_CONNECTOR)"
MAVEN_DEPENDENCY_PLUGIN="$(pin MAVEN_DEPENDENCY_PLUGIN)"
MVN_DEP="org.apache.maven.plugins:maven-dependency-plugin:${MAVEN_DEPENDENCY_PLUGIN}"

STAMPS="$STACK_DIR/stamps"
mkdir -p "$STAMPS"

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
# A stamp is a file holding the key of what was installed; the venv's lives in .venv (one per clone,
# whatever the stack dir), the others under <stack>/stamps.
stamp_file() { if [[ "$1" == venv ]]; then echo .venv/.checkout-guard-stamp; else echo "$STAMPS/$1"; fi; }
stamp_ok() { local f; f="$(stamp_file "$1")"; [[ -f "$f" && "$(cat "$f")" == "$2" ]]; }
stamp_set() { printf '%s' "$2" >"$(stamp_file "$1")"; }

# Run a step with its output in <stack>/logs/install-<name>.log, shown only when it fails.
INSTALL_LOGS="$STACK_DIR/logs"
mkdir -p "$INSTALL_LOGS"
quiet() {
  local name="$1"; shift
  if ! "$@" >"$INSTALL_LOGS/install-$name.log" 2>&1; then
    tail -n 40 "$INSTALL_LOGS/install-$name.log" >&2
    die "$name failed (full output: $INSTALL_LOGS/install-$name.log)"
  fi
}

# --- 1. Debian packages ---------------------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }
apt_pkgs=()
have mosquitto || apt_pkgs+=(mosquitto)
have kcat || apt_pkgs+=(kcat)
have unzip || apt_pkgs+=(unzip)
# Headless browser for the live dashboard's browser test (tests/e2e/test_dashboard_browser_e2e.py).
have chromium || apt_pkgs+=(chromium)
# Kafka, Flink and OpenSearch 2.19 need a JDK 17..21 (not only "some java": 24+ lacks the security manager).
jdk_ok() {
  local java_bin
  java_bin="$(readlink -f "$(command -v java 2>/dev/null || echo /nonexistent)")"
  grep -qsE '^JAVA_VERSION="(17|18|19|20|21)[."]' "$(dirname "$(dirname "$java_bin")")/release" \
    /usr/lib/jvm/*/release
}
jdk_ok || apt_pkgs+=(openjdk-17-jdk-headless)
have mvn || apt_pkgs+=(maven)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_pkgs+=(python3-venv)
if ((${#apt_pkgs[@]})); then
  say "apt: installing ${apt_pkgs[*]}"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || die "need root (or sudo) to install: ${apt_pkgs[*]}"
    SUDO=(sudo)
  fi
  # Keep package scripts from starting services (mosquitto's own service would take port 1883):
  # we run our own processes with our own config.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    trap '"${SUDO[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  quiet apt "${SUDO[@]}" apt-get update
  quiet apt "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    "${apt_pkgs[@]}"
else
  say "apt: mosquitto kcat unzip chromium java mvn present"
fi

# --- 2. Python virtualenv -------------------------------------------------------------------------
venv_key="$(hash_of pyproject.toml <(printf '%s' "$("$PYTHON" -c 'import sys; print(sys.version)')"))"
if [[ -x .venv/bin/python ]] && stamp_ok venv "$venv_key"; then
  say "venv: up to date"
else
  if [[ ! -x .venv/bin/python ]]; then
    say "venv: creating .venv"
    "$PYTHON" -m venv .venv
    quiet pip .venv/bin/python -m pip install --upgrade pip
  fi
  say "venv: pip install -e '.[dev]' (first time downloads PyFlink, a few minutes)"
  quiet pip .venv/bin/python -m pip install -e '.[dev]'
  stamp_set venv "$venv_key"
fi

# --- 3. Kafka broker classpath --------------------------------------------------------------------
kafka_key="$(hash_of infra/kafka/pom.xml <(printf '%s' "$MVN_DEP"))"
if [[ -d "$STACK_DIR/lib/kafka" ]] && stamp_ok kafka "$kafka_key"; then
  say "kafka: up to date"
else
  say "kafka: resolving broker jars (infra/kafka/pom.xml)"
  rm -rf "$STACK_DIR/lib/kafka.tmp"
  quiet maven mvn -B -f infra/kafka/pom.xml "$MVN_DEP:copy-dependencies" \
    -DoutputDirectory="$STACK_DIR/lib/kafka.tmp"
  rm -rf "$STACK_DIR/lib/kafka"
  mv "$STACK_DIR/lib/kafka.tmp" "$STACK_DIR/lib/kafka"
  stamp_set kafka "$kafka_key"
fi

# --- 4. Flink Kafka connector ---------------------------------------------------------------------
flink_key="$(hash_of <(printf '%s %s' "$FLINK_KAFKA_CONNECTOR" "$MVN_DEP"))"
if [[ -d "$STACK_DIR/lib/flink" ]] && stamp_ok flink "$flink_key"; then
  say "flink connector: up to date"
else
  say "flink connector: fetching $FLINK_KAFKA_CONNECTOR"
  rm -rf "$STACK_DIR/lib/flink.tmp"
  (cd "$STACK_DIR" && quiet maven mvn -B "$MVN_DEP:copy" -Dartifact="$FLINK_KAFKA_CONNECTOR" \
    -DoutputDirectory="$STACK_DIR/lib/flink.tmp")
  rm -rf "$STACK_DIR/lib/flink"
  mv "$STACK_DIR/lib/flink.tmp" "$STACK_DIR/lib/flink"
  stamp_set flink "$flink_key"
fi

# --- 4b. The job's Java operators (batching in and out of Python), compiled against PyFlink's jars --
ext_sources=$(find jobs/flink/java -name '*.java' | sort)
ext_key="$(hash_of $ext_sources <(.venv/bin/python -c 'import pyflink; print(pyflink.__file__)'; javac -version 2>&1))"
ext_jar="$STACK_DIR/lib/flink-ext/checkout-guard-flink.jar"
if [[ -f "$ext_jar" ]] && stamp_ok flink-ext "$ext_key"; then
  say "job operators: up to date"
else
  say "job operators: compiling jobs/flink/java"
  pyflink_lib="$(.venv/bin/python -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')"
  rm -rf "$STACK_DIR/lib/flink-ext.tmp"
  mkdir -p "$STACK_DIR/lib/flink-ext.tmp/classes"
  # shellcheck disable=SC2086
  quiet javac javac --release 17 -nowarn -cp "$pyflink_lib/*" -d "$STACK_DIR/lib/flink-ext.tmp/classes" $ext_sources
  quiet jar jar cf "$STACK_DIR/lib/flink-ext.tmp/checkout-guard-flink.jar" -C "$STACK_DIR/lib/flink-ext.tmp/classes" .
  rm -rf "$STACK_DIR/lib/flink-ext.tmp/classes" "$STACK_DIR/lib/flink-ext"
  mv "$STACK_DIR/lib/flink-ext.tmp" "$STACK_DIR/lib/flink-ext"
  stamp_set flink-ext "$ext_key"
fi

# --- 5. OpenSearch --------------------------------------------------------------------------------
os_home="$STACK_DIR/opensearch-$OPENSEARCH_VERSION"
os_key="$(hash_of <(printf '%s %s' "$OPENSEARCH_VERSION" "$MVN_DEP"))"
if [[ -x "$os_home/bin/opensearch" ]] && stamp_ok opensearch "$os_key"; then
  say "opensearch: up to date"
else
  say "opensearch: fetching $OPENSEARCH_VERSION"
  mkdir -p "$STACK_DIR/downloads"
  (cd "$STACK_DIR" && quiet maven mvn -B "$MVN_DEP:copy" \
    -Dartifact="org.opensearch.distribution.integ-test-zip:opensearch:$OPENSEARCH_VERSION:zip" \
    -DoutputDirectory="$STACK_DIR/downloads")
  rm -rf "$STACK_DIR/opensearch.tmp" "$os_home"
  mkdir -p "$STACK_DIR/opensearch.tmp"
  unzip -q "$STACK_DIR/downloads/opensearch-$OPENSEARCH_VERSION.zip" -d "$STACK_DIR/opensearch.tmp"
  mv "$STACK_DIR/opensearch.tmp/opensearch-$OPENSEARCH_VERSION" "$os_home"
  rm -rf "$STACK_DIR/opensearch.tmp"
  stamp_set opensearch "$os_key"
fi

# --- 6. Face photos for the local camera (the face_recognition 1.3.0 sdist's test images) ---------
faces_key="face_recognition-1.3.0"
faces_dir="$STACK_DIR/faces/face_recognition-1.3.0/tests/test_images"
if compgen -G "$faces_dir/*.jpg" >/dev/null && stamp_ok faces "$faces_key"; then
  say "face photos: up to date"
else
  say "face photos: fetching the face_recognition 1.3.0 source package"
  mkdir -p "$STACK_DIR/downloads" "$STACK_DIR/faces"
  quiet faces .venv/bin/python -m pip download face_recognition==1.3.0 --no-deps --no-binary :all: \
    -d "$STACK_DIR/downloads"
  tar -xzf "$STACK_DIR/downloads/face_recognition-1.3.0.tar.gz" -C "$STACK_DIR/faces" \
    --wildcards 'face_recognition-1.3.0/tests/test_images/*.jpg'
  stamp_set faces "$faces_key"
fi

elapsed_ms=$((($(date +%s%N) - START_NS) / 1000000))
say "done in $((elapsed_ms / 1000)).$(printf '%03d' $((elapsed_ms % 1000)))s"

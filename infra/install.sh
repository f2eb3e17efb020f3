#!/usr/bin/env bash
# Installs everything the local stack and the project need, from package registries only:
#   - Debian packages (mosquitto, kcat, unzip, npm, prometheus; a JDK 17, Maven and python3.X-venv if missing;
#     chromium for the browser tests, see CG_SETUP__BROWSER below)
#   - the Python virtualenv .venv with the project installed editable (pyproject.toml, extra "dev")
#   - the Kafka broker classpath (infra/kafka/pom.xml)          -> <stack>/lib/kafka
#   - the Flink SQL Kafka connector jar                          -> <stack>/lib/flink
#     and aws-msk-iam-auth relocated for it (infra/flink-msk-iam/pom.xml, hash-checked)
#   - the job's own Flink operators (jobs/flink/java, javac)           -> <stack>/lib/flink-ext
#   - Flink's Prometheus reporter, and ours that binds CG_BIND_HOST     -> <stack>/lib/flink-plugins/metrics-prometheus
#     (jobs/flink/java-plugins/metrics-prometheus, javac)
#   - the OpenSearch integ-test distribution                     -> <stack>/opensearch-<version>
#
# First it checks the machine (infra/install_checks.sh: Debian or Ubuntu, Python per requires-python,
# a JDK 17..21 with javac, free disk space, root or sudo for missing apt packages) and, when something
# is missing, lists what it will install and about how big that is before installing it.
# Idempotent: each step writes a stamp (under <stack>/stamps; the venv's in .venv) keyed by a hash
# of what it installs (pinned versions, pom.xml, pyproject.toml); it is skipped while that matches.
# <stack> is $CG_STACK_DIR or .stack in the repo root. Pinned versions live in infra/stack.py.
# CG_SETUP__BROWSER=auto|yes|no: Debian's chromium, for the dashboard's browser tests and screenshots
# (tests/e2e/test_dashboard_browser_e2e.py, which skip without it). auto (default) installs it when apt
# can and goes on without it otherwise; yes fails setup without it; no never installs it.
# --plan: check the machine and print what would be installed, then stop (installs nothing).
set -euo pipefail

PLAN_ONLY=""
case "${1:-}" in
  --plan) PLAN_ONLY=1 ;;
  "") ;;
  *) printf 'usage: %s [--plan]\n' "$0" >&2; exit 2 ;;
esac
START_NS=$(date +%s%N)
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="$(realpath -m "${CG_STACK_DIR:-$REPO_ROOT/.stack}")"
cd "$REPO_ROOT"
# shellcheck source=infra/install_checks.sh
source infra/install_checks.sh

# --- pinned versions: the single declaration is in infra/stack.py --------------------------------
pin() {
  local v
  v="$(sed -n "s/^$1 = \"\(.*\)\"$/\1/p" infra/stack.py)"
  [[ -n "$v" ]] || die "cannot read $1 from infra/stack.py"
  printf '%s' "$v"
}
OPENSEARCH_VERSION="$(pin OPENSEARCH_VERSION)"
FLINK_KAFKA_CONNECTOR="$(pin FLINK_KAFKA_CONNECTOR)"
FLINK_METRICS_PROMETHEUS="$(pin FLINK_METRICS_PROMETHEUS)"
MAVEN_DEPENDENCY_PLUGIN="$(pin MAVEN_DEPENDENCY_PLUGIN)"
MSK_IAM_AUTH_ALL_SHA256="$(pin MSK_IAM_AUTH_ALL_SHA256)"
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

# --- 0. What is there, what is missing ------------------------------------------------------------
have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }
pick_python # PYTHON, PYTHON_VERSION: fits pyproject.toml's requires-python, or setup stops here
apt_pkgs=()
have mosquitto || apt_pkgs+=(mosquitto)
have kcat || apt_pkgs+=(kcat)
have unzip || apt_pkgs+=(unzip)
# npm fetches FacePlugin's network, one of the default face embedder's (fused3) three (make face-models)
have npm || apt_pkgs+=(npm)
# The stack's own Prometheus (infra/stack.py runs the binary with its own config and port). The package's
# system service (port 9090) is not started while installing (policy-rc.d below), and our stack never uses it.
have prometheus || apt_pkgs+=(prometheus)
# Kafka, Flink and OpenSearch 2.19 need Java 17..21 (24+ lacks the security manager), and the job's
# operators are compiled: a JDK with javac, not only a JRE's java.
JDK_PKG=openjdk-17-jdk-headless
jdk_missing=""
find_jdk /usr/lib/jvm || { jdk_missing="$JDK_PROBLEM"; apt_pkgs+=("$JDK_PKG"); }
have mvn || apt_pkgs+=(maven)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || apt_pkgs+=("python$PYTHON_VERSION-venv")
# Chromium only for the browser tests and screenshots; see CG_SETUP__BROWSER at the top.
BROWSER="$(browser_mode)"
browser_pkg=()
browser_note=""
if ! have chromium; then
  if [[ "$BROWSER" == no ]]; then
    browser_note="chromium not installed (CG_SETUP__BROWSER=no): the browser tests will skip"
  elif [[ "$BROWSER" == auto && -f "$STAMPS/browser-unavailable" ]]; then
    browser_note="chromium not installed ($(cat "$STAMPS/browser-unavailable")): the browser tests will skip; CG_SETUP__BROWSER=yes to try again"
  else
    browser_pkg=(chromium)
  fi
fi

# The steps whose stamps do not match (their keys are computed again when they run).
venv_key="$(hash_of pyproject.toml <(printf '%s' "$PYTHON_SYS_VERSION"))"
kafka_key="$(hash_of infra/kafka/pom.xml <(printf '%s' "$MVN_DEP"))"
flink_key="$(hash_of infra/flink-msk-iam/pom.xml <(printf '%s %s %s' "$FLINK_KAFKA_CONNECTOR" "$MVN_DEP" "$MSK_IAM_AUTH_ALL_SHA256"))"
os_home="$STACK_DIR/opensearch-$OPENSEARCH_VERSION"
os_key="$(hash_of <(printf '%s %s' "$OPENSEARCH_VERSION" "$MVN_DEP"))"
faces_key="face_recognition-1.3.0"
faces_dir="$STACK_DIR/faces/face_recognition-1.3.0/tests/test_images"
ext_jar="$STACK_DIR/lib/flink-ext/checkout-guard-flink.jar"
ext_sources=$(find jobs/flink/java -name '*.java' | sort)
ext_key_now() {
  # shellcheck disable=SC2086
  hash_of $ext_sources <(.venv/bin/python -c 'import pyflink; print(pyflink.__file__)'; printf '%s\n' "$JAVAC_VERSION_LINE")
}
# The job's Prometheus reporter, laid out as a Flink plugin folder (jobs/flink/job.py puts its jars on the local
# mini-cluster's context class loader: PyFlink's mini-cluster has no plugin manager).
plugin_dir="$STACK_DIR/lib/flink-plugins/metrics-prometheus"
plugin_src=jobs/flink/java-plugins/metrics-prometheus
plugin_files=$(find "$plugin_src" -type f | sort)
plugin_key_now() {
  # shellcheck disable=SC2086
  hash_of $plugin_files <(printf '%s %s\n' "$FLINK_METRICS_PROMETHEUS" "$MVN_DEP"; printf '%s\n' "$JAVAC_VERSION_LINE")
}
todo=()
[[ -x .venv/bin/python ]] && stamp_ok venv "$venv_key" || todo+=(venv)
[[ -d "$STACK_DIR/lib/kafka" ]] && stamp_ok kafka "$kafka_key" || todo+=(kafka)
[[ -d "$STACK_DIR/lib/flink" ]] && stamp_ok flink "$flink_key" || todo+=(flink)
ext_key=""
if [[ -n "$JDK_HOME" && " ${todo[*]} " != *" venv "* && -f "$ext_jar" ]]; then ext_key="$(ext_key_now)"; fi
[[ -n "$ext_key" ]] && stamp_ok flink-ext "$ext_key" || todo+=(flink-ext)
plugin_key=""
if [[ -n "$JDK_HOME" && -d "$plugin_dir" ]]; then plugin_key="$(plugin_key_now)"; fi
[[ -n "$plugin_key" ]] && stamp_ok flink-metrics "$plugin_key" || todo+=(flink-metrics)
[[ -x "$os_home/bin/opensearch" ]] && stamp_ok opensearch "$os_key" || todo+=(opensearch)
compgen -G "$faces_dir/*.jpg" >/dev/null && stamp_ok faces "$faces_key" || todo+=(faces)

# --- 0b. When something is missing: the machine, the plan with sizes, disk space, root ---------------
declare -A need_mb=() need_what=()
needs() { # needs DIR MB WHAT: add to the total of DIR's filesystem
  local m
  m="$(mount_of "$1")"
  need_mb[$m]=$((${need_mb[$m]:-0} + $2))
  need_what[$m]="${need_what[$m]:+${need_what[$m]}, }$3"
}
if [[ -n "$PLAN_ONLY" ]] || ((${#apt_pkgs[@]} + ${#browser_pkg[@]} + ${#todo[@]})); then
  check_os /etc/os-release
  say "machine: $OS_PRETTY; Python $PYTHON_VERSION ($(command -v "$PYTHON"))${JDK_HOME:+; JDK $JAVAC_MAJOR ($JDK_HOME)}"
  [[ -z "$jdk_missing" ]] || say "JDK: $jdk_missing -> installing $JDK_PKG"
  say "will install:"
  for p in "${apt_pkgs[@]}" "${browser_pkg[@]}"; do
    mb="$(apt_size_mb "$p")" why=""
    [[ "$p" != chromium ]] || why=", for the browser tests (CG_SETUP__BROWSER=$BROWSER; setup goes on without it unless yes)"
    say "  apt $p (~$(human_mb "$mb"))$why"
    needs /usr "$((mb * 3 / 2))" "apt $p" # the .deb files in /var/cache/apt, then unpacked
  done
  m2="${HOME:-/root}/.m2"
  for step in "${todo[@]}"; do
    case "$step" in
      venv)
        if [[ -x .venv/bin/python ]]; then
          say "  .venv: brought up to date with pyproject.toml from PyPI"
          needs "$REPO_ROOT" 500 ".venv's update"
        else
          say "  .venv: pyproject.toml's packages with [dev] from PyPI (~$(human_mb $SIZE_VENV_MB), PyFlink most of it)"
          needs "$REPO_ROOT" $SIZE_VENV_MB ".venv"
        fi ;;
      kafka) say "  $STACK_DIR/lib/kafka: the Kafka broker's jars from Maven Central (~$SIZE_KAFKA_MB MB)"
        needs "$STACK_DIR" $SIZE_KAFKA_MB "Kafka"; needs "$m2" $SIZE_M2_MB "$m2" ;;
      flink) say "  $STACK_DIR/lib/flink: $FLINK_KAFKA_CONNECTOR and aws-msk-iam-auth (relocated here) from Maven Central (~$SIZE_FLINK_MB MB)"
        needs "$STACK_DIR" $SIZE_FLINK_MB "the Flink connector" ;;
      flink-ext) say "  $STACK_DIR/lib/flink-ext: the job's Java operators, compiled here (<1 MB)"
        needs "$STACK_DIR" $SIZE_FLINK_EXT_MB "the job's operators" ;;
      flink-metrics) say "  $plugin_dir: $FLINK_METRICS_PROMETHEUS from Maven Central, and the job's reporter compiled here (<1 MB)"
        needs "$STACK_DIR" 1 "the job's Prometheus reporter" ;;
      opensearch) say "  $os_home: OpenSearch $OPENSEARCH_VERSION from Maven Central (~$SIZE_OPENSEARCH_MB MB with its zip)"
        needs "$STACK_DIR" $SIZE_OPENSEARCH_MB "OpenSearch" ;;
      faces) say "  $STACK_DIR/faces: the face_recognition 1.3.0 test photos from PyPI (~3 MB)"
        needs "$STACK_DIR" $SIZE_FACES_MB "the face photos" ;;
    esac
  done
  ((${#apt_pkgs[@]} + ${#browser_pkg[@]} + ${#todo[@]})) || say "  nothing: everything is installed"
  [[ -z "$browser_note" ]] || say "$browser_note"
  for m in "${!need_mb[@]}"; do
    check_disk "$m" "${need_mb[$m]}" "${need_what[$m]}"
    say "disk: $(human_mb "${need_mb[$m]}") needed on $m ($(human_mb "$(free_mb "$m")") free)"
  done
  if ((${#apt_pkgs[@]})); then
    if [[ "$(id -u)" -eq 0 ]]; then say "apt: runs as root"
    elif command -v sudo >/dev/null 2>&1; then say "apt: runs with sudo (it may ask for your password)"
    else need_root_for "${apt_pkgs[@]}"; fi
  fi
fi
[[ -z "$PLAN_ONLY" ]] || exit 0

# --- 1. Debian packages ---------------------------------------------------------------------------
apt_install() { # apt_install LOGNAME PKG...: apt-get install, output in the step's log
  local name="$1"
  shift
  quiet "$name" "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}
apt_ready=""
apt_prepare() { # once: root or sudo, no service starts, fresh package lists
  [[ -z "$apt_ready" ]] || return 0
  need_root_for "$@"
  # Keep package scripts from starting services (mosquitto's own service would take port 1883):
  # we run our own processes with our own config.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
    "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    trap '"${SUDO[@]}" rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  quiet apt "${SUDO[@]}" apt-get update
  apt_ready=1
}
apt_has() { apt-cache show --no-all-versions "$1" >/dev/null 2>&1; }
if ((${#apt_pkgs[@]})); then
  apt_prepare "${apt_pkgs[@]}"
  if [[ -n "$jdk_missing" ]] && ! apt_has "$JDK_PKG" && apt_has openjdk-21-jdk-headless; then
    say "apt: $JDK_PKG is not packaged here; installing openjdk-21-jdk-headless instead"
    apt_pkgs=("${apt_pkgs[@]/#$JDK_PKG/openjdk-21-jdk-headless}")
  fi
  say "apt: installing ${apt_pkgs[*]}"
  apt_install apt "${apt_pkgs[@]}"
  if [[ -n "$jdk_missing" ]]; then
    find_jdk /usr/lib/jvm || die "a JDK 17..21 is still missing after installing it: $JDK_PROBLEM"
  fi
else
  say "apt: mosquitto kcat unzip npm prometheus mvn$(have chromium && echo ' chromium') present, JDK $JAVAC_MAJOR ($JDK_HOME)"
fi
if ((${#browser_pkg[@]})); then
  # In a subshell: a failure (no root, no package, apt error) ends it, not setup, unless BROWSER=yes.
  if (apt_prepare chromium && { apt_has chromium || die "apt has no chromium package here"; } &&
    say "apt: installing chromium, for the browser tests (CG_SETUP__BROWSER=$BROWSER)" &&
    apt_install browser chromium); then
    rm -f "$STAMPS/browser-unavailable"
  elif [[ "$BROWSER" == yes ]]; then
    die "chromium could not be installed (CG_SETUP__BROWSER=yes); the reason is above"
  else
    printf 'CG_SETUP__BROWSER=auto could not install it on %s' "$(date +%F)" >"$STAMPS/browser-unavailable"
    warn "chromium not installed (the reason is above): the browser tests will skip; setup goes on." \
      "Setup will not try again by itself: CG_SETUP__BROWSER=yes make setup does"
  fi
elif [[ -n "$browser_note" ]]; then
  say "$browser_note"
fi

# --- 2. Python virtualenv -------------------------------------------------------------------------
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
if [[ -d "$STACK_DIR/lib/flink" ]] && stamp_ok flink "$flink_key"; then
  say "flink connector: up to date"
else
  say "flink connector: fetching $FLINK_KAFKA_CONNECTOR"
  rm -rf "$STACK_DIR/lib/flink.tmp"
  (cd "$STACK_DIR" && quiet maven mvn -B "$MVN_DEP:copy" -Dartifact="$FLINK_KAFKA_CONNECTOR" \
    -DoutputDirectory="$STACK_DIR/lib/flink.tmp")
  # MSK IAM for the job's Kafka client: aws-msk-iam-auth with its Kafka references relocated like the connector's
  say "flink connector: aws-msk-iam-auth, relocated for it (infra/flink-msk-iam/pom.xml)"
  msk_tmp="$STACK_DIR/lib/flink-msk-iam.tmp"
  rm -rf "$msk_tmp"
  quiet maven mvn -B -f infra/flink-msk-iam/pom.xml "$MVN_DEP:copy-dependencies" -DoutputDirectory="$msk_tmp/upstream"
  msk_all=("$msk_tmp"/upstream/aws-msk-iam-auth-*-all.jar)
  msk_sha="$(sha256sum "${msk_all[0]}" | cut -d' ' -f1)"
  [[ "$msk_sha" == "$MSK_IAM_AUTH_ALL_SHA256" ]] ||
    die "${msk_all[0]##*/}: sha256 $msk_sha, not the pinned MSK_IAM_AUTH_ALL_SHA256 (infra/stack.py)"
  quiet maven mvn -B -f infra/flink-msk-iam/pom.xml jar:jar shade:shade -Dout="$msk_tmp/build"
  mv "$msk_tmp"/build/aws-msk-iam-auth-*-flink-sql.jar "$STACK_DIR/lib/flink.tmp/"
  rm -rf "$msk_tmp"
  rm -rf "$STACK_DIR/lib/flink"
  mv "$STACK_DIR/lib/flink.tmp" "$STACK_DIR/lib/flink"
  stamp_set flink "$flink_key"
fi

# --- 4b. The job's Java operators (batching in and out of Python), compiled against PyFlink's jars --
# Computed before when the venv was already there (section 0); again when it was just built.
[[ -n "${ext_key:-}" && " ${todo[*]} " != *" venv "* ]] || ext_key="$(ext_key_now)"
if [[ -f "$ext_jar" ]] && stamp_ok flink-ext "$ext_key"; then
  say "job operators: up to date"
else
  say "job operators: compiling jobs/flink/java"
  pyflink_lib="$(.venv/bin/python -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')"
  rm -rf "$STACK_DIR/lib/flink-ext.tmp"
  mkdir -p "$STACK_DIR/lib/flink-ext.tmp/classes"
  # shellcheck disable=SC2086
  quiet javac "$JAVAC" --release 17 -nowarn -cp "$pyflink_lib/*" -d "$STACK_DIR/lib/flink-ext.tmp/classes" $ext_sources
  quiet jar "$JDK_HOME/bin/jar" cf "$STACK_DIR/lib/flink-ext.tmp/checkout-guard-flink.jar" -C "$STACK_DIR/lib/flink-ext.tmp/classes" .
  rm -rf "$STACK_DIR/lib/flink-ext.tmp/classes" "$STACK_DIR/lib/flink-ext"
  mv "$STACK_DIR/lib/flink-ext.tmp" "$STACK_DIR/lib/flink-ext"
  stamp_set flink-ext "$ext_key"
fi

# --- 4c. The job's Prometheus reporter: Flink's binds every interface, ours (a subclass) CG_BIND_HOST ------
# Computed before when the JDK was already there (section 0); again when it was just installed.
[[ -n "$plugin_key" ]] || plugin_key="$(plugin_key_now)"
if [[ -d "$plugin_dir" ]] && stamp_ok flink-metrics "$plugin_key"; then
  say "flink metrics reporter: up to date"
else
  say "flink metrics reporter: fetching $FLINK_METRICS_PROMETHEUS, compiling $plugin_src"
  pyflink_lib="$(.venv/bin/python -c 'import os, pyflink; print(os.path.join(os.path.dirname(pyflink.__file__), "lib"))')"
  rm -rf "$plugin_dir.tmp"
  mkdir -p "$plugin_dir.tmp/classes"
  (cd "$STACK_DIR" && quiet maven mvn -B "$MVN_DEP:copy" -Dartifact="$FLINK_METRICS_PROMETHEUS" \
    -DoutputDirectory="$plugin_dir.tmp")
  # shellcheck disable=SC2046
  quiet javac "$JAVAC" --release 17 -nowarn -cp "$pyflink_lib/*:$plugin_dir.tmp/*" -d "$plugin_dir.tmp/classes" \
    $(find "$plugin_src" -name '*.java' | sort)
  quiet jar "$JDK_HOME/bin/jar" cf "$plugin_dir.tmp/checkout-guard-metrics.jar" -C "$plugin_dir.tmp/classes" . \
    -C "$plugin_src" META-INF
  rm -rf "$plugin_dir.tmp/classes" "$plugin_dir"
  mv "$plugin_dir.tmp" "$plugin_dir"
  stamp_set flink-metrics "$plugin_key"
fi

# --- 5. OpenSearch --------------------------------------------------------------------------------
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

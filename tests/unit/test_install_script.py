"""The machine checks of ``make setup`` (infra/install_checks.sh, sourced by infra/install.sh).

Each test sources the checks in a fresh bash whose PATH holds only a sandbox: links to the few real
tools the checks use plus stubs (``java``, ``javac``, ``df``, ``id``, ``python3``) that print what a
real one would. No root, no network, and the caller's ``CG_*`` variables are not passed on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = REPO / "infra" / "install_checks.sh"
BASH = shutil.which("bash") or "/bin/bash"
TOOLS = ("sed", "tr", "grep", "sort", "head", "readlink", "dirname", "awk", "cat", "date")


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A bin folder with the real tools the checks need and nothing else (no java, javac, sudo, python)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        real = shutil.which(tool)
        assert real, f"{tool} is needed to run the checks"
        (bin_dir / tool).symlink_to(real)
    return bin_dir


def stub(folder: Path, name: str, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!" + BASH + "\n" + textwrap.dedent(script))
    path.chmod(0o755)
    return path


def run_checks(sandbox: Path, script: str, *extra_path: Path, env: dict[str, str] | None = None):
    """Source the checks and run ``script`` with PATH = ``extra_path`` + the sandbox."""
    path = os.pathsep.join([*map(str, extra_path), str(sandbox)])
    full_env = {"PATH": path, "HOME": str(sandbox.parent), "LC_ALL": "C", **(env or {})}
    return subprocess.run(
        [BASH, "--noprofile", "--norc", "-c", f"cd {REPO} && source {CHECKS} && {script}"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def fake_javac(folder: Path, version: str) -> Path:
    return stub(folder, "javac", f'echo "javac {version}"\n')


def fake_java(folder: Path) -> Path:
    return stub(folder, "java", 'echo "openjdk version \\"17.0.9\\"" >&2\n')


FIND_JDK = 'if find_jdk "$@"; then echo "ok $JDK_HOME $JAVAC_MAJOR"; else echo "missing: $JDK_PROBLEM"; fi'


def test_a_jre_only_machine_is_missing_the_jdk(sandbox: Path, tmp_path: Path) -> None:
    jre = tmp_path / "jvm" / "java-17-jre" / "bin"
    fake_java(jre)  # java on PATH and a JRE under the JVM folder, but no javac anywhere
    done = run_checks(sandbox, f"set -- {tmp_path / 'jvm'}; {FIND_JDK}", jre)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("missing: java is there but no javac"), done.stdout


def test_a_javac_17_on_path_is_the_jdk(sandbox: Path, tmp_path: Path) -> None:
    bin_dir = tmp_path / "jdk-17" / "bin"
    fake_java(bin_dir)
    fake_javac(bin_dir, "17.0.15")
    done = run_checks(sandbox, f"set --; {FIND_JDK}", bin_dir)
    assert done.stdout.strip() == f"ok {tmp_path / 'jdk-17'} 17", done.stdout + done.stderr


@pytest.mark.parametrize(("version", "major"), [("25.0.1", 25), ("11.0.2", 11), ("1.8.0_292", 8)])
def test_a_javac_outside_17_to_21_is_not_enough(sandbox: Path, tmp_path: Path, version: str, major: int) -> None:
    bin_dir = tmp_path / "jdk" / "bin"
    fake_javac(bin_dir, version)
    done = run_checks(sandbox, f"set --; {FIND_JDK}", bin_dir)
    assert done.stdout.startswith("missing: "), done.stdout
    assert f"is Java {major} (17..21 needed)" in done.stdout


def test_a_jdk_21_under_the_jvm_folder_is_found_when_path_has_a_newer_one(sandbox: Path, tmp_path: Path) -> None:
    newer = tmp_path / "jdk-25" / "bin"
    fake_javac(newer, "25.0.1")
    fake_javac(tmp_path / "jvm" / "java-21-openjdk" / "bin", "21.0.4")
    done = run_checks(sandbox, f"set -- {tmp_path / 'jvm'}; {FIND_JDK}", newer)
    assert done.stdout.strip() == f"ok {tmp_path / 'jvm' / 'java-21-openjdk'} 21", done.stdout + done.stderr


def fake_df(folder: Path, free_kb: int) -> Path:
    return stub(
        folder,
        "df",
        f"""\
        echo "Filesystem     1024-blocks      Used Available Capacity Mounted on"
        echo "/dev/vda       263174212  16000000 {free_kb}      18% /"
        """,
    )


def test_low_disk_space_stops_setup_with_a_clear_error(sandbox: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    fake_df(stubs, 100 * 1024)  # 100 MB free
    done = run_checks(sandbox, f'check_disk {tmp_path} 2300 ".venv"; echo after', stubs)
    assert done.returncode == 1
    assert "after" not in done.stdout
    assert "ERROR: not enough disk space on / " in done.stderr
    assert ".venv needs about 2.2 GB, only 100 MB free" in done.stderr


def test_enough_disk_space_passes(sandbox: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    fake_df(stubs, 50 * 1024 * 1024)
    done = run_checks(sandbox, f'check_disk {tmp_path / "not" / "yet"} 2300 ".venv" && echo ok', stubs)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def fake_python(folder: Path, version: str) -> Path:
    return stub(folder, "python3", f'echo "{version[:4]}"; echo "{version} (main) [GCC 12.2.0]"\n')


def test_python_older_than_requires_python_stops_setup(sandbox: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    fake_python(stubs, "3.10.12")
    done = run_checks(sandbox, "pick_python pyproject.toml; echo after", stubs)
    assert done.returncode == 1 and "after" not in done.stdout
    assert "Python >=3.11,<3.13 is needed (pyproject.toml requires-python); found: python3=3.10" in done.stderr


def test_python_3_11_is_picked(sandbox: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    fake_python(stubs, "3.11.2")
    done = run_checks(sandbox, 'pick_python pyproject.toml; echo "$PYTHON $PYTHON_VERSION|$PYTHON_SYS_VERSION"', stubs)
    assert done.stdout.strip() == "python3 3.11|3.11.2 (main) [GCC 12.2.0]", done.stderr


def test_no_root_and_no_sudo_names_the_packages(sandbox: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    stub(stubs, "id", "echo 1000\n")
    done = run_checks(sandbox, "need_root_for mosquitto openjdk-17-jdk-headless", stubs)
    assert done.returncode == 1
    assert "root or sudo is needed to install the Debian packages mosquitto openjdk-17-jdk-headless" in done.stderr


def test_sudo_is_used_when_not_root(sandbox: Path, tmp_path: Path) -> None:
    stubs = tmp_path / "stubs"
    stub(stubs, "id", "echo 1000\n")
    stub(stubs, "sudo", 'exec "$@"\n')
    done = run_checks(sandbox, 'need_root_for kcat && echo "${SUDO[*]}"', stubs)
    assert done.stdout.strip() == "sudo", done.stderr


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        ('ID=debian\nVERSION_ID="12"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n', None),
        ('ID=ubuntu\nVERSION_ID="24.04"\nPRETTY_NAME="Ubuntu 24.04 LTS"\n', None),
        ('ID=debian\nVERSION_ID="11"\nPRETTY_NAME="Debian GNU/Linux 11 (bullseye)"\n', "written for Debian 12"),
        ('ID=linuxmint\nID_LIKE="ubuntu debian"\nPRETTY_NAME="Linux Mint 21"\n', "assuming it is Debian-like"),
        ('ID=fedora\nVERSION_ID=40\nPRETTY_NAME="Fedora Linux 40"\n', "assuming apt-get and Debian's package names"),
    ],
)
def test_the_os_is_read_and_non_debian_is_warned_about(
    sandbox: Path, tmp_path: Path, content: str, warning: str | None
) -> None:
    release = tmp_path / "os-release"
    release.write_text(content)
    done = run_checks(sandbox, f'check_os {release}; echo "$OS_ID|$OS_PRETTY"')
    assert done.returncode == 0
    assert done.stdout.strip().split("|")[0] == content.split("\n")[0].removeprefix("ID=")
    if warning is None:
        assert done.stderr == ""
    else:
        assert "WARNING:" in done.stderr and warning in done.stderr


@pytest.mark.parametrize(("value", "mode"), [(None, "auto"), ("yes", "yes"), ("no", "no")])
def test_browser_mode(sandbox: Path, value: str | None, mode: str) -> None:
    env = {"CG_SETUP__BROWSER": value} if value else {}
    done = run_checks(sandbox, "browser_mode", env=env)
    assert done.stdout.strip() == mode, done.stderr


def test_a_wrong_browser_mode_is_refused(sandbox: Path) -> None:
    done = run_checks(sandbox, "browser_mode", env={"CG_SETUP__BROWSER": "maybe"})
    assert done.returncode == 1 and "CG_SETUP__BROWSER must be auto, yes or no" in done.stderr


def test_install_script_parses_and_sources_the_checks() -> None:
    assert subprocess.run([BASH, "-n", str(REPO / "infra" / "install.sh")], timeout=30).returncode == 0
    assert "source infra/install_checks.sh" in (REPO / "infra" / "install.sh").read_text()

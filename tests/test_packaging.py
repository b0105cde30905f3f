"""Packaging: the systemd unit, the sysusers and firewalld files, and the RPM built for real.

These run the real tools (systemd-analyze, systemd-sysusers, rpmbuild, rpm, rpmlint) and skip,
naming the Debian package to install, only when a tool is missing; `.ci/packaging-tools.sh`
installs them in CI. The RPM is built on Debian: specs/fedora-compat.macros stands in for the
Fedora-only macros, and rpmbuild runs with --nodeps because Debian's rpm database cannot
satisfy Fedora BuildRequires (python3-devel, pyproject-rpm-macros, systemd-rpm-macros).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "neuron.service"
SYSUSERS = REPO / "systemd" / "neuron-sysusers.conf"
FIREWALLD = REPO / "systemd" / "neuron-firewalld.xml"
SPEC = REPO / "specs" / "neuron.spec"
COMPAT_MACROS = REPO / "specs" / "fedora-compat.macros"
RPMLINTRC = REPO / "specs" / "neuron.rpmlintrc"

TOOL_TIMEOUT_S = 60
# The build takes a few seconds; the bound is well inside pytest's 300 s per test.
BUILD_TIMEOUT_S = 180

# Where the host keeps systemd's own units (sysinit.target and friends), which
# `systemd-analyze verify --root` needs inside the alternate root.
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def require_tool(name: str, package: str) -> None:
    if shutil.which(name) is None:
        pytest.skip(f"{name} not installed: apt-get install {package}")


def run(
    cmd: list[str],
    *,
    timeout: float = TOOL_TIMEOUT_S,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=env,
        input=stdin,
        check=False,
    )


def explain(proc: subprocess.CompletedProcess[str], tail: int = 60) -> str:
    """The command, its status and the end of its output (a build log runs to hundreds of lines)."""

    def last(text: str) -> str:
        return "\n".join(text.splitlines()[-tail:])

    return (
        f"{proc.args} exited {proc.returncode}\n"
        f"--- stdout\n{last(proc.stdout)}\n--- stderr\n{last(proc.stderr)}"
    )


def unit_settings(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> values (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


# --- systemd unit -------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    require_tool("systemd-analyze", "systemd")
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    assert host_units is not None, (
        f"no systemd unit directory with sysinit.target in {HOST_UNIT_DIRS}"
    )

    # An alternate root laid out as the RPM installs it: the unit, unchanged, beside the
    # host's own units, and stubs for /usr/bin/neuronctl and /usr/bin/kill (ExecReload=),
    # since verify checks that Exec*= lines name executables (the real neuronctl exists only
    # once the package is installed; kill comes from util-linux on the target).
    root = tmp_path / "root"
    unit_dir = root / "usr/lib/systemd/system"
    shutil.copytree(host_units, unit_dir, symlinks=True)
    shutil.copy2(UNIT, unit_dir / "neuron.service")
    (root / "usr/bin").mkdir(parents=True)
    for name in ("neuronctl", "kill"):
        stub = root / "usr/bin" / name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)

    proc = run(["systemd-analyze", "verify", f"--root={root}", "neuron.service"])

    # verify exits 0 even for unknown keys or unparsable values (it only warns), so any
    # message about the unit fails the test too.
    complaints = [
        line for line in (proc.stdout + proc.stderr).splitlines() if "neuron.service" in line
    ]
    assert proc.returncode == 0 and not complaints, explain(proc)


def test_unit_settings_keep_the_service_contract() -> None:
    unit = unit_settings(UNIT)
    service, unit_section = unit["Service"], unit["Unit"]
    assert service["ExecStart"] == ["/usr/bin/neuronctl start --config /etc/neuron/neuron.toml"]
    assert service["ExecReload"] == ["/usr/bin/kill -HUP $MAINPID"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["User"] == ["neuron"] and service["Group"] == ["neuron"]
    assert service["Restart"] == ["on-failure"]
    assert service["TimeoutStartSec"] == ["1800s"]
    assert service["KillMode"] == ["mixed"]
    assert "WatchdogSec" in service and "TimeoutStopSec" in service
    assert service["StateDirectory"] == ["neuron"] and service["LogsDirectory"] == ["neuron"]
    assert "StartLimitIntervalSec" in unit_section and "StartLimitBurst" in unit_section
    # These would take the GPU away from the workers (see the comments in the unit).
    for setting in ("PrivateDevices", "MemoryDenyWriteExecute", "ProtectClock", "DeviceAllow"):
        assert setting not in service, f"{setting}= breaks GPU workers"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --- sysusers and firewalld ---------------------------------------------------------------


def test_sysusers_file_creates_the_neuron_account(tmp_path: Path) -> None:
    require_tool("systemd-sysusers", "systemd")
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("passwd", "group", "shadow", "gshadow"):
        (etc / name).touch()

    proc = run(["systemd-sysusers", f"--root={tmp_path}", "-"], stdin=SYSUSERS.read_text())

    assert proc.returncode == 0, explain(proc)
    passwd = (etc / "passwd").read_text()
    assert re.search(
        r"^neuron:x:(\d+):\d+:neuron model server:/var/lib/neuron:/sbin/nologin$", passwd, re.M
    ), passwd
    uid_gid = re.search(r"^neuron:x:\d+:(\d+):", passwd, re.M)
    assert uid_gid is not None
    assert re.search(rf"^neuron:x:{uid_gid.group(1)}:", (etc / "group").read_text(), re.M)


def test_firewalld_service_opens_13131_tcp() -> None:
    service = ET.parse(FIREWALLD).getroot()
    assert service.tag == "service"
    assert service.findtext("short") == "neuron"
    ports = [(p.get("protocol"), p.get("port")) for p in service.iter("port")]
    assert ports == [("tcp", "13131")]


# --- the RPM ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuiltRpm:
    path: Path
    sources: Path  # SOURCES of the build: Source0 and Source1


def spec_version() -> str:
    match = re.search(r"^Version:\s*(\S+)", SPEC.read_text(), re.M)
    assert match, f"no Version: in {SPEC}"
    return match.group(1)


def package_version() -> str:
    match = re.search(
        r'^__version__ = "([^"]+)"', (REPO / "neuronctl/__init__.py").read_text(), re.M
    )
    assert match, "no __version__ in neuronctl/__init__.py"
    return match.group(1)


def source_files() -> list[Path]:
    """What a commit of the working tree would hold: tracked plus untracked, not ignored."""
    proc = run(
        [
            "git",
            "-c",
            "safe.directory=*",
            "ls-files",
            "-z",
            "--cached",
            "--others",
            "--exclude-standard",
        ],
        cwd=REPO,
    )
    assert proc.returncode == 0, explain(proc)
    names = [Path(n) for n in proc.stdout.split("\0") if n]
    # Deleted-but-tracked files are listed too; the .venv/ is ignored but make sure of it.
    return [n for n in names if (REPO / n).is_file() and n.parts[0] not in (".venv", ".git")]


def write_source_tarball(stage: Path, tarball: Path, top: str) -> None:
    tree = stage / top
    for name in source_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    # Files other work in progress has not written yet: placeholders in this copy only,
    # so the spec can be built before they exist.
    placeholders = {
        "README.md": "# neuronctl\n",
        "config/neuron.example.toml": "# placeholder written by tests/test_packaging.py\n",
    }
    for placeholder, text in placeholders.items():
        path = tree / placeholder
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tree, arcname=top)


def isolated_env(home: Path) -> dict[str, str]:
    """The build must not depend on the host's ~/.rpmmacros or pip configuration."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    home.mkdir(exist_ok=True)
    env["HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def built_rpm(tmp_path_factory: pytest.TempPathFactory) -> BuiltRpm:
    require_tool("rpmbuild", "rpm")
    require_tool("git", "git")
    # The wheel is built offline with the backend this interpreter already has
    # (pip wheel --no-build-isolation); setuptools >= 70.1 needs no separate `wheel`.
    probe = run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u, setuptools; "
            "raise SystemExit(not (u.find_spec('setuptools.command.bdist_wheel') "
            "or u.find_spec('wheel')))",
        ]
    )
    if probe.returncode != 0:
        pytest.skip(f"{sys.executable} cannot build wheels: pip install 'setuptools>=68' wheel")

    version = spec_version()
    assert version == package_version(), (
        f"specs/neuron.spec Version {version} != neuronctl.__version__ {package_version()}"
    )
    top = tmp_path_factory.mktemp("rpmbuild")
    sources = top / "SOURCES"
    sources.mkdir()
    write_source_tarball(top / "stage", sources / f"neuron-{version}.tar.gz", f"neuron-{version}")
    shutil.copy2(SYSUSERS, sources / "neuron-sysusers.conf")

    # --load before --define: rpm applies them in order, and the compat file sets a
    # default __python3 that this interpreter (which has setuptools) must override.
    proc = run(
        [
            "rpmbuild",
            "-bb",
            "--nodeps",
            "--load",
            str(COMPAT_MACROS),
            "--define",
            f"__python3 {sys.executable}",
            "--define",
            f"_topdir {top}",
            str(SPEC),
        ],
        timeout=BUILD_TIMEOUT_S,
        env=isolated_env(top / "home"),
    )
    assert proc.returncode == 0, explain(proc)
    rpms = sorted((top / "RPMS" / "noarch").glob(f"neuron-{version}-*.noarch.rpm"))
    assert len(rpms) == 1, f"expected one neuron rpm, found {rpms}\n{explain(proc)}"
    return BuiltRpm(path=rpms[0], sources=sources)


def rpm_query(rpm: Path, *args: str) -> list[str]:
    proc = run(["rpm", "-qp", *args, str(rpm)])
    assert proc.returncode == 0, explain(proc)
    return proc.stdout.splitlines()


def test_rpm_installs_the_service_files(built_rpm: BuiltRpm) -> None:
    files = set(rpm_query(built_rpm.path, "-l"))
    expected = {
        "/usr/bin/neuronctl",
        "/usr/lib/systemd/system/neuron.service",
        "/usr/lib/sysusers.d/neuron.conf",
        "/usr/lib/firewalld/services/neuron.xml",
        "/etc/neuron",
        "/etc/neuron/neuron.toml",
        "/var/log/neuron",
        "/var/lib/neuron",
    }
    assert expected <= files, sorted(expected - files)
    site = r"/usr/lib/python3\.\d+/site-packages"
    for module in ("neuronctl/__init__.py", "neuronctl/cli/app.py", "neuronctl/node/start.py",
                   "workers/__init__.py", "neuronctl/api/ui/index.html",
                   "neuronctl/api/ui/app.js", "neuronctl/api/ui/app.css"):
        assert any(re.fullmatch(f"{site}/{module}", f) for f in files), f"{module} not packaged"
    assert any(re.fullmatch(rf"{site}/neuronctl-[^/]+\.dist-info/METADATA", f) for f in files)


def test_rpm_config_is_noreplace(built_rpm: BuiltRpm) -> None:
    lines = rpm_query(built_rpm.path, "--qf", r"[%{FILEFLAGS:fflags} %{FILENAMES}\n]")
    flags = {name: fl for fl, _, name in (line.partition(" ") for line in lines)}
    assert "c" in flags["/etc/neuron/neuron.toml"] and "n" in flags["/etc/neuron/neuron.toml"]


def test_rpm_directory_owners_and_modes(built_rpm: BuiltRpm) -> None:
    lines = rpm_query(
        built_rpm.path,
        "--qf",
        r"[%{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms} %{FILENAMES}\n]",
    )
    owner_mode = {name: rest for rest, _, name in (line.rpartition(" ") for line in lines)}
    assert owner_mode["/var/lib/neuron"] == "neuron:neuron drwx------"
    assert owner_mode["/var/log/neuron"] == "neuron:neuron drwxr-xr-x"
    assert owner_mode["/etc/neuron"] == "root:root drwxr-xr-x"
    assert owner_mode["/usr/bin/neuronctl"] == "root:root -rwxr-xr-x"


def test_rpm_dependencies(built_rpm: BuiltRpm) -> None:
    provides = rpm_query(built_rpm.path, "--provides")
    assert "user(neuron)" in provides and "group(neuron)" in provides, provides
    requires = " ".join(rpm_query(built_rpm.path, "--requires"))
    for dist in ("aiohttp", "filelock", "huggingface-hub", "psutil", "rich", "typer"):
        assert f"python3dist({dist})" in requires, requires
    # The supervisor lock relies on filelock opening its file with O_NOFOLLOW.
    assert "python3dist(filelock) >= 3.20.1" in requires, requires
    recommends = rpm_query(built_rpm.path, "--recommends")
    assert "python3dist(llama-cpp-python)" in recommends and "python3dist(uvloop)" in recommends


def test_rpm_scriptlets(built_rpm: BuiltRpm) -> None:
    scripts = "\n".join(rpm_query(built_rpm.path, "--scripts"))
    # %pre, generated from the sysusers file at build time
    assert "groupadd -r 'neuron'" in scripts, scripts
    assert re.search(r"useradd -r -g 'neuron' -d '/var/lib/neuron' -s '/sbin/nologin'", scripts)
    # %post / %preun / %postun: preset on install, stop on removal, restart on upgrade
    assert "preset neuron.service" in scripts
    assert "disable --now neuron.service" in scripts
    assert "try-restart neuron.service" in scripts
    # The /usr/bin/neuronctl shebang is the system interpreter, not the build's venv.
    assert "/usr/bin/python3" in rpm_query(built_rpm.path, "--requires")


def test_rpmlint_reports_no_errors(built_rpm: BuiltRpm, tmp_path: Path) -> None:
    require_tool("rpmlint", "rpmlint")
    # Spec and rpm in one run, as Fedora's review tooling does, so that rpmlint counts a
    # filter of neuron.rpmlintrc as used when either of them needs it. The spec sits beside
    # its sources (rpmlint parses it with _sourcedir set to the spec's directory, and %pre
    # reads Source1), and ~/.rpmmacros holds the same compat macros as the build.
    lint = tmp_path / "lint"
    shutil.copytree(built_rpm.sources, lint)
    shutil.copy2(SPEC, lint / "neuron.spec")
    env = isolated_env(tmp_path / "home")
    (tmp_path / "home" / ".rpmmacros").write_text(
        COMPAT_MACROS.read_text() + f"\n%__python3 {sys.executable}\n"
    )

    proc = run(
        ["rpmlint", "-r", str(RPMLINTRC), str(lint / "neuron.spec"), str(built_rpm.path)],
        cwd=lint,
        env=env,
    )

    summary = re.search(
        r"(\d+) packages and (\d+) specfiles checked; (\d+) errors, (\d+) warnings", proc.stdout
    )
    assert summary, explain(proc)
    packages, specfiles, errors, _warnings = map(int, summary.groups())
    assert (packages, specfiles) == (1, 1), explain(proc)
    assert errors == 0, explain(proc)


# --- the source RPM, as COPR builds it ----------------------------------------------------

COPR_MAKEFILE = REPO / ".copr" / "Makefile"


@dataclass(frozen=True)
class BuiltSrpm:
    path: Path
    rebuilt: Path  # the binary RPM `rpmbuild --rebuild` made from it


@pytest.fixture(scope="module")
def built_srpm(tmp_path_factory: pytest.TempPathFactory) -> BuiltSrpm:
    """The SRPM made the way COPR's make_srpm method makes it, then rebuilt into a binary RPM."""
    require_tool("rpmbuild", "rpm")
    require_tool("git", "git")
    require_tool("make", "make")
    top = tmp_path_factory.mktemp("srpm")
    outdir = top / "out"
    env = isolated_env(top / "home")

    # COPR runs this from the clone's root with outdir= and spec= on the command line.
    proc = run(
        ["make", "-f", str(COPR_MAKEFILE), "srpm", f"outdir={outdir}", f"spec={SPEC}"],
        cwd=REPO,
        env=env,
        timeout=BUILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, explain(proc)
    srpms = sorted(outdir.glob("*.src.rpm"))
    version = spec_version()
    assert [p.name for p in srpms] == [f"neuron-{version}-1.src.rpm"], explain(proc)

    proc = run(
        [
            "rpmbuild",
            "--rebuild",
            "--nodeps",
            "--load",
            str(COMPAT_MACROS),
            "--define",
            f"__python3 {sys.executable}",
            "--define",
            f"_topdir {top / 'rebuild'}",
            str(srpms[0]),
        ],
        timeout=BUILD_TIMEOUT_S,
        env=env,
    )
    assert proc.returncode == 0, explain(proc)
    rpms = sorted((top / "rebuild" / "RPMS" / "noarch").glob("neuron-*.noarch.rpm"))
    assert len(rpms) == 1, explain(proc)
    return BuiltSrpm(path=srpms[0], rebuilt=rpms[0])


def test_srpm_holds_the_spec_and_its_sources_only(built_srpm: BuiltSrpm) -> None:
    version = spec_version()
    # Source1 (the sysusers file) travels beside the tarball because %pre is generated from
    # it while the spec is parsed, before %prep could unpack it from Source0.
    assert sorted(rpm_query(built_srpm.path, "-l")) == [
        f"neuron-{version}.tar.gz",
        "neuron-sysusers.conf",
        "neuron.spec",
    ]


def test_srpm_tarball_is_the_source_tree(built_srpm: BuiltSrpm, tmp_path: Path) -> None:
    require_tool("cpio", "cpio")
    version = spec_version()
    proc = run(["sh", "-c", f"rpm2cpio '{built_srpm.path}' | cpio -idm --quiet"], cwd=tmp_path)
    assert proc.returncode == 0, explain(proc)
    with tarfile.open(tmp_path / f"neuron-{version}.tar.gz") as tar:
        names = set(tar.getnames())
        owners = {(m.uid, m.gid) for m in tar.getmembers()}
    top = f"neuron-{version}"
    expected = {f"{top}/{n.as_posix()}" for n in source_files()}
    assert names == expected, (sorted(names - expected)[:10], sorted(expected - names)[:10])
    assert owners == {(0, 0)}
    assert (tmp_path / "neuron.spec").read_bytes() == SPEC.read_bytes()
    assert (tmp_path / "neuron-sysusers.conf").read_bytes() == SYSUSERS.read_bytes()


def test_make_srpm_writes_the_same_package(built_srpm: BuiltSrpm, tmp_path: Path) -> None:
    require_tool("make", "make")
    proc = run(["make", "srpm", f"SRPM_DIR={tmp_path}"], cwd=REPO, env=isolated_env(tmp_path / "h"))
    assert proc.returncode == 0, explain(proc)
    assert [p.name for p in tmp_path.glob("*.src.rpm")] == [built_srpm.path.name]
    assert rpm_query(tmp_path / built_srpm.path.name, "-l") == rpm_query(built_srpm.path, "-l")


def test_srpm_rebuilds_into_the_same_binary_package(
    built_srpm: BuiltSrpm, built_rpm: BuiltRpm
) -> None:
    assert rpm_query(built_srpm.rebuilt, "-l") == rpm_query(built_rpm.path, "-l")
    assert rpm_query(built_srpm.rebuilt, "--requires") == rpm_query(built_rpm.path, "--requires")
    scripts = "\n".join(rpm_query(built_srpm.rebuilt, "--scripts"))
    assert "groupadd -r 'neuron'" in scripts, scripts


def test_rpmlint_passes_the_srpm_and_its_rebuild(built_srpm: BuiltSrpm, tmp_path: Path) -> None:
    require_tool("rpmlint", "rpmlint")
    env = isolated_env(tmp_path / "home")
    (tmp_path / "home" / ".rpmmacros").write_text(
        COMPAT_MACROS.read_text() + f"\n%__python3 {sys.executable}\n"
    )
    proc = run(
        ["rpmlint", "-r", str(RPMLINTRC), str(built_srpm.path), str(built_srpm.rebuilt)],
        cwd=tmp_path,
        env=env,
    )
    summary = re.search(r"(\d+) packages and \d+ specfiles checked; (\d+) errors", proc.stdout)
    assert summary, explain(proc)
    assert summary.groups() == ("2", "0"), explain(proc)

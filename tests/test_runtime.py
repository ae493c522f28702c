"""What refattn does to the process it runs in (refattn/_runtime.py): Numba's cache goes to
the user's cache folder, never into the package; a first compile says so on stderr, once;
and the README's set-up commands are what `.ci/run` runs."""

import os
import subprocess
import sys
from pathlib import Path

import refattn

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(refattn.__file__).resolve().parent

# Compiles one small kernel (the mask set operations) in a fresh process.
UNION = ("from refattn import patterns; "
         "print((patterns.get('causal').mask(8, 8) | patterns.get('dense').mask(8, 8)).nnz)")


def numba_files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")}


def run_python(code: str, env_update: dict, drop=("NUMBA_CACHE_DIR", "REFATTN_QUIET")) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_numba_cache_goes_to_the_user_cache_not_the_package(tmp_path):
    before = numba_files(PACKAGE)
    proc = run_python(UNION, {"XDG_CACHE_HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "64"
    assert numba_files(PACKAGE) == before, "Numba wrote its cache into the package folder"
    assert numba_files(tmp_path / "refattn" / "numba"), "no cache in the user cache folder"


def test_numba_cache_dir_is_respected(tmp_path):
    proc = run_python(UNION, {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "NUMBA_CACHE_DIR": str(tmp_path / "nb")})
    assert proc.returncode == 0, proc.stderr
    assert numba_files(tmp_path / "nb") and not numba_files(tmp_path / "xdg")
    assert f"cached in {tmp_path / 'nb'}" in proc.stderr


def test_a_first_compile_says_so_once_and_a_cached_run_is_silent(tmp_path):
    cold = run_python(UNION, {"XDG_CACHE_HOME": str(tmp_path)})
    notices = [line for line in cold.stderr.splitlines() if line.startswith("refattn: compiling")]
    assert notices == [f"refattn: compiling refattn's mask and pattern kernels with Numba: once per machine "
                       f"(up to 2 s each, as each is first used), then cached in {tmp_path / 'refattn' / 'numba'}"]
    warm = run_python(UNION, {"XDG_CACHE_HOME": str(tmp_path)})
    assert warm.returncode == 0 and "compiling" not in warm.stderr


def test_refattn_quiet_silences_the_notices(tmp_path):
    proc = run_python(UNION, {"XDG_CACHE_HOME": str(tmp_path), "REFATTN_QUIET": "1"})
    assert proc.returncode == 0 and proc.stderr == ""


def test_the_cpu_backend_names_its_kernels_and_dtype(tmp_path):
    """The notice of a slow compile says which kernel, in which dtype (the listener is fed
    the event Numba sends; compiling the real kernel takes half a minute)."""
    from types import SimpleNamespace

    from numba import types

    from refattn import _runtime
    from refattn.backends import cpu

    said = []
    notice = _runtime._CompileNotice()
    original = _runtime.notice
    _runtime.notice = said.append
    try:
        for name in ("_dq_kernel", "_dkdv_kernel"):
            event = SimpleNamespace(data={"dispatcher": getattr(cpu, name), "args": (types.float32[:, :],)})
            notice.on_start(event)
            notice.on_end(event)
    finally:
        _runtime.notice = original
    assert len(said) == 1 and said[0].startswith("compiling the cpu backend's float32 backward kernels with Numba")


def readme_setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up\n", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in section.split("```bash\n")[1:] for block in [block.split("```")[0]]]


def test_ci_runs_the_readme_set_up_commands_verbatim():
    commands = readme_setup_commands()
    assert len(commands) == 2
    assert commands[0].startswith("pip install . && ") and "refattn golden check" in commands[0]
    assert commands[1].startswith('pip install -e ".[test,oracle]" && ') and "pytest" in commands[1]
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == commands

"""What refattn does to the process it runs in (refattn/_runtime.py): Numba's cache goes to
the user's cache folder, never into the package; a first compile says so on stderr, once;
and the README's set-up commands are what `.ci/run` runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def fed(events) -> list[str]:
    """The notices a fresh compile notice gives for ``events``, ``(kind, dispatcher, arg
    types)`` with kind ``"start"`` or ``"end"`` as Numba sends them, or ``(dispatcher, arg
    types)`` for a whole compile (compiling the real kernels takes half a minute)."""
    from types import SimpleNamespace

    from refattn import _runtime

    said = []
    notice = _runtime._CompileNotice()
    original = _runtime.notice
    _runtime.notice = said.append
    try:
        for ev in events:
            kinds, (dispatcher, args) = (ev[:1], ev[1:]) if isinstance(ev[0], str) else (("start", "end"), ev)
            event = SimpleNamespace(data={"dispatcher": dispatcher, "args": args})
            for kind in kinds:
                (notice.on_start if kind == "start" else notice.on_end)(event)
    finally:
        _runtime.notice = original
    return said


def test_the_cpu_backend_names_its_kernels_and_dtype():
    from numba import types

    from refattn.backends import cpu

    f32, f64 = (types.float32[:, :],), (types.float64[:, :],)
    said = fed([(cpu._dq_kernel, f32), (cpu._dkdv_kernel, f32), (cpu._forward_kernel, f64), (cpu._dq_kernel, f64)])
    assert [s.split(" with Numba")[0] for s in said] == [
        "compiling the cpu backend's float32 backward kernels",      # dq then dK/dV: one wait, one notice
        "compiling the cpu backend's float64 forward kernel",
        "compiling the cpu backend's float64 backward kernels"]


def test_nested_compiles_speak_only_at_the_outermost():
    from refattn.backends import cpu

    said = fed([("start", cpu._forward_kernel, ()),
                ("start", cpu._dq_kernel, ()),          # compiled inside the forward: part of its wait
                ("end", cpu._dq_kernel, ()),
                ("end", cpu._forward_kernel, ())])
    assert len(said) == 1 and "forward kernel" in said[0]


def test_the_cuda_backend_registers_with_numba_cudas_events():
    pytest.importorskip("numba_cuda")
    from refattn import _runtime

    assert _runtime.install_compile_notice("numba.cuda.core.event")
    assert "numba.cuda.core.event" in _runtime._LISTENERS
    from types import SimpleNamespace

    kernel = SimpleNamespace(py_func=SimpleNamespace(__module__="refattn.backends._cuda_kernels", __name__="fwd"))
    said = fed([(kernel, ())])
    assert said == ["compiling the cuda backend's float64 kernels with Numba: seconds, in every process "
                    "(GPU kernels are not cached)"]


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


def test_an_unwritable_user_cache_falls_back_to_the_temporary_folder_not_the_package(tmp_path):
    before = numba_files(PACKAGE)
    # no folder can be made under /dev/null; TMPDIR makes the fallback a fresh folder of the test's
    proc = run_python(UNION, {"XDG_CACHE_HOME": "/dev/null/cache", "TMPDIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert numba_files(PACKAGE) == before
    fallback = tmp_path / f"refattn-numba-{os.getuid()}"
    assert numba_files(fallback)
    assert f"then cached in {fallback}" in proc.stderr          # the notice names where it went

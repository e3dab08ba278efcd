"""quant/pack.py: module discovery, minifying, determinism, and packed scripts that run on their own.

Packed scripts run with cwd in a temporary folder and PYTHONPATH pointing only at "poison" copies of
the project's package names, each of which raises on import: a packed run that read any project
module from disk instead of from its bundle would fail.
"""
import ast
import os
import re
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from quant import pack as P
from quant.__main__ import main as quant_main
from tests.trainer_runs import ROOT, clean_env, run_trainer, summary, train_losses

TRAINER = ROOT / "train_gpt.py"
PROJECT_PACKAGES = ("data", "golf", "kernels", "quant")
FAST_FINAL = {"TTT_ENABLED": "0", "EVAL_STRIDE": "0"}  # the final TTT / sliding stages take minutes on CPU


def _poison(tmp: Path) -> Path:
    """A folder whose data/golf/quant/kernels packages raise on import."""
    d = tmp / "poison"
    for name in PROJECT_PACKAGES:
        (d / name).mkdir(parents=True, exist_ok=True)
        (d / name / "__init__.py").write_text(f"raise ImportError('{name} imported from disk, not the bundle')\n")
    return d


def _run_packed(script: Path, cwd: Path, *args: str, **env_overrides: str) -> subprocess.CompletedProcess:
    env = clean_env(**env_overrides)
    env["PYTHONPATH"] = str(_poison(cwd))
    out = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"packed run failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.fixture(scope="module")
def packed_trainer(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "train_gpt.py"
    out.write_bytes(P.pack(TRAINER))
    return out


# ----------------------------------------------------------------------------- discovery
def test_finds_the_trainers_project_modules():
    t0 = time.perf_counter()
    found = P.find_modules(TRAINER)
    assert time.perf_counter() - t0 < 5
    assert list(found) == sorted(found)
    must = {"data", "data.shards", "golf", "golf.config", "golf.dist", "golf.bpb", "golf.evaluate", "golf.loader",
            "golf.optim", "golf.runlog", "golf.attention", "quant", "quant.artifact", "quant.int8",
            "quant.serialize", "quant.pack"}  # quant.pack: golf.runlog asks it whether the run is packed
    assert must <= set(found), must - set(found)
    for name, path in found.items():
        assert name.split(".")[0] in PROJECT_PACKAGES, name
        assert path.is_file() and ROOT in path.parents and ".venv" not in path.parts
        assert path.relative_to(ROOT).with_suffix("").as_posix().removesuffix("/__init__") == name.replace(".", "/")
        if "." in name:
            assert name.rpartition(".")[0] in found  # parent packages are bundled too
    assert "quant.__main__" not in found and not any(n.startswith("tests") for n in found)
    # everything the trainer really imports is found (static discovery may find more: lazy imports)
    code = ("import sys, train_gpt; print(sorted(n for n, m in sys.modules.items() "
            f"if n.split('.')[0] in {PROJECT_PACKAGES!r} and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                         timeout=120, check=True)
    imported = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert imported <= set(found), imported - set(found)


def _toy_repo(tmp: Path) -> Path:
    """An entry beside a package using relative imports, lazy imports, __doc__ and inspect."""
    files = {
        "pkg/__init__.py": '"""Toy package."""\nfrom .a import double\n',
        "pkg/a.py": '''\
            """Module a."""
            import json
            from . import b
            from .sub.c import TRIPLE


            def double(x):
                """Doubles."""
                # a comment
                return 2 * x


            def multi():
                s = """line one
                  indented line two
            line three"""
                return s
            ''',
        "pkg/b.py": "VALUE = 7\n",
        "pkg/unused.py": "raise RuntimeError('never imported')\n",
        "pkg/sub/__init__.py": "from .. import b as parent_b\n",
        "pkg/sub/c.py": "from ..b import VALUE\nTRIPLE = 3 * VALUE\n",
        "entry.py": '''\
            """Toy entry: the first line is its help.

            More text that the packed script drops.
            """
            import inspect
            import os
            import sys
            import traceback

            from pkg import double


            def lazy():
                from pkg.sub import c
                return c.TRIPLE


            def boom():
                raise ValueError("boom")


            if __name__ == "__main__":
                import pkg.a
                from quant.pack import code_bytes, packed_script, running_packed

                print("doc:", __doc__.strip().splitlines()[0])
                print("values:", double(21), lazy(), pkg.a.b.VALUE, len(pkg.a.multi().splitlines()))
                print("multi:", repr(pkg.a.multi()))
                print("packed:", running_packed(), packed_script() == __file__)
                print("code_bytes:", code_bytes(__file__) == os.path.getsize(__file__))
                print("file:", pkg.a.__file__, pkg.__path__)
                print("source:", inspect.getsource(pkg.a.double).strip().splitlines()[0])
                print("main source:", inspect.getsource(lazy).strip().splitlines()[0])
                try:
                    boom()
                except ValueError:
                    print("traceback line:", traceback.format_exc().strip().splitlines()[-2].strip())
            ''',
    }
    root = tmp / "toy"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text))
    return root


def test_relative_and_lazy_imports_are_found(tmp_path):
    root = _toy_repo(tmp_path)
    found = P.find_modules(root / "entry.py")
    assert list(found) == ["pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "quant", "quant.pack"]
    assert found["pkg.sub.c"] == root / "pkg" / "sub" / "c.py" and found["quant.pack"] == ROOT / "quant" / "pack.py"


def test_toy_packed_script_runs_from_its_bundle(tmp_path):
    root = _toy_repo(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    script = run / "toy_packed.py"
    script.write_bytes(P.pack(root / "entry.py"))
    unpacked = subprocess.run([sys.executable, "entry.py"], cwd=root, env={**clean_env(), "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=60, check=True).stdout
    env = {**clean_env(), "PYTHONPATH": str(_poison(run))}
    control = subprocess.run([sys.executable, "-c", "import golf"], cwd=run, env=env, capture_output=True, text=True)
    assert "golf imported from disk" in control.stderr  # the poison works: disk imports would fail
    out = _run_packed(script, run).stdout
    assert "doc: Toy entry: the first line is its help." in out
    assert "values: 42 21 7 3" in out and unpacked.splitlines()[1] == "values: 42 21 7 3"
    assert [l for l in out.splitlines() if l.startswith("multi:")] == [l for l in unpacked.splitlines()
                                                                       if l.startswith("multi:")]
    assert "packed: True True" in out and "packed: False False" in unpacked
    assert "code_bytes: True" in out
    assert f"file: {script}/pkg/a.py ['{script}/pkg']" in out  # the zipimport convention: never a real file
    assert "source: def double(x):" in out and "main source: def lazy():" in out
    assert "traceback line: raise ValueError('boom')" in out


def test_packed_triton_kernel_has_its_source(tmp_path):
    """@triton.jit reads its function's source (inspect): the loader serves it from the bundle."""
    pytest.importorskip("triton")
    entry = tmp_path / "kernel_entry.py"
    entry.write_text(textwrap.dedent("""\
        import inspect
        import torch
        import kernels.softcap_ce as K
        g = torch.Generator().manual_seed(0)
        x, t = torch.randn(5, 300, generator=g) * 4, torch.randint(0, 300, (5,), generator=g)
        got = K.softcap_cross_entropy(x, t, 30.0, "none", use_kernel=True)
        want = K.softcap_cross_entropy_reference(x, t, 30.0, "none")
        print("close:", torch.allclose(got, want, atol=1e-4), "kernel source:",
              inspect.getsource(K._tanh.fn).splitlines()[1].strip(), K.__file__)
        """))
    script = tmp_path / "kernel_packed.py"
    script.write_bytes(P.pack(entry))
    out = _run_packed(script, tmp_path, TRITON_INTERPRET="1").stdout
    assert f"close: True kernel source: def _tanh(x): {script}/kernels/softcap_ce.py" in out, out


# ----------------------------------------------------------------------------- minifying
def _tree(source: str) -> str:
    return ast.dump(P.strip_tree(ast.parse(source)))


def test_minify_keeps_every_project_module_the_same_tree():
    files = sorted(p for pkg in PROJECT_PACKAGES for p in (ROOT / pkg).rglob("*.py")) + [TRAINER]
    assert len(files) > 15
    for path in files:
        src = path.read_text(encoding="utf-8")
        small = P.minify(src, str(path))
        compile(small, str(path), "exec", dont_inherit=True)
        assert ast.dump(ast.parse(small)) == _tree(src), path  # same program, docstrings aside
        assert len(small) < len(src), path


def test_minify_tricky_source_behaves_the_same():
    src = textwrap.dedent('''\
        """Doc line one.

        Doc line two.
        """
        from __future__ import annotations
        from dataclasses import dataclass, fields


        @dataclass
        class Cfg:
            """Docstring only above the fields."""
            name: str = "a'b\\"c"  # comment
            width: int = 4


        def only_a_docstring():
            """Nothing else."""


        def fmt(c: Cfg) -> str:
            d = {"k": c.name}
            text = f"{d['k']!r:>{c.width + 8}} {c.width:05d} {'x' if c.width else 'y'} {{literal}} \\t"
            multi = """first
                second, indented
        third"""
            if c.width:
                """a bare string statement"""
            else:
                pass
            return text + multi + str(only_a_docstring()) + __doc__.strip().splitlines()[0]


        RESULT = (fmt(Cfg()), [f.name for f in fields(Cfg)], Cfg.__annotations__, fmt.__annotations__)
        ''')
    small = P.minify(src)
    assert "comment" not in small and "Docstring only" not in small and "Doc line two" not in small
    assert "\n    " not in small.replace("\n    second", "")  # one space per level, strings untouched
    assert ast.dump(ast.parse(small)) == _tree(src)
    ns_src, ns_small = {}, {}
    exec(compile(src, "<src>", "exec", dont_inherit=True), ns_src)
    exec(compile(small, "<small>", "exec", dont_inherit=True), ns_small)
    assert ns_small["RESULT"] == ns_src["RESULT"]
    assert ns_small["__doc__"] == "Doc line one."


def test_minify_keeps_multiline_strings_inside_fstrings():
    # the one place ast.unparse writes a string over several lines is inside an f-string's braces;
    # such f-strings become ''.join(...) (portable to Python 3.11), and the value stays the same
    q3 = "'" * 3
    src = "\n".join(["def f(x):", "    if x:", f'        a = f"""{{{q3}p', f"    q{q3}}} and {{x}}" + '"""',
                      "        return a", "R = f(1)", ""])
    small = P.minify(src)
    assert "\n  return" in small, small
    ns_src, ns_small = {}, {}
    exec(src, ns_src)
    exec(small, ns_small)
    assert ns_small["R"] == ns_src["R"] == "p\n    q and 1"


def test_fstrings_with_quotes_inside_become_portable():
    """Python 3.12's unparse reuses the outer quotes inside an f-string's braces, which 3.11 cannot
    read; such f-strings are rewritten with format(), values unchanged, and stay readable to 3.11."""
    src = textwrap.dedent('''\
        x, c, w, d = 3.14159, True, 8, {"k": 1}
        a = f"{x!r:>{w}} ({'yes' if c else 'no'}) {d['k']:03d} {f'{x:.2f}'} {x!s} {x!a} plain {x:.3f}"
        b = f"{x:{'>' if c else '<'}{w}}"
        ''')
    small = P.minify(src)
    fstrings = [n for n in ast.walk(ast.parse(small)) if isinstance(n, ast.JoinedStr)]
    assert fstrings and not any(P._quotes_inside(n) for n in fstrings), small
    ns_src, ns_small = {}, {}
    exec(src, ns_src)
    exec(small, ns_small)
    assert ns_small["a"] == ns_src["a"] and ns_small["b"] == ns_src["b"]


# ----------------------------------------------------------------------------- packing
def test_pack_is_deterministic_and_small():
    a = P.pack(TRAINER)
    assert a == P.pack(TRAINER)
    code = f"import sys; from quant.pack import pack; sys.stdout.buffer.write(pack({str(TRAINER)!r}))"
    b = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**clean_env(), "PYTHONHASHSEED": "123"},
                       capture_output=True, timeout=120, check=True).stdout
    assert a == b  # another process, another hash seed: same bytes
    assert a.isascii() and a.startswith(b'D="')
    raw = P.source_bytes(TRAINER)
    assert len(a) < 0.35 * raw, (len(a), raw)
    print(f"train_gpt.py: {raw} source bytes -> {len(a)} packed")


def test_code_bytes_is_the_packed_size_when_not_packed():
    assert not P.running_packed() and P.packed_script() is None
    standin = {n.name for n in ast.parse(P._STANDIN).body if isinstance(n, ast.FunctionDef)}
    assert standin == {"packed_script", "running_packed", "code_bytes", "packed_trainer"}
    assert all(hasattr(P, n) for n in standin)
    assert P.code_bytes(TRAINER) == len(P.pack(TRAINER)) == len(P.packed_trainer(TRAINER))


def test_cli_pack(tmp_path, capsys):
    out = tmp_path / "sub" / "packed.py"
    assert quant_main(["pack", str(TRAINER), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.read_bytes() == P.pack(TRAINER)
    assert re.search(rf"^original: {P.source_bytes(TRAINER)} bytes", text, re.M)
    assert re.search(rf"^packed: {out.stat().st_size} bytes", text, re.M)
    assert quant_main(["pack", str(TRAINER)]) == 0 and "packed:" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        quant_main(["no-such-command"])


def test_packed_trainer_help(packed_trainer, tmp_path):
    out = _run_packed(packed_trainer, tmp_path, "--help").stdout
    ref = subprocess.run([sys.executable, str(TRAINER), "--help"], cwd=ROOT, env=clean_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out == ref and out.startswith("train_gpt.py: the record trainer.")


def test_packed_trainer_trains_like_the_source(packed_trainer, tmp_path):
    steps = {"ITERATIONS": "3", **FAST_FINAL}
    ref_dir, packed_dir = tmp_path / "ref", tmp_path / "packed"
    with ThreadPoolExecutor(2) as pool:  # one core each
        runs = [pool.submit(run_trainer, ref_dir, **steps),
                pool.submit(_run_packed, packed_trainer, tmp_path, LOG_DIR=str(packed_dir), RUN_ID="t", **steps)]
        for r in runs:
            r.result()
    ref_losses, packed_losses = train_losses(ref_dir), train_losses(packed_dir)
    assert len(ref_losses) == 3 and packed_losses == ref_losses
    ref, packed = summary(ref_dir), summary(packed_dir)
    assert [v["val_bpb"] for v in packed["val_history"]] == [v["val_bpb"] for v in ref["val_history"]]
    assert packed["stages"]["quant_roundtrip"] == ref["stages"]["quant_roundtrip"]
    # the packed run logs and counts itself: one source, the packed file's own bytes
    log = (packed_dir / "t.txt").read_text()
    assert re.findall(r"^==== source: (.*)$", log, re.M) == ["train_gpt.py"]
    ref_sources = re.findall(r"^==== source: (.*)$", (ref_dir / "t.txt").read_text(), re.M)
    assert ref_sources[0] == "train_gpt.py" and {"golf/runlog.py", "quant/pack.py"} <= set(ref_sources)
    assert packed["bytes"]["code"] == packed_trainer.stat().st_size
    assert packed["trainer"] == "train_gpt.py"

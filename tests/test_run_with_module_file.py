"""scripts/run_with_module_file.py: a run of a module with one package module swapped for another file (same-run
A/B of a kernel change): every importer, by module path or through the package attribute, gets the replacement."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).parents[1]


def test_the_replacement_is_what_every_importer_sees(tmp_path):
    (tmp_path / "replacement.py").write_text("MARK = 'replacement'\n")
    (tmp_path / "probe.py").write_text(
        "import sys\n"
        "import light_moe.bench\n"
        "from light_moe.bench import env\n"
        "import light_moe.bench.env as env2\n"
        "print(env.MARK, env2.MARK, light_moe.bench.env.MARK, sys.argv[1:])\n")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "run_with_module_file.py"), "light_moe.bench.env",
                           str(tmp_path / "replacement.py"), "probe", "--flag", "1"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "replacement replacement replacement ['--flag', '1']"

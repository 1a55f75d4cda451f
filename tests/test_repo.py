import os
import re

from conftest import ROOT


def test_ci_runs_exactly_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_commands = [b for b in blocks if "pytest" in b and "\n" not in b]
    assert len(test_commands) == 1, "the README has one one-line test command"
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert test_commands[0] in ci


def test_the_readme_notebook_snippet_runs_as_written(tmp_path):
    """The README's python block, verbatim, in a folder laid out as the default pipeline leaves it."""
    import shutil
    import subprocess
    import sys
    from conftest import make_activations, run_script
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    snippet, = [b for b in re.findall(r"```python\n(.*?)\n```", readme, re.S) if "load_checkpoint" in b]
    (tmp_path / "activations").mkdir()
    acts = make_activations(tmp_path / "activations" / "activations_layer12.npz")
    run_script("train_sae.py", f"--activations_path={acts}", "--m=256", "--k=8", "--n_epochs=1", "--eval_lm=False",
               "--export_saelens=False", cwd=tmp_path)
    shutil.copytree(os.path.join(ROOT, "sae"), tmp_path / "sae")  # "from the repository's folder"
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("torch.Size([") and ", 256]) [8, 8, 8, 8, 8]" in proc.stdout

"""The README's commands are the ones CI runs, and the shipped example trains."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in _bash_blocks(readme), "the last line of .ci/run must be README's test command"
    assert "-c constraints.txt" in ci and "pytest" in ci


def test_constraints_pin_the_cpu_torch():
    assert "torch==2.13.0" in (ROOT / "constraints.txt").read_text().split()


def test_train_tiny_example_runs_and_loss_falls(capsys):
    import runpy
    import sys

    argv = sys.argv
    sys.argv = ["train_tiny.py", "--steps", "60", "--experts", "4"]
    try:
        runpy.run_path(str(ROOT / "examples" / "train_tiny.py"), run_name="__main__")
    finally:
        sys.argv = argv
    lines = [l for l in capsys.readouterr().out.splitlines() if "relative mse" in l]
    first = float(lines[0].split("relative mse")[1].split()[0])
    last = float(lines[-1].split("relative mse")[1].split()[0])
    assert last < 0.8 * first


def test_readme_main_job_is_the_quick_study():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    main_job = [b for b in blocks if "pytest" not in b]
    assert any(b.rstrip().endswith("moegrad study --quick") and "-c constraints.txt" in b
               for b in main_job), main_job


def test_every_image_the_docs_show_is_shipped():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    shown = [(page, link) for page in pages
             for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text())]
    assert shown, "the docs show no figure"
    for page, link in shown:
        assert (page.parent / link).stat().st_size > 1000, (page.name, link)


def test_readme_python_examples_run():
    """Every ```python block of README.md that needs no external model runs as written."""
    import torch

    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    runnable = [b for b in blocks if "from_pretrained" not in b and "model(" not in b]
    assert runnable, "README.md lost its runnable example"
    for block in runnable:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        assert isinstance(namespace["out"].y, torch.Tensor)
        assert namespace["out"].y.shape == namespace["x"].shape
